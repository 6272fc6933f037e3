//! Sampling on the device: per decoding step one uniform per row goes in and one (token,
//! log-probability) pair per row comes out; the vocabulary-sized work stays where the logits
//! are.
//!
//! The semantics are [`crate::generate::choose`]'s, computed in f64 like it: temperature, then
//! top-k, top-p and min-p (vLLM's meanings and order), then the inverse CDF over the kept
//! tokens in id order with the row's uniform, so a row draws the same token from the same
//! uniform as the host sampler (up to rounding at a CDF boundary). Candle has no sort for a
//! 128k vocabulary on CUDA and its cumsum is a matmul with a triangular matrix, so:
//! - top-k and top-p become a threshold on the tempered logits, found by bisection: 64 halvings
//!   of the range from the row's maximum down to 800 below it (below that a token's probability
//!   is 0 in f64), which separates any two distinct f32 logits; logits tied at the cut are all
//!   kept, on the host too (vLLM's top-k rule);
//! - the inverse CDF is searched in two levels: sums of blocks of 256 ids, the block, then the
//!   id inside it.

use crate::generate::SamplingParams;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

/// Ids per block of the two-level CDF search.
const BLOCK: usize = 256;
/// Halvings of the logit range when searching a top-k or top-p threshold.
const HALVINGS: usize = 64;

/// `i` as f64 for every column: (1, n).
fn arange(n: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::arange(0u32, n as u32, device)?
        .to_dtype(DType::F64)?
        .unsqueeze(0)?)
}

/// Per row of `mask` (rows, n), the first column set (n where none).
fn first_where(mask: &Tensor) -> Result<Tensor> {
    let (rows, n) = mask.dims2()?;
    let dev = mask.device();
    let idx = arange(n, dev)?.broadcast_as((rows, n))?;
    let none = Tensor::full(n as f64, (rows, n), dev)?;
    Ok(mask.where_cond(&idx, &none)?.min_keepdim(1)?)
}

/// Per row of `mask` (rows, n), the last column set (0 where none).
fn last_where(mask: &Tensor) -> Result<Tensor> {
    let (rows, n) = mask.dims2()?;
    let dev = mask.device();
    let idx = arange(n, dev)?.broadcast_as((rows, n))?;
    let none = Tensor::zeros((rows, n), DType::F64, dev)?;
    Ok(mask.where_cond(&idx, &none)?.max_keepdim(1)?)
}

/// Per row, how many of the running sums `sums` (rows, n) are at most `limit` (rows, 1): the
/// index of the first one above it (inclusive prefix sums, so the inverse CDF's pick).
fn count_at_most(sums: &Tensor, limit: &Tensor) -> Result<Tensor> {
    Ok(sums
        .broadcast_le(limit)?
        .to_dtype(DType::F64)?
        .sum_keepdim(1)?)
}

/// The largest threshold τ (per row) with `holds(x ≥ τ)`, where `holds` is monotone: true at
/// τ = min x. `x` (rows, vocab) f64; returns (rows, 1).
fn threshold(
    x: &Tensor,
    lo: &Tensor,
    hi: &Tensor,
    holds: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (mut lo, mut hi) = (lo.clone(), hi.clone());
    for _ in 0..HALVINGS {
        let mid = ((&lo + &hi)? * 0.5)?;
        let kept = x.broadcast_ge(&mid)?;
        let ok = holds(&kept)?;
        lo = ok.where_cond(&mid, &lo)?;
        hi = ok.where_cond(&hi, &mid)?;
    }
    // `lo` satisfies the condition and is within rounding of the kept set's smallest logit.
    Ok(lo)
}

