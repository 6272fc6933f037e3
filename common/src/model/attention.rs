//! Causal attention that never holds the (heads × T × T) probabilities, for training and (on
//! the CPU) for inference over several positions at once: the forward pass runs in blocks of
//! queries, and its backward pass (a candle `CustomOp3`, since
//! candle has no attention with a backward) recomputes each block's probabilities and applies
//! the softmax backward there, as FlashAttention does:
//!
//!   P = softmax(Q Kᵀ·s + causal mask), O = P V;
//!   dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O)), dQ = dS K·s, dK = dSᵀ Q·s.
//!
//! A block of queries is scored only against the keys it may see (the causal mask hides the
//! rest), which halves attention's work at long lengths. Keys and values keep their own number
//! of heads (grouped-query attention is not expanded into copies the graph would keep).
//!
//! On the CPU the op is one kernel (model::flash) reading its inputs where they are (no copies
//! for f32/f64). On CUDA it is
//! composed of candle's operations, run on the GPU ([`composed`]): blocks of 256 queries, each
//! holding a block × T of scores, probabilities and their gradients. Scores and softmax are
//! computed in f32 (f64 for f64 inputs), as the plain path does.

use super::flash::{self, Dims};
use super::fused::{data, store32, Data};
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor, D};

/// Queries per block of the composed path.
const BLOCK: usize = 256;

struct CausalAttention {
    scale: f64,
    /// Candle's operations on the CPU too (tests compare the two paths there).
    composed: bool,
}

