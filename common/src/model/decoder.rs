//! One decoder for the Llama family: Llama (GQA, llama3 rope scaling, biases, tied
//! embeddings), OLMo (non-parametric LayerNorm, clip_qkv), OLMo-2 (norms after each sublayer,
//! q/k norm), Qwen2 (q/k/v bias). It follows transformers' modeling code operation by operation.
//!
//! Unlike candle-transformers' models it returns logits at every position, decodes a batch with
//! a preallocated KV cache, and is differentiable end to end in [`Mode::Train`]: candle's fused
//! `softmax_last_dim`, `rms_norm` and `rope` kernels have no backward and silently cut the graph,
//! so they are used only in [`Mode::Infer`], where they give the same values.

use super::config::{Arch, Config};
use super::weights::Source;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

/// Which kernels a forward pass may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// candle's fused kernels where they exist: fast, no gradient.
    Infer,
    /// Differentiable operations only, so every parameter receives its gradient.
    Train,
}

/// Half types are normalised and soft-maxed in f32, as transformers does; f32 and f64 stay.
fn upcast(dt: DType) -> DType {
    match dt {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// A LoRA adapter on a linear layer: `y += (α/r) · dropout(x) Aᵀ Bᵀ`, A (r, in), B (out, r).
#[derive(Clone, Debug)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// Dropout probability on the adapter's input, with its own seeded stream (training only).
    pub dropout: f32,
    pub rng: Option<std::sync::Arc<std::sync::Mutex<rand_chacha::ChaCha8Rng>>>,
}

impl Lora {
    /// The adapter's output (α/r) · dropout(x) Aᵀ Bᵀ for rows x (rows, in), in the adapter's
    /// own (f32) dtype.
    fn forward(&self, x2: &Tensor) -> Result<Tensor> {
        Ok(self.down(x2)?.matmul(&self.b.t()?)?)
    }

    /// u = (α/r) · dropout(x) Aᵀ, (rows, r): the adapter's input to B (the adapter keeps its
    /// own (f32) dtype over a half-precision base).
    fn down(&self, x2: &Tensor) -> Result<Tensor> {
        let x = self.forward_input(x2)?.to_dtype(self.a.dtype())?;
        Ok((x.matmul(&self.a.t()?)? * self.scale)?)
    }

    fn forward_input(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match (&self.rng, self.dropout > 0.0) {
            (Some(rng), true) => {
                use rand_chacha::rand_core::RngCore;
                let keep = 1.0 - self.dropout;
                let n = x.elem_count();
                let mut r = rng.lock().expect("LoRA dropout RNG poisoned");
                let mask: Vec<f32> = (0..n)
                    .map(|_| {
                        if (r.next_u32() as f64 / (u32::MAX as f64 + 1.0)) < keep as f64 {
                            1.0 / keep
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
                (x * mask)?
            }
            _ => x.clone(),
        })
    }
}

/// `y = x Wᵀ (+ bias) + u Bᵀ` for a LoRA layer over a frozen base, as one differentiable
/// operation: candle's `add` would keep both summands (the base output and the adapter's, two
/// (rows × out) tensors per projection) for a backward pass that needs neither. Its backward:
/// dx = dy W, du = dy B, dB = dyᵀ u; the frozen W and bias get none.
struct LoraLinear {
    w: Tensor,
    bias: Option<Tensor>,
}

impl LoraLinear {
    fn compute(&self, x: &Tensor, u: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = x.matmul(&self.w.t()?)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        let dt = y.dtype();
        y + u.matmul(&b.t()?)?.to_dtype(dt)?
    }
}

impl candle_core::CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "cf-lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use super::op_io::{cpu_in, cpu_out};
        cpu_out(&self.compute(&cpu_in(s1, l1)?, &cpu_in(s2, l2)?, &cpu_in(s3, l3)?)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use super::op_io::{cuda_in, cuda_out};
        cuda_out(&self.compute(&cuda_in(s1, l1)?, &cuda_in(s2, l2)?, &cuda_in(s3, l3)?)?)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        u: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.detach();
        let dx = dy.matmul(&self.w)?;
        let dyf = dy.to_dtype(u.dtype())?;
        let du = dyf.matmul(&b.detach())?;
        let db = dyf.t()?.matmul(&u.detach())?;
        Ok((Some(dx), Some(du), Some(db)))
    }
}

/// `y = x Wᵀ + b`, with W of shape (out, in), and an optional LoRA adapter.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

impl Linear {
    fn load(src: &dyn Source, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            weight: src.get(&format!("{name}.weight"), &[out, inp])?,
            bias: if bias {
                Some(src.get(&format!("{name}.bias"), &[out])?)
            } else {
                None
            },
            lora: None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = *dims.last().expect("linear input has a last dim");
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.contiguous()?.reshape((rows, inp))?;
        let y = match &self.lora {
            // Training an adapter: the base output and the adapter's in one operation, which
            // keeps neither for the backward pass.
            Some(l) if l.b.track_op() => {
                let u = l.down(&x2)?.contiguous()?;
                let op = LoraLinear {
                    w: self.weight.clone(),
                    bias: self.bias.clone(),
                };
                x2.apply_op3_arc(&u, &l.b.contiguous()?, std::sync::Arc::new(Box::new(op)))?
            }
            _ => {
                let mut y = x2.matmul(&self.weight.t()?)?;
                if let Some(b) = &self.bias {
                    y = y.broadcast_add(b)?;
                }
                if let Some(l) = &self.lora {
                    y = (y + l.forward(&x2)?.to_dtype(x2.dtype())?)?;
                }
                y
            }
        };
        let mut out = dims;
        *out.last_mut().unwrap() = self.weight.dim(0)?;
        Ok(y.reshape(out)?)
    }
}

#[derive(Clone, Debug)]
enum Norm {
    /// RMSNorm: `w * (x / sqrt(mean(x²) + eps)).to(dtype)`, statistics in f32 (or f64).
    Rms { weight: Tensor, eps: f64 },
    /// OLMo's LayerNorm without weight or bias, eps 1e-5.
    Plain { eps: f64 },
}

impl Norm {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let dt = x.dtype();
        match self {
            Norm::Rms { weight, eps } => {
                if mode == Mode::Infer && dt == DType::F32 {
                    return Ok(candle_nn::ops::rms_norm(
                        &x.contiguous()?,
                        weight,
                        *eps as f32,
                    )?);
                }
                // The fused kernel with its own backward (CPU); candle's operations elsewhere.
                if let Some(y) = super::fused::rms_norm(x, weight, *eps)? {
                    return Ok(y);
                }
                let xf = x.to_dtype(upcast(dt))?;
                let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
                let n = xf.broadcast_div(&(ms + *eps)?.sqrt()?)?;
                Ok(n.to_dtype(dt)?.broadcast_mul(weight)?)
            }
            Norm::Plain { eps } => {
                let xf = x.to_dtype(upcast(dt))?;
                let xc = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
                let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
                Ok(xc.broadcast_div(&(var + *eps)?.sqrt()?)?.to_dtype(dt)?)
            }
        }
    }
}

/// Rotary tables for positions `0..len`, (len, head_dim/2) each.
#[derive(Clone, Debug)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// Longest table built up front; positions past it are an error.
const ROPE_TABLE_MAX: usize = 32768;

impl Rope {
    fn new(cfg: &Config, dtype: DType, device: &Device) -> Result<Rope> {
        let inv = cfg.rope_scaling.inv_freq(cfg.head_dim, cfg.rope_theta);
        let len = cfg.max_position_embeddings.clamp(1, ROPE_TABLE_MAX);
        let half = inv.len();
        let mut angles = Vec::with_capacity(len * half);
        for p in 0..len {
            angles.extend(inv.iter().map(|f| p as f64 * f));
        }
        let a = Tensor::from_vec(angles, (len, half), device)?;
        Ok(Rope {
            cos: a.cos()?.to_dtype(dtype)?,
            sin: a.sin()?.to_dtype(dtype)?,
        })
    }

    /// x: (b, heads, t, head_dim) at positions offset..offset+t.
    fn apply(&self, x: &Tensor, offset: usize, mode: Mode) -> Result<Tensor> {
        let t = x.dim(2)?;
        if offset + t > self.cos.dim(0)? {
            bail!(
                "position {} is past the {} positions this model supports",
                offset + t,
                self.cos.dim(0)?
            );
        }
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        if mode == Mode::Infer && x.dtype() != DType::F64 {
            Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
        } else if let Some(y) = super::fused::rope(x, &cos, &sin)? {
            Ok(y)
        } else {
            Ok(candle_nn::rotary_emb::rope_slow(x, &cos, &sin)?)
        }
    }
}

/// Rotary tables gathered for one position per row ([`Rope::rows`]).
struct RowTables {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The cos and sin tables of one position per row, (b, 1, head_dim / 2) each, for
    /// [`Self::apply_rows`]: a decoding step gathers them once for every layer.
    fn rows(&self, positions: &Tensor) -> Result<RowTables> {
        Ok(RowTables {
            cos: self.cos.index_select(positions, 0)?.unsqueeze(1)?,
            sin: self.sin.index_select(positions, 0)?.unsqueeze(1)?,
        })
    }

    /// x: (b, heads, 1, head_dim), row i rotated by row i of `t` (continuous batching: each
    /// row is its own sequence).
    fn apply_rows(x: &Tensor, t: &RowTables) -> Result<Tensor> {
        let (b, cos, sin) = (x.dim(0)?, &t.cos, &t.sin);
        if x.dtype() != DType::F64 {
            return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?);
        }
        // f64 (the parity tests' dtype): the same rotation composed, cos/sin per row.
        let half = x.dim(D::Minus1)? / 2;
        let (cos, sin) = (cos.reshape((b, 1, 1, half))?, sin.reshape((b, 1, 1, half))?);
        let (x1, x2) = (
            x.narrow(D::Minus1, 0, half)?,
            x.narrow(D::Minus1, half, half)?,
        );
        let y1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let y2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[y1, y2], D::Minus1)?)
    }
}

