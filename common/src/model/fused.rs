//! Fused, threaded CPU kernels for the decoder's elementwise hot paths, each with its own
//! backward pass: candle's elementwise ops run one pass (and one allocation) per operation on
//! one thread, and its fused `rms_norm`/`rope` kernels have no backward.
//!
//! - [`silu_mul`]: `silu(g) · u`, the gated MLP's product (one pass instead of four).
//! - [`rms_norm`]: transformers' `LlamaRMSNorm`: statistics in f32 (f64 for f64), the
//!   normalised value rounded to the input type, then times the weight.
//! - [`rope`]: rotary embedding (the non-interleaved halves of transformers' `rotate_half`);
//!   its backward is the inverse rotation.
//!
//! - [`nll_grad`]: the next-token loss of a chunk of logits and its gradient, for cf-train's
//!   chunked vocabulary loss (model::vocab_loss); no backward of its own (it is the backward).
//!
//! Each works on f32 and f64 natively (the first three on bf16/f16 through f32), over rows in parallel
//! (rayon's pool, the threads candle's own kernels use). On other devices the callers keep
//! candle's composition (the same values): these are CPU kernels.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use half::{bf16, f16};
use num_traits::Float;
use rayon::prelude::*;

type R<T> = candle_core::Result<T>;

fn err<T>(m: impl Into<String>) -> R<T> {
    Err(candle_core::Error::Msg(m.into()))
}

/// The contiguous elements of a CPU storage, as f32 or f64 working copies (bf16/f16
/// converted) or borrowed slices.
pub(crate) enum Data<'a> {
    F32(std::borrow::Cow<'a, [f32]>),
    F64(&'a [f64]),
}

pub(crate) fn data<'a>(s: &'a CpuStorage, l: &Layout) -> R<Data<'a>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        return err("fused op: a non-contiguous input");
    };
    Ok(match s {
        CpuStorage::F32(v) => Data::F32(std::borrow::Cow::Borrowed(&v[a..b])),
        CpuStorage::F64(v) => Data::F64(&v[a..b]),
        CpuStorage::BF16(v) => Data::F32(v[a..b].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F16(v) => Data::F32(v[a..b].iter().map(|x| x.to_f32()).collect()),
        _ => return err("fused op: a float input is needed"),
    })
}

/// A computed f32 result back in the storage type `dt` (rounded for bf16/f16).
pub(crate) fn store32(v: Vec<f32>, dt: DType) -> R<CpuStorage> {
    Ok(match dt {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        _ => return err("fused op: unexpected dtype"),
    })
}