fn wide(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

fn dims(q: &Shape, k: &Shape) -> candle_core::Result<Dims> {
    let (b, heads, t, d) = q.dims4()?;
    let (kb, kv_heads, keys, kd) = k.dims4()?;
    if kb != b || kd != d || kv_heads == 0 || heads % kv_heads != 0 || keys < t {
        candle_core::bail!("attention: queries {q:?} and keys {k:?} do not match");
    }
    Ok(Dims {
        b,
        heads,
        kv_heads,
        t,
        keys,
        d,
    })
}

/// Additive causal mask for queries q0..q0+n over keys 0..t.
fn mask(q0: usize, n: usize, t: usize, dt: DType, dev: &Device) -> candle_core::Result<Tensor> {
    let m: Vec<f32> = (0..n)
        .flat_map(|i| (0..t).map(move |j| if j <= q0 + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(m, (n, t), dev)?.to_dtype(dt)
}

/// Probabilities of a block of queries `qb` (b, h, n, d) starting at q0 against the keys
/// `k` it may see (the first q0 + n: later ones are masked, so they are never computed).
fn probs(qb: &Tensor, k: &Tensor, q0: usize, scale: f64) -> candle_core::Result<Tensor> {
    let (n, t) = (qb.dim(2)?, k.dim(2)?);
    let s = (qb.matmul(&k.t()?)? * scale)?;
    let s = s.broadcast_add(&mask(q0, n, t, s.dtype(), qb.device())?)?;
    candle_nn::ops::softmax_last_dim(&s)
}

/// The keys (or values) a block of queries ending at `end` may see: (b, h, end, d).
fn visible(x: &Tensor, end: usize) -> candle_core::Result<Tensor> {
    if end == x.dim(2)? {
        Ok(x.clone())
    } else {
        x.narrow(2, 0, end)?.contiguous()
    }
}

/// Keys or values (b, kv_heads, t, d) repeated for each query head: (b, heads, t, d).
fn repeat(x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, kvh, t, d) = x.dims4()?;
    if kvh == heads {
        return Ok(x.clone());
    }
    x.unsqueeze(2)?
        .expand((b, kvh, heads / kvh, t, d))?
        .reshape((b, heads, t, d))
}

/// Per-query-head gradients (b, heads, t, d) summed over each group sharing a key head.
fn group_sum(g: Tensor, kv_heads: usize) -> candle_core::Result<Tensor> {
    let (b, heads, t, d) = g.dims4()?;
    if heads == kv_heads {
        return Ok(g);
    }
    g.reshape((b, kv_heads, heads / kv_heads, t, d))?.sum(2)
}

/// q, k and v in the working type (f32, f64 for f64), keys and values repeated per query head.
fn widened(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (w, heads) = (wide(q.dtype()), q.dim(1)?);
    Ok((
        q.to_dtype(w)?,
        repeat(&k.to_dtype(w)?, heads)?,
        repeat(&v.to_dtype(w)?, heads)?,
    ))
}

/// The forward pass with candle's operations (any device).
fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let dt = q.dtype();
    let (q, k, v) = widened(q, k, v)?;
    let t = q.dim(2)?;
    let mut out = Vec::new();
    let mut q0 = 0;
    while q0 < t {
        let n = BLOCK.min(t - q0);
        let qb = q.narrow(2, q0, n)?;
        let (kb, vb) = (visible(&k, q0 + n)?, visible(&v, q0 + n)?);
        out.push(probs(&qb, &kb, q0, scale)?.matmul(&vb)?);
        q0 += n;
    }
    Tensor::cat(&out, 2)?.to_dtype(dt)
}

/// The backward pass with candle's operations (any device): (dq, dk, dv).
fn composed_bwd(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    o: &Tensor,
    go: &Tensor,
    scale: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let dt = q.dtype();
    let w = wide(dt);
    let kv_heads = k.dim(1)?;
    let (q, k, v) = widened(q, k, v)?;
    let (o, go) = (o.to_dtype(w)?, go.to_dtype(w)?);
    let t = q.dim(2)?;
    let mut dq = Vec::new();
    // The keys' and values' gradients, per block of keys.
    let (mut dk, mut dv) = (Vec::new(), Vec::new());
    let mut q0 = 0;
    while q0 < t {
        let n = BLOCK.min(t - q0);
        let (qb, ob, gob) = (
            q.narrow(2, q0, n)?,
            o.narrow(2, q0, n)?,
            go.narrow(2, q0, n)?,
        );
        // Only the keys this block sees get gradient from it: the first q0 + n.
        let m = q0 + n;
        let (kb, vb) = (visible(&k, m)?, visible(&v, m)?);
        let p = probs(&qb, &kb, q0, scale)?;
        add_per_key_block(&mut dv, &p.t()?.matmul(&gob)?)?;
        let dp = gob.matmul(&vb.t()?)?;
        let rows = (&gob * &ob)?.sum_keepdim(D::Minus1)?;
        let ds = ((p * dp.broadcast_sub(&rows)?)? * scale)?;
        dq.push(ds.matmul(&kb)?);
        add_per_key_block(&mut dk, &ds.t()?.matmul(&qb)?)?;
        q0 += n;
    }
    Ok((
        Tensor::cat(&dq, 2)?.to_dtype(dt)?,
        group_sum(Tensor::cat(&dk, 2)?, kv_heads)?.to_dtype(dt)?,
        group_sum(Tensor::cat(&dv, 2)?, kv_heads)?.to_dtype(dt)?,
    ))
}

/// Add a query block's gradient for the keys it sees, `part` (b, h, m, d), into `sums`, one
/// tensor per block of keys (a new block starts at `part`'s first unseen key). Key block i gets
/// the parts of query blocks i, i+1, … in that order: the same additions as accumulating
/// zero-padded parts into a (b, h, t, d) total, without padding each part to t.
fn add_per_key_block(sums: &mut Vec<Tensor>, part: &Tensor) -> candle_core::Result<()> {
    let m = part.dim(2)?;
    let mut k0 = 0;
    for s in sums.iter_mut() {
        let n = s.dim(2)?;
        *s = (&*s + part.narrow(2, k0, n)?)?;
        k0 += n;
    }
    if k0 < m {
        sums.push(part.narrow(2, k0, m - k0)?.contiguous()?);
    }
    Ok(())
}

/// The backward pass with the CPU kernel, reading the tensors' storage without copies.
fn kernel_bwd(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    o: &Tensor,
    go: &Tensor,
    scale: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let x = dims(q.shape(), k.shape())?;
    let held = [q, k, v, o, go]
        .into_iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = held.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::new();
    for (s, l) in &guards {
        match &**s {
            Storage::Cpu(c) => views.push(data(c, l)?),
            _ => candle_core::bail!("attention: the CPU kernel got a non-CPU tensor"),
        }
    }
    let dt = q.dtype();
    let cpu = Device::Cpu;
    let back = |g: Vec<f32>, shape: &Shape| -> candle_core::Result<Tensor> {
        Tensor::from_vec(g, shape, &cpu)?.to_dtype(dt)
    };
    match &views[..] {
        [Data::F64(q), Data::F64(k), Data::F64(v), Data::F64(o), Data::F64(go)] => {
            let (dq, dk, dv) = flash::backward((q, k, v), o, go, x, scale);
            Ok((
                Tensor::from_vec(dq, held[0].shape(), &cpu)?,
                Tensor::from_vec(dk, held[1].shape(), &cpu)?,
                Tensor::from_vec(dv, held[2].shape(), &cpu)?,
            ))
        }
        [Data::F32(q), Data::F32(k), Data::F32(v), Data::F32(o), Data::F32(go)] => {
            let (dq, dk, dv) = flash::backward((q, k, v), o, go, x, scale as f32);
            Ok((
                back(dq, held[0].shape())?,
                back(dk, held[1].shape())?,
                back(dv, held[2].shape())?,
            ))
        }
        _ => candle_core::bail!("attention: mixed or non-float dtypes"),
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "cf-causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if self.composed {
            use super::op_io::{cpu_in, cpu_out};
            let (q, k, v) = (cpu_in(s1, l1)?, cpu_in(s2, l2)?, cpu_in(s3, l3)?);
            return cpu_out(&composed(&q, &k, &v, self.scale)?);
        }
        let x = dims(l1.shape(), l2.shape())?;
        let out = match (data(s1, l1)?, data(s2, l2)?, data(s3, l3)?) {
            (Data::F64(q), Data::F64(k), Data::F64(v)) => {
                CpuStorage::F64(flash::forward(q, k, v, x, self.scale))
            }
            (Data::F32(q), Data::F32(k), Data::F32(v)) => {
                store32(flash::forward(&q, &k, &v, x, self.scale as f32), s1.dtype())?
            }
            _ => candle_core::bail!("attention: mixed dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }

    /// The same composition on the GPU: the inputs are wrapped as tensors (copies), the blocks
    /// run as candle's CUDA operations, and only the output is kept.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::op_io::{cuda_in, cuda_out};
        let (q, k, v) = (cuda_in(s1, l1)?, cuda_in(s2, l2)?, cuda_in(s3, l3)?);
        cuda_out(&composed(&q, &k, &v, self.scale)?)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad_o: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, o, go) = (
            q.detach(),
            k.detach(),
            v.detach(),
            o.detach(),
            grad_o.detach(),
        );
        let (dq, dk, dv) = if q.device().is_cpu() && !self.composed {
            kernel_bwd((&q, &k, &v), &o, &go, self.scale)?
        } else {
            composed_bwd((&q, &k, &v), &o, &go, self.scale)?
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

fn apply(q: &Tensor, k: &Tensor, v: &Tensor, op: CausalAttention) -> Result<Tensor> {
    dims(q.shape(), k.shape())?;
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        anyhow::bail!(
            "attention: queries ({:?}), keys ({:?}) and values ({:?}) differ in type",
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
    }
    // The kernels take max(s·scale) as max(s)·scale.
    if op.scale.is_nan() || op.scale <= 0.0 {
        anyhow::bail!("attention: the scale must be positive, not {}", op.scale);
    }
    if q.elem_count() == 0 {
        return Ok(q.clone());
    }
    // Keys before the queries (a cache) only where the kernel runs.
    let kernel = q.device().is_cpu() && !op.composed;
    if k.dims() != v.dims() || (!kernel && k.dim(2)? != q.dim(2)?) {
        anyhow::bail!(
            "attention: keys {:?} and values {:?} must cover the queries {:?}",
            k.dims(),
            v.dims(),
            q.dims()
        );
    }
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// softmax(q kᵀ·scale + causal mask) v for q (b, heads, t, head_dim) and k, v (b, kv_heads, t,
/// head_dim) with kv_heads dividing heads, differentiable, without keeping the probabilities.
/// On the CPU the keys may start before the queries (keys cached from earlier positions: the
/// queries are the last t of them).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let composed = false;
    apply(q, k, v, CausalAttention { scale, composed })
}

/// [`causal_attention`] composed of candle's operations on any device (what CUDA runs), for
/// tests that compare it with the CPU kernel.
#[doc(hidden)]
pub fn causal_attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let composed = true;
    apply(q, k, v, CausalAttention { scale, composed })
}