fn softmax(x: &Tensor, mode: Mode) -> Result<Tensor> {
    if mode == Mode::Infer && x.dtype() != DType::F64 {
        Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?)
    } else {
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    }
}

/// A preallocated per-layer key/value cache for a batch whose rows share one position.
pub struct KvCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    cap: usize,
}

impl KvCache {
    /// A cache for `cap` positions (prefix plus generated tokens).
    pub fn new(num_layers: usize, cap: usize) -> KvCache {
        KvCache {
            kv: vec![None; num_layers],
            len: 0,
            cap,
        }
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        if self.len + t > self.cap {
            bail!(
                "KV cache full: {} + {t} positions > capacity {}",
                self.len,
                self.cap
            );
        }
        if self.kv[layer].is_none() {
            let (b, h, _, d) = k.dims4()?;
            let z = Tensor::zeros((b, h, self.cap, d), k.dtype(), k.device())?;
            self.kv[layer] = Some((z.clone(), z.copy()?));
        }
        let (kb, vb) = self.kv[layer].as_ref().unwrap();
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((
            kb.narrow(2, 0, self.len + t)?,
            vb.narrow(2, 0, self.len + t)?,
        ))
    }

    /// Keep only the given batch rows (to drop finished sequences from a decoding batch).
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        for entry in self.kv.iter_mut().flatten() {
            let idx = Tensor::new(rows, entry.0.device())?;
            *entry = (
                entry.0.index_select(&idx, 0)?,
                entry.1.index_select(&idx, 0)?,
            );
        }
        Ok(())
    }

    /// Layer `layer`'s filled keys and values, (b, kv_heads, len, head_dim) each.
    fn filled(&self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        let Some((k, v)) = &self.kv[layer] else {
            return Ok(None);
        };
        Ok(Some((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?)))
    }
}