/// Rounds an f32 the way storing it in `dt` and reading it back does.
fn round_to(x: f32, dt: DType) -> f32 {
    match dt {
        DType::BF16 => bf16::from_f32(x).to_f32(),
        DType::F16 => f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// Rows per parallel task: enough work per task to amortise the scheduling.
fn chunk_rows(d: usize) -> usize {
    (16384 / d.max(1)).max(1)
}

// ---------------------------------------------------------------------------------------------
// silu(g) · u

struct SiluMul;

fn silu_mul_k<T: Float + Send + Sync>(g: &[T], u: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); g.len()];
    out.par_chunks_mut(16384)
        .zip(g.par_chunks(16384).zip(u.par_chunks(16384)))
        .for_each(|(o, (g, u))| {
            for i in 0..o.len() {
                o[i] = g[i] / (T::one() + (-g[i]).exp()) * u[i];
            }
        });
    out
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "cf-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let shape = l1.shape().clone();
        let dt = s1.dtype();
        let out = match (data(s1, l1)?, data(s2, l2)?) {
            (Data::F64(g), Data::F64(u)) => CpuStorage::F64(silu_mul_k(g, u)),
            (Data::F32(g), Data::F32(u)) => store32(silu_mul_k(&g, &u), dt)?,
            _ => return err("silu_mul: mixed dtypes"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>)> {
        let go = grad.detach().contiguous()?;
        let n = g.elem_count();
        let both = g
            .detach()
            .apply_op3_no_bwd(&u.detach(), &go, &SiluMulGrad)?;
        let dg = both.narrow(0, 0, n)?.reshape(g.shape())?;
        let du = both.narrow(0, n, n)?.reshape(u.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

/// The gradient of silu(g)·u in one pass: with s = σ(g), ∂/∂g = go·u·s·(1 + g(1 − s)) and
/// ∂/∂u = go·g·s. Returned as one buffer: ∂/∂g, then ∂/∂u.
struct SiluMulGrad;

fn silu_mul_grad_k<T: Float + Send + Sync>(g: &[T], u: &[T], go: &[T]) -> Vec<T> {
    let len = g.len();
    let mut out = vec![T::zero(); 2 * len];
    let (dg, du) = out.split_at_mut(len);
    let n = 16384;
    dg.par_chunks_mut(n)
        .zip(du.par_chunks_mut(n))
        .enumerate()
        .for_each(|(c, (dg, du))| {
            let base = c * n;
            for i in 0..dg.len() {
                let (g, u, go) = (g[base + i], u[base + i], go[base + i]);
                let s = T::one() / (T::one() + (-g).exp());
                dg[i] = go * u * s * (T::one() + g * (T::one() - s));
                du[i] = go * g * s;
            }
        });
    out
}

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "cf-silu-mul-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let dt = s1.dtype();
        let len = 2 * l1.shape().elem_count();
        let out = match (data(s1, l1)?, data(s2, l2)?, data(s3, l3)?) {
            (Data::F64(g), Data::F64(u), Data::F64(go)) => {
                CpuStorage::F64(silu_mul_grad_k(g, u, go))
            }
            (Data::F32(g), Data::F32(u), Data::F32(go)) => {
                store32(silu_mul_grad_k(&g, &u, &go), dt)?
            }
            _ => return err("silu_mul: mixed dtypes"),
        };
        Ok((out, Shape::from(len)))
    }
}

/// `silu(g) · u`, differentiable in both. A fused threaded kernel on the CPU, candle's two
/// operations elsewhere.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    if !g.device().is_cpu() || g.shape() != u.shape() || g.dtype() != u.dtype() {
        return g.silu()? * u;
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, SiluMul)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

struct RmsNorm {
    eps: f64,
}

/// Per row: r = 1/sqrt(mean(x²) + eps), y = round(x·r) · w.
fn rms_fwd_k<T: Float + Send + Sync>(
    x: &[T],
    w: &[T],
    eps: f64,
    dt: DType,
    round: fn(T, DType) -> T,
) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::zero(); x.len()];
    let eps = T::from(eps).unwrap();
    let n = T::from(d).unwrap();
    let cr = chunk_rows(d);
    out.par_chunks_mut(cr * d)
        .zip(x.par_chunks(cr * d))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_mut(d).zip(x.chunks(d)) {
                let ms = x.iter().fold(T::zero(), |a, &v| a + v * v) / n;
                let r = T::one() / (ms + eps).sqrt();
                for j in 0..d {
                    o[j] = round(x[j] * r, dt) * w[j];
                }
            }
        });
    out
}

/// dx = r·(dn − x̂·mean(dn·x̂)) with dn = go·w and x̂ = x·r, per row; dw = Σ_rows go·round(x̂).
/// Returned as one buffer: dx (x's elements) then dw (d elements).
fn rms_bwd_k<T: Float + Send + Sync>(
    x: &[T],
    w: &[T],
    go: &[T],
    eps: f64,
    dt: DType,
    round: fn(T, DType) -> T,
) -> Vec<T> {
    let d = w.len();
    let eps = T::from(eps).unwrap();
    let n = T::from(d).unwrap();
    let cr = chunk_rows(d);
    let mut dx = vec![T::zero(); x.len()];
    let dw = dx
        .par_chunks_mut(cr * d)
        .zip(x.par_chunks(cr * d).zip(go.par_chunks(cr * d)))
        .map(|(o, (x, go))| {
            let mut dw = vec![T::zero(); d];
            for (o, (x, go)) in o.chunks_mut(d).zip(x.chunks(d).zip(go.chunks(d))) {
                let ms = x.iter().fold(T::zero(), |a, &v| a + v * v) / n;
                let r = T::one() / (ms + eps).sqrt();
                let mut dot = T::zero();
                for j in 0..d {
                    let xh = x[j] * r;
                    dot = dot + go[j] * w[j] * xh;
                    dw[j] = dw[j] + go[j] * round(xh, dt);
                }
                let m = dot / n;
                for j in 0..d {
                    o[j] = r * (go[j] * w[j] - x[j] * r * m);
                }
            }
            dw
        })
        .reduce(
            || vec![T::zero(); d],
            |mut a, b| {
                for (a, b) in a.iter_mut().zip(b) {
                    *a = *a + b;
                }
                a
            },
        );
    dx.extend(dw);
    dx
}

