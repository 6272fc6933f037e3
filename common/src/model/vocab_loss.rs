//! The vocabulary-sized losses of training, in chunks of rows with their own backward, so the
//! [rows, vocab] logits and their gradient never exist for all rows at once (Liger's fused
//! linear cross-entropy and Apple's Cut Cross-Entropy do this on GPUs; candle has neither).
//!
//! For rows h (n, hidden) of the final hidden states and the output weight W (vocab, hidden),
//! each chunk's logits z = h Wᵀ give, per row r with weight w_r (over the step's `denom`):
//! - next-token NLL, −log softmax(z)[t]: value, and ∂/∂z = w_r (softmax(z) − onehot(t)) / denom;
//! - exact KL(p₀ ‖ p_θ) to a frozen model's logits z₀: Σ p₀ (log p₀ − log p_θ), and
//!   ∂/∂z = w_r (softmax(z) − p₀) / denom.
//!
//! Then ∂/∂h = (∂/∂z) W and ∂/∂W = Σ_chunks (∂/∂z)ᵀ h. The caller backpropagates them through the
//! rest of the graph with the surrogate `Σ h ⊙ ∂/∂h + Σ W ⊙ ∂/∂W`, whose gradient is exactly
//! the loss's (its value is not the loss; the loss is returned separately).

use super::decoder::Decoder;
use anyhow::Result;
use candle_core::{DType, Tensor, D};

/// Rows scored together at least: a chunk's logits are at most max(CHUNK × vocab,
/// CHUNK_ENTRIES) floats (64 MB at a 128k vocabulary).
pub const CHUNK: usize = 128;

/// Logit entries a chunk may hold when CHUNK rows are fewer (a small vocabulary): 16 MB in
/// f32. Larger chunks make fewer, larger products and fewer sums of the output weight's
/// gradient: at an 8192 vocabulary (512 rows) a 2048-token step's loss took 0.43–0.50 s
/// instead of 0.50–0.59 s with 128 rows on this project's 2-core CPU.
const CHUNK_ENTRIES: usize = 1 << 22;

/// Rows per chunk for a vocabulary of `vocab` entries: CHUNK, or more while a chunk's logits
/// stay within CHUNK_ENTRIES.
pub fn chunk_rows(vocab: usize) -> usize {
    CHUNK.max(CHUNK_ENTRIES / vocab.max(1))
}

/// What each row is trained towards.
pub enum Target<'a> {
    /// The next token (ids, one per row).
    Tokens(&'a [u32]),
    /// The full next-token distribution of a frozen model, from its hidden states (n, hidden).
    Model {
        base: &'a Decoder,
        hidden: &'a Tensor,
    },
}

/// Values per row and the gradients of Σ_r w_r·value_r / denom.
pub struct LossGrad {
    /// NLL or KL of each row (unweighted), for reporting.
    pub values: Vec<f32>,
    /// ∂/∂h, (n, hidden), in h's dtype.
    pub grad_hidden: Tensor,
    /// ∂/∂W, (vocab, hidden) in f32, when `want_weight_grad`.
    pub grad_weight: Option<Tensor>,
}

/// The loss's value and gradients for hidden rows `h` (n, hidden; values only, no graph is
/// kept) of `dec`, row weights `w` and the step's denominator, in chunks of
/// [`chunk_rows`]`(vocab)` rows.
pub fn loss_grad(
    dec: &Decoder,
    h: &Tensor,
    target: &Target,
    w: &[f32],
    denom: f64,
    want_weight_grad: bool,
) -> Result<LossGrad> {
    let rows = chunk_rows(dec.cfg.vocab_size);
    loss_grad_chunked(dec, h, target, w, denom, want_weight_grad, rows)
}

/// [`loss_grad`] in chunks of `rows` rows.
pub fn loss_grad_chunked(
    dec: &Decoder,
    h: &Tensor,
    target: &Target,
    w: &[f32],
    denom: f64,
    want_weight_grad: bool,
    rows: usize,
) -> Result<LossGrad> {
    anyhow::ensure!(rows > 0, "vocab_loss: chunks of 0 rows");
    let h = h.detach();
    let n = h.dim(0)?;
    let dev = h.device().clone();
    let lm = dec.lm_head().detach();
    let cdt = match lm.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let lm_c = lm.to_dtype(cdt)?;
    let mut values = Vec::with_capacity(n);
    let mut gh = Vec::new();
    let mut gw: Option<Tensor> = None;
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        // Logits from detached weights: the gradients computed from them must not carry a
        // graph back into W (that would add a second-order term to the surrogate).
        let logits = h
            .narrow(0, start, len)?
            .contiguous()?
            .matmul(&lm.t()?)?
            .to_dtype(cdt)?;
        let scale: Vec<f64> = w[start..start + len]
            .iter()
            .map(|&x| x as f64 / denom)
            .collect();
        // On the CPU the next-token loss and its scaled gradient are one kernel (rows in parallel).
        let fused = match target {
            Target::Tokens(ids) => {
                super::fused::nll_grad(&logits, &ids[start..start + len], &scale)?
            }
            Target::Model { .. } => None,
        };
        let (vals, dz) = match fused {
            Some(v) => v,
            None => composed(&logits, target, start, len, &scale)?,
        };
        values.extend(vals);
        gh.push(dz.matmul(&lm_c)?.to_dtype(h.dtype())?.detach());
        if want_weight_grad {
            let hc = h.narrow(0, start, len)?.to_dtype(cdt)?;
            let g = dz.t()?.matmul(&hc)?.detach();
            gw = Some(match gw {
                Some(a) => (a + g)?,
                None => g,
            });
        }
        start += len;
    }
    let grad_hidden = if gh.is_empty() {
        Tensor::zeros((0, h.dim(1)?), h.dtype(), &dev)?
    } else {
        Tensor::cat(&gh, 0)?
    };
    Ok(LossGrad {
        values,
        grad_hidden,
        grad_weight: gw,
    })
}