/// A key/value cache whose rows are independent sequences, for continuous batching: a row that
/// finishes is replaced by a new sequence while the others go on.
///
/// Every decoding step writes one column for all rows, into a ring of `cap` columns: column
/// `g mod cap` holds global column g. Row r's sequence began at global column `starts[r]`;
/// attention masks the columns before it (an earlier sequence's, or nothing). Keys are stored
/// rotated at the row's own positions, and attention does not depend on the order of keys, so
/// the ring never has to be shifted. A row's sequence must fit in `cap` columns.
pub struct SlotCache {
    kv: Vec<(Tensor, Tensor)>,
    cap: usize,
    /// Global columns written so far; the next step writes column `written`.
    written: u64,
    starts: Vec<u64>,
}

impl SlotCache {
    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.starts.len()
    }

    /// Columns of the ring: the longest sequence (prefix plus generated tokens) it can hold.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Advance by `n` empty columns, so that a first batch of prefixes up to n + 1 tokens long
    /// has room behind the first step's column.
    pub fn skip(&mut self, n: usize) {
        self.written += n as u64;
    }

    /// Keep only the given rows, in this order (rows that finished with nobody to take their
    /// place leave the batch).
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        let idx = Tensor::new(rows, self.kv[0].0.device())?;
        for (k, v) in self.kv.iter_mut() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        self.starts = rows.iter().map(|&r| self.starts[r as usize]).collect();
        Ok(())
    }

    /// This step's positions, one per row: where its token sits in its own sequence.
    fn positions(&self) -> Vec<u32> {
        self.starts
            .iter()
            .map(|&s| (self.written - s) as u32)
            .collect()
    }

    /// Columns attention reads this step: all written ones, up to the ring's size.
    fn view(&self) -> usize {
        (self.written as usize + 1).min(self.cap)
    }

    /// The additive mask (rows, 1, 1, 1, view) that hides from each row the columns before its
    /// sequence began, or None when every row may see every column in view.
    fn mask(&self, dtype: DType, device: &Device) -> Result<Option<Tensor>> {
        let view = self.view();
        let oldest = self.written + 1 - view as u64;
        if self.starts.iter().all(|&s| s <= oldest) {
            return Ok(None);
        }
        let now = (self.written % self.cap as u64) as usize;
        // Each column's global index, less `oldest`: O(view + rows) values cross to the device.
        let age: Vec<f32> = (0..view)
            .map(|j| {
                let back = (now + self.cap - j) % self.cap;
                (self.written - back as u64 - oldest) as f32
            })
            .collect();
        let from: Vec<f32> = self
            .starts
            .iter()
            .map(|&s| s.saturating_sub(oldest) as f32)
            .collect();
        let rows = self.starts.len();
        let age = Tensor::from_vec(age, (1, view), device)?;
        let from = Tensor::from_vec(from, (rows, 1), device)?;
        let visible = age.broadcast_ge(&from)?;
        let zero = Tensor::zeros((rows, view), dtype, device)?;
        let hidden = Tensor::full(f32::NEG_INFINITY, (rows, view), device)?.to_dtype(dtype)?;
        Ok(Some(
            visible
                .where_cond(&zero, &hidden)?
                .reshape((rows, 1, 1, 1, view))?,
        ))
    }

    /// Write this step's keys and values (rows, kv_heads, 1, head_dim) for `layer`; returns the
    /// columns in view.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let col = (self.written % self.cap as u64) as usize;
        let (kb, vb) = &self.kv[layer];
        kb.slice_set(&k.contiguous()?, 2, col)?;
        vb.slice_set(&v.contiguous()?, 2, col)?;
        let view = self.view();
        Ok((kb.narrow(2, 0, view)?, vb.narrow(2, 0, view)?))
    }

    /// Begin a new sequence in `row` from a prefilled prefix: `kv[layer]` ([`Decoder::prefill`])
    /// holds its first n positions, (1, kv_heads, n, head_dim). They take the n global columns
    /// before the next step's, whose token, the prefix's last, is the row's input at the next
    /// [`Decoder::forward_slots`].
    pub fn begin(&mut self, row: usize, kv: &[(Tensor, Tensor)], n: usize) -> Result<()> {
        if n as u64 > self.written || n + 1 > self.cap {
            bail!(
                "internal: a prefix of {} tokens does not fit the slot cache ({} columns, {} written)",
                n + 1,
                self.cap,
                self.written
            );
        }
        let first = self.written - n as u64;
        self.starts[row] = first;
        if n == 0 {
            return Ok(());
        }
        let col = (first % self.cap as u64) as usize;
        // The columns may wrap around the ring's end: at most two pieces.
        let head = n.min(self.cap - col);
        for ((kb, vb), (k, v)) in self.kv.iter().zip(kv) {
            let (kr, vr) = (kb.narrow(0, row, 1)?, vb.narrow(0, row, 1)?);
            kr.slice_set(&k.narrow(2, 0, head)?.contiguous()?, 2, col)?;
            vr.slice_set(&v.narrow(2, 0, head)?.contiguous()?, 2, col)?;
            if head < n {
                kr.slice_set(&k.narrow(2, head, n - head)?.contiguous()?, 2, 0)?;
                vr.slice_set(&v.narrow(2, head, n - head)?.contiguous()?, 2, 0)?;
            }
        }
        Ok(())
    }
}

