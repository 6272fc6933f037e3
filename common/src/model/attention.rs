//! Causal attention for training that never holds the (heads × T × T) probabilities: the
//! forward pass runs in blocks of queries, and its backward pass (a candle `CustomOp3`, since
//! candle has no attention with a backward) recomputes each block's probabilities and applies
//! the softmax backward there, as FlashAttention does:
//!
//!   P = softmax(Q Kᵀ·s + causal mask), O = P V;
//!   dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O)), dQ = dS K·s, dK = dSᵀ Q·s.
//!
//! A block of queries is scored only against the keys it may see (the causal mask hides the
//! rest), which halves attention's work at long lengths.
//!
//! Memory per layer: a block of BLOCK × T scores instead of several T × T copies. Scores and
//! softmax are computed in f32 (f64 for f64 inputs), as the plain path does. On the CPU and on
//! CUDA (the same candle operations, run on the GPU).

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};

/// Queries per block.
const BLOCK: usize = 256;

struct CausalAttention {
    scale: f64,
}

fn wide(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Additive causal mask for queries q0..q0+n over keys 0..t.
fn mask(
    q0: usize,
    n: usize,
    t: usize,
    dt: DType,
    dev: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let m: Vec<f32> = (0..n)
        .flat_map(|i| (0..t).map(move |j| if j <= q0 + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(m, (n, t), dev)?.to_dtype(dt)
}

/// Probabilities of a block of queries `qb` (b, h, n, d) starting at q0 against the keys
/// `k` it may see (the first q0 + n: later ones are masked, so they are never computed).
fn probs(qb: &Tensor, k: &Tensor, q0: usize, scale: f64) -> candle_core::Result<Tensor> {
    let (n, t) = (qb.dim(2)?, k.dim(2)?);
    let s = qb.matmul(&k.t()?)?;
    // On the CPU scale, mask and softmax are one threaded pass.
    if let Some(p) = super::fused::causal_softmax(&s, q0, scale)? {
        return Ok(p);
    }
    let s = (s * scale)?;
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

fn forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let dt = q.dtype();
    let w = wide(dt);
    let (q, k, v) = (q.to_dtype(w)?, k.to_dtype(w)?, v.to_dtype(w)?);
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
        use super::op_io::{cpu_in, cpu_out};
        let (q, k, v) = (cpu_in(s1, l1)?, cpu_in(s2, l2)?, cpu_in(s3, l3)?);
        cpu_out(&forward(&q, &k, &v, self.scale)?)
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
        cuda_out(&forward(&q, &k, &v, self.scale)?)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad_o: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dt = q.dtype();
        let w = wide(dt);
        let (q, k, v, o, go) = (
            q.detach().to_dtype(w)?,
            k.detach().to_dtype(w)?,
            v.detach().to_dtype(w)?,
            o.detach().to_dtype(w)?,
            grad_o.detach().to_dtype(w)?,
        );
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
            let p = probs(&qb, &kb, q0, self.scale)?;
            add_per_key_block(&mut dv, &p.t()?.matmul(&gob)?)?;
            let dp = gob.matmul(&vb.t()?)?;
            let rows = (&gob * &ob)?.sum_keepdim(D::Minus1)?;
            // dS·scale: on the CPU one threaded pass.
            let ds = match super::fused::softmax_grad(&p, &dp, &rows, self.scale)? {
                Some(ds) => ds,
                None => ((p * dp.broadcast_sub(&rows)?)? * self.scale)?,
            };
            dq.push(ds.matmul(&kb)?);
            add_per_key_block(&mut dk, &ds.t()?.matmul(&qb)?)?;
            q0 += n;
        }
        Ok((
            Some(Tensor::cat(&dq, 2)?.to_dtype(dt)?),
            Some(Tensor::cat(&dk, 2)?.to_dtype(dt)?),
            Some(Tensor::cat(&dv, 2)?.to_dtype(dt)?),
        ))
    }
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

/// softmax(q kᵀ·scale + causal mask) v for q, k, v (b, heads, t, head_dim), differentiable,
/// without keeping the probabilities.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        CausalAttention { scale },
    )?)
}