/// A chunk's values and scaled gradient ∂/∂z with candle's operations (any device; and the
/// exact KL everywhere): rows start..start+len of the step, logits `logits` in the compute type.
fn composed(
    logits: &Tensor,
    target: &Target,
    start: usize,
    len: usize,
    scale: &[f64],
) -> Result<(Vec<f32>, Tensor)> {
    let (dev, cdt) = (logits.device().clone(), logits.dtype());
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let p = lp.exp()?;
    let (vals, dz) = match target {
        Target::Tokens(ids) => {
            let tg = Tensor::new(&ids[start..start + len], &dev)?.unsqueeze(1)?;
            let v = lp.gather(&tg, 1)?.squeeze(1)?.neg()?;
            // softmax − onehot: subtract 1 at each row's target.
            let onehot =
                Tensor::zeros_like(&p)?.scatter_add(&tg, &Tensor::ones((len, 1), cdt, &dev)?, 1)?;
            (v, (p - onehot)?)
        }
        Target::Model { base, hidden } => {
            let lp0 = candle_nn::ops::log_softmax(
                &base.logits(&hidden.narrow(0, start, len)?)?.to_dtype(cdt)?,
                D::Minus1,
            )?;
            let p0 = lp0.exp()?;
            let v = (&p0 * (&lp0 - &lp)?)?.sum(D::Minus1)?;
            (v, (p - p0)?)
        }
    };
    let scale = Tensor::new(scale, &dev)?.to_dtype(cdt)?.unsqueeze(1)?;
    Ok((
        vals.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        dz.broadcast_mul(&scale)?,
    ))
}

/// The surrogate whose gradient is the loss's: Σ h ⊙ ∂/∂h (+ Σ W ⊙ ∂/∂W), for `h` and `W`
/// still attached to the graph.
pub fn surrogate(h: &Tensor, g: &LossGrad, w: Option<&Tensor>) -> Result<Tensor> {
    let mut s = (h * &g.grad_hidden)?.sum_all()?.to_dtype(DType::F32)?;
    if let (Some(w), Some(gw)) = (w, &g.grad_weight) {
        s = (s
            + (w * gw.to_dtype(w.dtype())?)?
                .sum_all()?
                .to_dtype(DType::F32)?)?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The CPU kernel (`fused::nll_grad`) against the composition of candle's operations, in
    /// f32 and f64: ordinary rows, a row offset by 1e4, a row with −inf entries, a confident
    /// row; values within 1e-5 relative (f32) / 1e-12 (f64), gradients within 1e-6 / 1e-14.
    #[test]
    fn the_next_token_kernel_equals_the_composition() {
        let (rows, vocab) = (6usize, 300usize);
        let mut z: Vec<f64> = (0..rows * vocab)
            .map(|i| ((i * 7919) % 1000) as f64 / 100.0 - 5.0)
            .collect();
        for x in &mut z[vocab..2 * vocab] {
            *x += 1e4;
        }
        for j in (0..vocab).step_by(3) {
            z[2 * vocab + j] = f64::NEG_INFINITY;
        }
        z[3 * vocab + 7] = 40.0;
        let targets: Vec<u32> = vec![0, 17, 4, 7, 299, 123];
        let scale: Vec<f64> = vec![0.5, 1.0, 0.25, 2.0, 1.0, 0.0];
        for (dt, vtol, gtol) in [(DType::F64, 1e-12, 1e-14), (DType::F32, 1e-5, 1e-6)] {
            let zt = Tensor::from_vec(z.clone(), (rows, vocab), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let (v1, g1) = crate::model::fused::nll_grad(&zt, &targets, &scale)
                .unwrap()
                .unwrap();
            let target = Target::Tokens(&targets);
            let (v2, g2) = composed(&zt, &target, 0, rows, &scale).unwrap();
            for (r, (a, b)) in v1.iter().zip(&v2).enumerate() {
                let d = (a - b).abs() as f64 / (b.abs() as f64).max(1.0);
                assert!(d < vtol, "{dt:?} row {r}: value {a} against {b}");
            }
            let d = (g1 - g2)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < gtol, "{dt:?}: gradients differ by {d:e}");
        }
        // A target outside the vocabulary is an error, not a read past the row.
        let zt = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(crate::model::fused::nll_grad(&zt, &[4], &[1.0]).is_err());
    }
}