/// The cache one layer reads and extends.
enum LayerCache<'a> {
    /// Rows that share their positions.
    Shared(&'a mut KvCache, usize),
    /// Rows that are separate sequences, with this step's rotary tables per row.
    Slots(&'a mut SlotCache, usize, &'a RowTables),
}

#[derive(Clone, Debug)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    clip_qkv: Option<f64>,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        cache: Option<LayerCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let offset = match &cache {
            Some(LayerCache::Shared(c, _)) => c.len(),
            _ => 0,
        };
        let (mut q, mut k, mut v) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?);
        if let Some(c) = self.clip_qkv {
            q = q.clamp(-c, c)?;
            k = k.clamp(-c, c)?;
            v = v.clamp(-c, c)?;
        }
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q, mode)?;
            k = kn.forward(&k, mode)?;
        }
        let (hd, kvh) = (self.head_dim, self.kv_heads);
        let q = q.reshape((b, t, self.heads, hd))?.transpose(1, 2)?;
        let k = k.reshape((b, t, kvh, hd))?.transpose(1, 2)?;
        let v = v.reshape((b, t, kvh, hd))?.transpose(1, 2)?.contiguous()?;
        let per_row = matches!(cache, Some(LayerCache::Slots(..)));
        let (q, k) = match &cache {
            Some(LayerCache::Slots(_, _, tables)) => {
                (Rope::apply_rows(&q, tables)?, Rope::apply_rows(&k, tables)?)
            }
            _ => (rope.apply(&q, offset, mode)?, rope.apply(&k, offset, mode)?),
        };
        let (k, v) = match cache {
            Some(LayerCache::Shared(c, layer)) => c.append(layer, &k, &v)?,
            Some(LayerCache::Slots(c, layer, _)) => c.append(layer, &k, &v)?,
            None => (k.contiguous()?, v),
        };
        let len = k.dim(2)?;
        if blockwise(mode, x.device(), x.dtype(), t, offset) && !per_row {
            // Attention that keeps no (heads × t × t) probabilities for a backward pass
            // (super::attention); grouped keys and values are read per group, not copied.
            let out = super::attention::causal_attention(&q, &k, &v, 1.0 / (hd as f64).sqrt())?
                .transpose(1, 2)?;
            return self.o.forward(&out.reshape((b, t, self.heads * hd))?);
        }
        // Grouped-query attention without copying keys: the n_rep query heads that share a
        // key/value head are stacked along the query axis.
        let n_rep = self.heads / kvh;
        let q = q.contiguous()?.reshape((b, kvh, n_rep * t, hd))?;
        let dt = q.dtype();
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.to_dtype(upcast(dt))?;
        // The mask is (t, len) for rows that share positions, (b, 1, 1, t, len) per row.
        let scores = match mask {
            Some(m) => scores
                .reshape((b, kvh, n_rep, t, len))?
                .broadcast_add(m)?
                .reshape((b, kvh, n_rep * t, len))?,
            None => scores,
        };
        let p = softmax(&scores, mode)?.to_dtype(dt)?;
        let out = p
            .matmul(&v)?
            .reshape((b, self.heads, t, hd))?
            .transpose(1, 2)?;
        self.o.forward(&out.reshape((b, t, self.heads * hd))?)
    }
}