fn no_round64(x: f64, _: DType) -> f64 {
    x
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "cf-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let shape = l1.shape().clone();
        let dt = s1.dtype();
        let out = match (data(s1, l1)?, data(s2, l2)?) {
            (Data::F64(x), Data::F64(w)) => {
                CpuStorage::F64(rms_fwd_k(x, w, self.eps, dt, no_round64))
            }
            (Data::F32(x), Data::F32(w)) => store32(rms_fwd_k(&x, &w, self.eps, dt, round_to), dt)?,
            _ => return err("rms_norm: mixed dtypes"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>)> {
        let go = grad.detach().contiguous()?;
        let both = x
            .detach()
            .apply_op3_no_bwd(&w.detach(), &go, &RmsNormGrad { eps: self.eps })?;
        let n = x.elem_count();
        let dx = both.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = both.narrow(0, n, w.elem_count())?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

struct RmsNormGrad {
    eps: f64,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "cf-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let dt = s1.dtype();
        let len = l1.shape().elem_count() + l2.shape().elem_count();
        let out = match (data(s1, l1)?, data(s2, l2)?, data(s3, l3)?) {
            (Data::F64(x), Data::F64(w), Data::F64(go)) => {
                CpuStorage::F64(rms_bwd_k(x, w, go, self.eps, dt, no_round64))
            }
            (Data::F32(x), Data::F32(w), Data::F32(go)) => {
                store32(rms_bwd_k(&x, &w, &go, self.eps, dt, round_to), dt)?
            }
            _ => return err("rms_norm: mixed dtypes"),
        };
        Ok((out, Shape::from(len)))
    }
}

/// transformers' RMSNorm of x (…, d) with weight w (d), differentiable in both. A fused
/// threaded kernel on the CPU; `None` elsewhere (the caller composes candle's operations).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Option<Tensor>> {
    if !x.device().is_cpu()
        || x.dtype() != w.dtype()
        || x.dim(candle_core::D::Minus1)? != w.elem_count()
    {
        return Ok(None);
    }
    Ok(Some(
        x.contiguous()?
            .apply_op2(&w.contiguous()?, RmsNorm { eps })?,
    ))
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding

/// x (b, h, t, d) rotated by the angles of cos/sin (t, d/2); `inverse` rotates back (the
/// backward pass of the rotation).
struct Rope {
    inverse: bool,
}

fn rope_k<T: Float + Send + Sync>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    t: usize,
    d: usize,
    inverse: bool,
) -> Vec<T> {
    let half = d / 2;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(t * d)
        .zip(x.par_chunks(t * d))
        .for_each(|(o, x)| {
            for p in 0..t {
                let (o, x) = (&mut o[p * d..(p + 1) * d], &x[p * d..(p + 1) * d]);
                let (c, s) = (
                    &cos[p * half..(p + 1) * half],
                    &sin[p * half..(p + 1) * half],
                );
                for i in 0..half {
                    let s = if inverse { -s[i] } else { s[i] };
                    let (a, b) = (x[i], x[i + half]);
                    o[i] = a * c[i] - b * s;
                    o[i + half] = b * c[i] + a * s;
                }
            }
        });
    out
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "cf-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let shape = l1.shape().clone();
        let dims = shape.dims();
        let (t, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let dt = s1.dtype();
        let out = match (data(s1, l1)?, data(s2, l2)?, data(s3, l3)?) {
            (Data::F64(x), Data::F64(c), Data::F64(s)) => {
                CpuStorage::F64(rope_k(x, c, s, t, d, self.inverse))
            }
            (Data::F32(x), Data::F32(c), Data::F32(s)) => {
                store32(rope_k(&x, &c, &s, t, d, self.inverse), dt)?
            }
            _ => return err("rope: mixed dtypes"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.detach().contiguous()?.apply_op3_no_bwd(
            &cos.detach(),
            &sin.detach(),
            &Rope {
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// Rotary embedding of x (b, h, t, d) with cos/sin (t, d/2), differentiable in x. A fused
/// threaded kernel on the CPU; `None` elsewhere.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let dims = x.dims();
    if !x.device().is_cpu()
        || dims.len() != 4
        || x.dtype() != cos.dtype()
        || cos.dims() != [dims[2], dims[3] / 2]
        || sin.dims() != cos.dims()
        || dims[3] % 2 != 0
    {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { inverse: false },
    )?))
}

// ---------------------------------------------------------------------------------------------
// The next-token loss of a chunk of rows, and its gradient

fn nll_grad_k<T: Float + Send + Sync>(
    z: &[T],
    vocab: usize,
    targets: &[u32],
    scale: &[f64],
) -> R<(Vec<f32>, Vec<T>)> {
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        return err(format!(
            "nll: target {t} is outside the vocabulary of {vocab}"
        ));
    }
    let mut dz = vec![T::zero(); z.len()];
    let mut values = vec![0f32; targets.len()];
    dz.par_chunks_mut(vocab)
        .zip(z.par_chunks(vocab))
        .zip(values.par_iter_mut())
        .enumerate()
        .for_each(|(r, ((o, z), value))| {
            let t = targets[r] as usize;
            let max = z.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
            // Summed in the row's type, in order, as candle's softmax does (the gradients then
            // round as the plain path's do).
            let mut sum = T::zero();
            for (o, &x) in o.iter_mut().zip(z) {
                *o = (x - max).exp();
                sum = sum + *o;
            }
            // ln(sum) − (z_t − max): exact for a confident token, where max + ln(sum) − z_t
            // would round ln(sum) at max's size.
            *value = (sum.ln() - (z[t] - max)).to_f32().unwrap_or(f32::NAN);
            let s = T::from(scale[r]).unwrap_or_else(T::nan);
            let inv = T::one() / sum;
            for o in o.iter_mut() {
                *o = *o * inv * s;
            }
            o[t] = o[t] - s;
        });
    Ok((values, dz))
}

/// For logits z (rows, vocab), each row's target id and scale: −log softmax(z)[target] per row,
/// and (softmax(z) − onehot(target))·scale, the gradient of Σ scale·NLL, in one task per row
/// over rows in parallel (candle's log_softmax, exp, one-hot scatter, subtraction and scaling
/// are nine passes over all rows, each allocating). None where z is not a CPU f32/f64 tensor (the caller composes).
pub fn nll_grad(z: &Tensor, targets: &[u32], scale: &[f64]) -> R<Option<(Vec<f32>, Tensor)>> {
    if !z.device().is_cpu() || !matches!(z.dtype(), DType::F32 | DType::F64) || z.rank() != 2 {
        return Ok(None);
    }
    let (rows, vocab) = z.dims2()?;
    if targets.len() != rows || scale.len() != rows {
        return err("nll: one target and one scale per row are needed");
    }
    if rows == 0 || vocab == 0 {
        return Ok(None);
    }
    let z = z.contiguous()?;
    let (st, l) = z.storage_and_layout();
    let candle_core::Storage::Cpu(c) = &*st else {
        return Ok(None);
    };
    let dev = candle_core::Device::Cpu;
    Ok(Some(match data(c, l)? {
        Data::F64(x) => {
            let (v, g) = nll_grad_k(x, vocab, targets, scale)?;
            (v, Tensor::from_vec(g, (rows, vocab), &dev)?)
        }
        Data::F32(x) => {
            let (v, g) = nll_grad_k(&x, vocab, targets, scale)?;
            (v, Tensor::from_vec(g, (rows, vocab), &dev)?)
        }
    }))
}

// ---------------------------------------------------------------------------------------------
// Scoring: per-row log-probabilities of a target and the exact KL between two distributions

/// One row's log softmax(zm)[t], log softmax(zb)[t] and KL(softmax(zb) ‖ softmax(zm)), f32
/// logits: the exponentials by [`super::flash::exp32`], every sum in f64 lanes.
///
/// With each row shifted by its maximum (z' = z − max z, exact), log softmax(z) = z' − ln Σ e^z'
/// and KL = Σ pb·(zb' − zm') − (ln Σ e^zb' − ln Σ e^zm'): no term is of the logits' size, so a
/// small KL between rows of large logits survives, and two equal rows give exactly 0. An entry
/// where zb = −∞ adds nothing (pb = 0 there); zm = −∞ where pb > 0 gives +∞.
#[inline(always)]
fn score_row32(zm: &[f32], zb: Option<&[f32]>, t: usize) -> [f64; 3] {
    let max = |z: &[f32]| {
        z.iter()
            .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
    };
    // ln Σ e^(z − m), summed as the loop with the base row below sums, so that equal rows
    // give equal sums.
    let ln_sum = |z: &[f32], m: f32| {
        let mut lanes = [0f64; 8];
        let mut c = z.chunks_exact(8);
        for c in &mut c {
            for (&x, l) in c.iter().zip(&mut lanes) {
                *l += super::flash::exp32(x - m) as f64;
            }
        }
        let mut s: f64 = lanes.iter().sum();
        for &x in c.remainder() {
            s += super::flash::exp32(x - m) as f64;
        }
        s.ln()
    };
    let mm = max(zm);
    let lm = ln_sum(zm, mm);
    let own = (zm[t] - mm) as f64 - lm;
    let Some(zb) = zb else {
        return [own, 0.0, 0.0];
    };
    let mb = max(zb);
    let (mut sum, mut dot) = ([0f64; 8], [0f64; 8]);
    let term = |b: f32, m: f32| {
        let e = super::flash::exp32(b - mb);
        // The shifted difference in f64: in f32 it would round at the logits' size (~1e-6),
        // a floor under small KLs.
        let d = if b == f32::NEG_INFINITY {
            0.0
        } else {
            e as f64 * ((b as f64 - mb as f64) - (m as f64 - mm as f64))
        };
        (e as f64, d)
    };
    let (mut cb, mut cm) = (zb.chunks_exact(8), zm.chunks_exact(8));
    for (b8, m8) in (&mut cb).zip(&mut cm) {
        for i in 0..8 {
            let (e, d) = term(b8[i], m8[i]);
            sum[i] += e;
            dot[i] += d;
        }
    }
    let (mut s, mut d): (f64, f64) = (sum.iter().sum(), dot.iter().sum());
    for (&b, &m) in cb.remainder().iter().zip(cm.remainder()) {
        let (e, x) = term(b, m);
        s += e;
        d += x;
    }
    let lb = s.ln();
    [own, (zb[t] - mb) as f64 - lb, d / s - (lb - lm)]
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn score_row32_avx2(zm: &[f32], zb: Option<&[f32]>, t: usize) -> [f64; 3] {
    score_row32(zm, zb, t)
}

/// [`score_row32`], compiled for AVX2 where the CPU has it.
fn score_row32_best(zm: &[f32], zb: Option<&[f32]>, t: usize) -> [f64; 3] {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { score_row32_avx2(zm, zb, t) };
    }
    score_row32(zm, zb, t)
}

/// [`score_row32`] in f64 (libm's exp).
fn score_row64(zm: &[f64], zb: Option<&[f64]>, t: usize) -> [f64; 3] {
    let max = |z: &[f64]| z.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x));
    let ln_sum = |z: &[f64], m: f64| z.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
    let mm = max(zm);
    let lm = ln_sum(zm, mm);
    let own = (zm[t] - mm) - lm;
    let Some(zb) = zb else {
        return [own, 0.0, 0.0];
    };
    let mb = max(zb);
    let (mut s, mut d) = (0.0, 0.0);
    for (&b, &m) in zb.iter().zip(zm) {
        let e = (b - mb).exp();
        s += e;
        // pb = 0 (b = −∞, or underflow) adds nothing, even where zm = −∞.
        if e > 0.0 {
            d += e * ((b - mb) - (m - mm));
        }
    }
    let lb = s.ln();
    [own, (zb[t] - mb) - lb, d / s - (lb - lm)]
}

/// For model logits `zm` (rows, vocab), optionally the base model's `zb` (same shape), and
/// each row's target id: per row [log pθ(target), log p0(target), KL(p0 ‖ pθ)] in f64 (the
/// last two 0 without `zb`), rows in parallel, each row read two or three times by one task
/// (candle's log_softmax, exp, subtraction, product, sum and gathers are a dozen
/// single-threaded, allocating passes over all rows). None where the logits are not CPU f32/f64 (the caller
/// composes).
pub fn score_rows(zm: &Tensor, zb: Option<&Tensor>, targets: &[u32]) -> R<Option<Vec<[f64; 3]>>> {
    let cpu = |z: &Tensor| z.device().is_cpu() && matches!(z.dtype(), DType::F32 | DType::F64);
    if !cpu(zm) || zm.rank() != 2 || zb.is_some_and(|zb| !cpu(zb) || zb.dtype() != zm.dtype()) {
        return Ok(None);
    }
    let (rows, vocab) = zm.dims2()?;
    if zb.is_some_and(|zb| zb.dims() != zm.dims()) {
        return err("score: the two models' logits differ in shape");
    }
    if targets.len() != rows {
        return err("score: one target per row is needed");
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        return err(format!(
            "score: target {t} is outside the vocabulary of {vocab}"
        ));
    }
    let (zm, zb) = (zm.contiguous()?, zb.map(|z| z.contiguous()).transpose()?);
    let (sm, lm) = zm.storage_and_layout();
    let b = zb.as_ref().map(|z| z.storage_and_layout());
    let candle_core::Storage::Cpu(cm) = &*sm else {
        return Ok(None);
    };
    let cb = match &b {
        Some((s, l)) => match &**s {
            candle_core::Storage::Cpu(c) => Some((c, *l)),
            _ => return Ok(None),
        },
        None => None,
    };
    let two_types = || err("score: logits of two types");
    Ok(Some(
        match (data(cm, lm)?, cb.map(|(c, l)| data(c, l)).transpose()?) {
            (Data::F32(m), None) => per_row(&m, None, vocab, targets, score_row32_best),
            (Data::F32(m), Some(Data::F32(b))) => {
                per_row(&m, Some(&b), vocab, targets, score_row32_best)
            }
            (Data::F64(m), None) => per_row(m, None, vocab, targets, score_row64),
            (Data::F64(m), Some(Data::F64(b))) => per_row(m, Some(b), vocab, targets, score_row64),
            _ => return two_types(),
        },
    ))
}

/// `f` over the rows of `m` (and `b`), each `vocab` long, with each row's target; rows in
/// parallel.
fn per_row<T: Sync>(
    m: &[T],
    b: Option<&[T]>,
    vocab: usize,
    targets: &[u32],
    f: impl Fn(&[T], Option<&[T]>, usize) -> [f64; 3] + Sync,
) -> Vec<[f64; 3]> {
    (0..targets.len())
        .into_par_iter()
        .map(|r| {
            let row = r * vocab..(r + 1) * vocab;
            f(&m[row.clone()], b.map(|b| &b[row]), targets[r] as usize)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// log softmax by candle's composition in f64, the kernel's reference.
    fn reference(zm: &[Vec<f64>], zb: &[Vec<f64>], t: &[u32]) -> Vec<[f64; 3]> {
        let lsm = |z: &[Vec<f64>]| {
            let v = z[0].len();
            let z = Tensor::from_vec(z.concat(), (z.len(), v), &Device::Cpu).unwrap();
            candle_nn::ops::log_softmax(&z, D::Minus1)
                .unwrap()
                .to_vec2::<f64>()
                .unwrap()
        };
        let (lm, lb) = (lsm(zm), lsm(zb));
        (0..t.len())
            .map(|r| {
                let kl = lb[r]
                    .iter()
                    .zip(&lm[r])
                    .filter(|(b, _)| b.is_finite())
                    .map(|(b, m)| b.exp() * (b - m))
                    .sum();
                [lm[r][t[r] as usize], lb[r][t[r] as usize], kl]
            })
            .collect()
    }

    /// Rows that test the kernel's edges: ordinary, offset by 1e4, a confident row, −∞
    /// entries in the base row, two equal rows (KL exactly 0), and two rows 1/64 apart in one
    /// entry (a small KL, checked relative to its size).
    fn rows(v: usize) -> (Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<u32>) {
        let wave = |a: f64, b: f64| -> Vec<f64> {
            (0..v)
                .map(|i| ((i as f64 * a).sin() * b).round() / 64.0)
                .collect()
        };
        let mut zm = vec![
            wave(0.37, 300.0),
            wave(0.11, 200.0),
            wave(0.5, 100.0),
            wave(0.9, 250.0),
            wave(0.7, 150.0),
        ];
        let mut zb = vec![
            wave(0.41, 280.0),
            wave(0.13, 220.0),
            wave(0.5, 90.0),
            wave(0.9, 250.0),
            wave(0.7, 150.0),
        ];
        zb[4][2] += 1.0 / 64.0;
        zm[1].iter_mut().for_each(|x| *x += 1e4);
        zb[1].iter_mut().for_each(|x| *x -= 1e4);
        zm[2][5] = 40.0;
        zb[2][5] = 41.0;
        zb[0][3] = f64::NEG_INFINITY;
        zb[0][v - 2] = f64::NEG_INFINITY;
        (zm, zb, vec![7, 0, 5, (v - 1) as u32, 1])
    }

    #[test]
    fn scores_match_the_composition() {
        let dev = Device::Cpu;
        for v in [8, 37, 1000] {
            let (zm, zb, t) = rows(v);
            let want = reference(&zm, &zb, &t);
            let n = zm.len();
            for dt in [DType::F64, DType::F32] {
                let tensor = |z: &[Vec<f64>]| {
                    Tensor::from_vec(z.concat(), (n, v), &dev)
                        .unwrap()
                        .to_dtype(dt)
                        .unwrap()
                };
                let (tm, tb) = (tensor(&zm), tensor(&zb));
                let got = score_rows(&tm, Some(&tb), &t).unwrap().unwrap();
                let alone = score_rows(&tm, None, &t).unwrap().unwrap();
                // Inputs are multiples of 1/64, exact in f32: the f32 kernel differs only by
                // its exponential (2 ulp) and its f32 products.
                let tol = if dt == DType::F64 { 1e-12 } else { 2e-6 };
                for r in 0..n {
                    for k in 0..3 {
                        let (g, w) = (got[r][k], want[r][k]);
                        assert!(
                            (g - w).abs() <= tol * w.abs().max(1.0),
                            "{dt:?} v{v} row {r} [{k}]: {g} vs {w}"
                        );
                    }
                    assert_eq!(alone[r], [got[r][0], 0.0, 0.0]);
                }
                assert_eq!(got[3][2], 0.0, "equal rows: KL exactly 0");
                let (g, w) = (got[4][2], want[4][2]);
                // f64 relative to the KL; f32 within the exponentials' error in the two
                // log-normalisers (2 ulp, about 1e-7), which no longer carry the logits' size.
                let tol = if dt == DType::F64 { 1e-9 * w } else { 1e-7 };
                assert!(
                    w > 1e-8 && (g - w).abs() <= tol,
                    "{dt:?} v{v} small KL: {g} vs {w}"
                );
                assert!(got[0][2] > 0.01, "different rows: KL > 0");
                assert!(score_rows(&tm, Some(&tb), &[0, 0, 0, v as u32, 0]).is_err());
            }
        }
    }
}