/// Draw one token per row of `logits` (rows, vocab), row r with uniform `uniforms[r]` in
/// [0, 1) (unused when greedy). Returns (token, log p(token)) per row under the untempered
/// model. Errors when a row has a non-finite logit.
pub fn draw(logits: &Tensor, uniforms: &[f64], p: &SamplingParams) -> Result<Vec<(u32, f64)>> {
    let dev = logits.device();
    let (rows, vocab) = logits.dims2()?;
    if uniforms.len() != rows {
        bail!("internal: {} uniforms for {rows} rows", uniforms.len());
    }
    let l = logits.to_dtype(DType::F64)?;
    let max = l.max_keepdim(1)?;
    let lse = (max.clone() + l.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()?)?;
    // Any NaN or infinity makes the row's sum non-finite.
    let check = l.sum_keepdim(1)?;
    let token = if p.temperature == 0.0 {
        // The first maximum, as the host's argmax.
        first_where(&l.broadcast_eq(&max)?)?
    } else {
        let x = (&l / p.temperature)?;
        let xmax = (&max / p.temperature)?;
        // exp(x − max x): the tempered probabilities times their normaliser.
        let e = x.broadcast_sub(&xmax)?.exp()?;
        let mut keep: Option<Tensor> = None;
        let both = |a: Option<Tensor>, b: Tensor| -> Result<Option<Tensor>> {
            Ok(Some(match a {
                Some(a) => (a * b)?,
                None => b,
            }))
        };
        if p.top_k.is_some() || p.top_p.is_some() {
            // Tokens more than 800 below the maximum have probability 0: a threshold below
            // them keeps nothing that can be drawn, so the search starts there.
            let lo = x.min_keepdim(1)?.maximum(&(&xmax - 800.0)?)?;
            if let Some(k) = p.top_k.filter(|&k| k < vocab) {
                // Largest τ with at least k logits ≥ τ.
                let tau = threshold(&x, &lo, &xmax, |kept| {
                    Ok(kept.to_dtype(DType::F64)?.sum_keepdim(1)?.ge(k as f64)?)
                })?;
                keep = both(keep, x.broadcast_ge(&tau)?.to_dtype(DType::F64)?)?;
            }
            if let Some(top_p) = p.top_p.filter(|&q| q < 1.0) {
                // Largest τ whose tokens ≥ τ carry at least top_p of the mass.
                let z = e.sum_keepdim(1)?;
                let tau = threshold(&x, &lo, &xmax, |kept| {
                    let mass = (kept.to_dtype(DType::F64)? * &e)?.sum_keepdim(1)?;
                    Ok(mass.ge(&(&z * top_p)?)?)
                })?;
                keep = both(keep, x.broadcast_ge(&tau)?.to_dtype(DType::F64)?)?;
            }
        }
        if let Some(min_p) = p.min_p.filter(|&m| m > 0.0) {
            keep = both(keep, e.ge(min_p)?.to_dtype(DType::F64)?)?;
        }
        let w = match keep {
            Some(k) => (e * k)?,
            None => e,
        };
        // Inverse CDF: the first id whose running sum exceeds u·z.
        let u = Tensor::from_slice(uniforms, (rows, 1), dev)?;
        let target = (w.sum_keepdim(1)? * u)?;
        let nb = vocab.div_ceil(BLOCK);
        let w = w.pad_with_zeros(1, 0, nb * BLOCK - vocab)?;
        let w3 = w.reshape((rows, nb, BLOCK))?;
        let blocks = w3.sum(2)?;
        let before = blocks.cumsum(D::Minus1)?;
        // The block: how many blocks end at or below the target, but never past the last
        // block with mass (rounding at the very end).
        let block = count_at_most(&before, &target)?.minimum(&last_where(&blocks.gt(0.0)?)?)?;
        // The mass before the block, from the same running sums that chose it.
        let ends_before = Tensor::cat(
            &[
                &Tensor::zeros((rows, 1), DType::F64, dev)?,
                &before.narrow(1, 0, nb - 1)?,
            ],
            1,
        )?;
        let prev = ends_before.gather(&block.to_dtype(DType::U32)?, 1)?;
        let sel = block
            .to_dtype(DType::U32)?
            .unsqueeze(2)?
            .broadcast_as((rows, 1, BLOCK))?
            .contiguous()?;
        let inner = w3.gather(&sel, 1)?.squeeze(1)?;
        let at = count_at_most(&inner.cumsum(D::Minus1)?, &(target - prev)?)?;
        // Rounding may put the target just outside the block's mass: stay between its first
        // and last tokens that can be drawn (the block has mass, so both exist).
        let drawable = inner.gt(0.0)?;
        let at = at
            .minimum(&last_where(&drawable)?)?
            .maximum(&first_where(&drawable)?)?;
        ((block * BLOCK as f64)? + at)?
    };
    // A NaN row matches no maximum (greedy gives `vocab`): keep the index in range so the
    // gather is valid; the check below reports the row.
    let token = token.minimum((vocab - 1) as f64)?;
    let lp = (l.gather(&token.to_dtype(DType::U32)?, 1)? - lse)?;
    // One transfer: (token, log-prob, check) per row.
    let out = Tensor::cat(&[&token, &lp, &check], 1)?.to_vec2::<f64>()?;
    out.into_iter()
        .map(|r| {
            if !r[2].is_finite() {
                bail!("the model produced non-finite logits (NaN or infinity); its weights may have diverged");
            }
            Ok((r[0] as u32, r[1]))
        })
        .collect()
}