#[derive(Clone, Debug)]
struct Block {
    attn: Attention,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Pre-norm: before attention / MLP. Post-norm (OLMo-2): after them.
    norm1: Norm,
    norm2: Norm,
    post_norm: bool,
}

impl Block {
    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let h = super::fused::silu_mul(&self.gate.forward(x)?, &self.up.forward(x)?)?;
        self.down.forward(&h)
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        cache: Option<LayerCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        if self.post_norm {
            let a = self
                .norm1
                .forward(&self.attn.forward(x, rope, mask, cache, mode)?, mode)?;
            let h = (x + a)?;
            let m = self.norm2.forward(&self.mlp(&h)?, mode)?;
            Ok((h + m)?)
        } else {
            let a = self
                .attn
                .forward(&self.norm1.forward(x, mode)?, rope, mask, cache, mode)?;
            let h = (x + a)?;
            let m = self.mlp(&self.norm2.forward(&h, mode)?)?;
            Ok((h + m)?)
        }
    }
}

/// A Llama-family causal language model.
#[derive(Clone, Debug)]
pub struct Decoder {
    pub cfg: Config,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Norm,
    lm_head: Tensor,
    rope: Rope,
    mode: Mode,
    dtype: DType,
    device: Device,
}

/// Rows of logits computed at once when scoring (bounds memory at rows × vocab floats).
const LOGPROB_CHUNK: usize = 512;

impl Decoder {
    /// Build the decoder from named parameters with transformers' names
    /// (`model.layers.N.self_attn.q_proj.weight`, ...). Every shape is checked.
    pub fn new(
        cfg: &Config,
        src: &dyn Source,
        dtype: DType,
        device: &Device,
        mode: Mode,
    ) -> Result<Decoder> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let rms = |name: String, n: usize| -> Result<Norm> {
            Ok(Norm::Rms {
                weight: src.get(&name, &[n])?,
                eps: cfg.norm_eps,
            })
        };
        let plain = Norm::Plain { eps: 1e-5 };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let lin =
                |n: &str, out, inp, bias| Linear::load(src, &format!("{p}.{n}"), out, inp, bias);
            let (q_norm, k_norm) = if cfg.arch == Arch::Olmo2 {
                (
                    Some(rms(format!("{p}.self_attn.q_norm.weight"), qd)?),
                    Some(rms(format!("{p}.self_attn.k_norm.weight"), kvd)?),
                )
            } else {
                (None, None)
            };
            let attn = Attention {
                q: lin("self_attn.q_proj", qd, h, cfg.qkv_bias)?,
                k: lin("self_attn.k_proj", kvd, h, cfg.qkv_bias)?,
                v: lin("self_attn.v_proj", kvd, h, cfg.qkv_bias)?,
                o: lin("self_attn.o_proj", h, qd, cfg.o_bias)?,
                q_norm,
                k_norm,
                heads: cfg.num_heads,
                kv_heads: cfg.num_kv_heads,
                head_dim: hd,
                clip_qkv: cfg.clip_qkv,
            };
            let (norm1, norm2, post_norm) = match cfg.arch {
                Arch::Olmo => (plain.clone(), plain.clone(), false),
                Arch::Olmo2 => (
                    rms(format!("{p}.post_attention_layernorm.weight"), h)?,
                    rms(format!("{p}.post_feedforward_layernorm.weight"), h)?,
                    true,
                ),
                Arch::Llama | Arch::Qwen2 => (
                    rms(format!("{p}.input_layernorm.weight"), h)?,
                    rms(format!("{p}.post_attention_layernorm.weight"), h)?,
                    false,
                ),
            };
            blocks.push(Block {
                attn,
                gate: lin("mlp.gate_proj", cfg.intermediate_size, h, cfg.mlp_bias)?,
                up: lin("mlp.up_proj", cfg.intermediate_size, h, cfg.mlp_bias)?,
                down: lin("mlp.down_proj", h, cfg.intermediate_size, cfg.mlp_bias)?,
                norm1,
                norm2,
                post_norm,
            });
        }
        let embed = src.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let norm = if cfg.arch == Arch::Olmo {
            plain
        } else {
            rms("model.norm.weight".into(), h)?
        };
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            src.get("lm_head.weight", &[cfg.vocab_size, h])?
        };
        Ok(Decoder {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            rope: Rope::new(cfg, dtype, device)?,
            mode,
            dtype,
            device: device.clone(),
        })
    }

    /// Visit every projection of every layer by its transformers name
    /// (`model.layers.0.self_attn.q_proj`), e.g. to attach LoRA adapters.
    pub fn for_each_linear(
        &mut self,
        mut f: impl FnMut(&str, &mut Linear) -> Result<()>,
    ) -> Result<()> {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            f(&format!("{p}.self_attn.q_proj"), &mut b.attn.q)?;
            f(&format!("{p}.self_attn.k_proj"), &mut b.attn.k)?;
            f(&format!("{p}.self_attn.v_proj"), &mut b.attn.v)?;
            f(&format!("{p}.self_attn.o_proj"), &mut b.attn.o)?;
            f(&format!("{p}.mlp.gate_proj"), &mut b.gate)?;
            f(&format!("{p}.mlp.up_proj"), &mut b.up)?;
            f(&format!("{p}.mlp.down_proj"), &mut b.down)?;
        }
        Ok(())
    }

    /// Switch between fused inference kernels and differentiable ones.
    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The names of all parameters the decoder reads, with their shapes, in transformers' names.
    pub fn parameter_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
        let mut seen = Vec::new();
        struct Rec<'a>(std::cell::RefCell<&'a mut Vec<(String, Vec<usize>)>>);
        impl Source for Rec<'_> {
            fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
                self.0.borrow_mut().push((name.to_string(), shape.to_vec()));
                Ok(Tensor::zeros(1, DType::F32, &Device::Cpu)?)
            }
            fn contains(&self, _: &str) -> bool {
                true
            }
        }
        let rec = Rec(std::cell::RefCell::new(&mut seen));
        // Shapes are only recorded; the zero tensors are never used.
        let mut small = cfg.clone();
        small.max_position_embeddings = 1;
        let _ = Decoder::new(&small, &rec, DType::F32, &Device::Cpu, Mode::Infer);
        seen
    }

    /// Hidden states after the final norm, (b, t, hidden), for `ids` (b, t). With a cache the
    /// ids continue the cached positions, and the cache advances by t.
    pub fn forward_hidden(&self, ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            t,
            self.cfg.hidden_size,
        ))?;
        let mask = if t > 1 && !blockwise(self.mode, &self.device, self.dtype, t, offset) {
            Some(causal_mask(t, offset, upcast(self.dtype), &self.device)?)
        } else {
            None
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let c = cache.as_deref_mut().map(|c| LayerCache::Shared(c, i));
            x = block.forward(&x, &self.rope, mask.as_ref(), c, self.mode)?;
        }
        if let Some(c) = cache {
            c.len += t;
        }
        self.norm.forward(&x, self.mode)
    }

    /// An empty [`SlotCache`] for `rows` sequences of up to `cap` tokens each.
    pub fn slot_cache(&self, rows: usize, cap: usize) -> Result<SlotCache> {
        let c = &self.cfg;
        let shape = (rows, c.num_kv_heads, cap, c.head_dim);
        let kv = (0..c.num_layers)
            .map(|_| -> Result<(Tensor, Tensor)> {
                Ok((
                    Tensor::zeros(shape, self.dtype, &self.device)?,
                    Tensor::zeros(shape, self.dtype, &self.device)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(SlotCache {
            kv,
            cap,
            written: 0,
            starts: vec![0; rows],
        })
    }

    /// The keys and values of `ids` (all but a prefix's last token) at positions 0.., one
    /// (1, kv_heads, n, head_dim) pair per layer, for [`SlotCache::begin`].
    pub fn prefill(&self, ids: &[u32]) -> Result<Vec<(Tensor, Tensor)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut cache = KvCache::new(self.cfg.num_layers, ids.len());
        self.forward_hidden(
            &Tensor::new(ids, &self.device)?.unsqueeze(0)?,
            Some(&mut cache),
        )?;
        (0..self.cfg.num_layers)
            .map(|l| {
                cache
                    .filled(l)?
                    .ok_or_else(|| anyhow::anyhow!("internal: layer {l} left no keys"))
            })
            .collect()
    }

    /// One decoding step of independent sequences: `ids[r]` continues row r of `cache` at that
    /// row's own position. Hidden states after the final norm, (rows, hidden).
    pub fn forward_slots(&self, ids: &[u32], cache: &mut SlotCache) -> Result<Tensor> {
        let b = ids.len();
        if b != cache.rows() {
            bail!("internal: {b} ids for {} cache rows", cache.rows());
        }
        let positions = cache.positions();
        let limit = self.rope.cos.dim(0)?;
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= limit) {
            bail!(
                "position {} is past the {limit} positions this model supports",
                p + 1
            );
        }
        let tables = self
            .rope
            .rows(&Tensor::new(positions.as_slice(), &self.device)?)?;
        let mask = cache.mask(upcast(self.dtype), &self.device)?;
        let ids = Tensor::new(ids, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?.unsqueeze(1)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let c = LayerCache::Slots(&mut *cache, i, &tables);
            x = block.forward(&x, &self.rope, mask.as_ref(), Some(c), self.mode)?;
        }
        cache.written += 1;
        Ok(self.norm.forward(&x, self.mode)?.squeeze(1)?)
    }

    /// Token embeddings (b, t, hidden) of `ids` (b, t): the first stage of [`Self::forward_hidden`].
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            t,
            self.cfg.hidden_size,
        ))?)
    }

    /// The causal mask of a full (uncached) forward over t positions, if t > 1 and attention
    /// is not blockwise (which needs none).
    pub fn full_mask(&self, t: usize) -> Result<Option<Tensor>> {
        Ok(
            if t > 1 && !blockwise(self.mode, &self.device, self.dtype, t, 0) {
                Some(causal_mask(t, 0, upcast(self.dtype), &self.device)?)
            } else {
                None
            },
        )
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Decoder layer `i` over a full sequence (no cache): one stage of
    /// [`Self::forward_hidden`], for recomputation (gradient checkpointing).
    pub fn block(&self, i: usize, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.blocks[i].forward(x, &self.rope, mask, None, self.mode)
    }

    /// The final norm: the last stage of [`Self::forward_hidden`].
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x, self.mode)
    }

    /// The output projection's weight (vocab, hidden): the token embedding when tied.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// Logits (…, vocab) in f32 (f64 for an f64 model) for hidden states (…, hidden).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let lin = Linear {
            weight: self.lm_head.clone(),
            bias: None,
            lora: None,
        };
        Ok(lin.forward(hidden)?.to_dtype(upcast(self.dtype))?)
    }

    /// Logits at every position, (b, t, vocab).
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.logits(&self.forward_hidden(ids, cache)?)
    }

    /// log p(targets[i] | ·) for every row of `hidden` (n, hidden) and `targets` (n,), in
    /// chunks of rows so the vocabulary-sized logits never exist for all rows at once.
    /// Differentiable in [`Mode::Train`].
    pub fn target_logprobs(&self, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let n = hidden.dim(0)?;
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let len = LOGPROB_CHUNK.min(n - start);
            let logits = self.logits(&hidden.narrow(0, start, len)?)?;
            let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let tg = targets.narrow(0, start, len)?.unsqueeze(1)?;
            parts.push(lp.gather(&tg, 1)?.squeeze(1)?);
            start += len;
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Per-token log-probabilities of each sequence: (b, t-1), entry [r, i] = log p(ids[r, i+1]
    /// | ids[r, ..=i]). Right padding is harmless: padded positions come after every real one.
    pub fn sequence_logprobs(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t < 2 {
            return Ok(Tensor::zeros((b, 0), upcast(self.dtype), &self.device)?);
        }
        let h = self.forward_hidden(ids, None)?.narrow(1, 0, t - 1)?;
        let h = h
            .contiguous()?
            .reshape((b * (t - 1), self.cfg.hidden_size))?;
        let targets = ids.narrow(1, 1, t - 1)?.contiguous()?.flatten_all()?;
        Ok(self.target_logprobs(&h, &targets)?.reshape((b, t - 1))?)
    }
}

/// Whether attention over t new positions after `offset` cached ones runs as the causal op of
/// super::attention, without a mask tensor (a (t × t) mask is 268 MB at 8192 tokens): on the
/// CPU its kernel, for training and for f32/f64 inference (half types keep transformers'
/// rounding of the probabilities before P·V); on CUDA, training over a whole sequence.
fn blockwise(mode: Mode, device: &Device, dtype: DType, t: usize, offset: usize) -> bool {
    if t <= 1 {
        return false;
    }
    if device.is_cpu() {
        mode == Mode::Train || matches!(dtype, DType::F32 | DType::F64)
    } else {
        mode == Mode::Train && device.is_cuda() && offset == 0
    }
}

/// Additive causal mask (t, offset + t): 0 where query i may see key j, -inf elsewhere.
pub fn causal_mask(t: usize, offset: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..t + offset).map(move |j| {
                if j <= i + offset {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(m, (t, t + offset), device)?.to_dtype(dtype)?)
}
