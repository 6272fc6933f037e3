//! Scoring samples under one or two models: per-sample log-probabilities and the exact
//! per-position KL between the two next-token distributions.

use anyhow::Result;
use candle_core::{DType, Tensor, D};
use cf_common::model::{fused, Model};

/// One sample: the ids it was conditioned on and the ids it consists of.
pub struct Item {
    pub prefix: Vec<u32>,
    pub tokens: Vec<u32>,
}

/// What scoring one sample gives.
pub struct Scores {
    /// Σ log pθ(token) over the sample's tokens.
    pub logprob_model: f64,
    /// Σ log p0(token), when the base model scored too.
    pub logprob_base: Option<f64>,
    /// Σ over positions of KL(p0(·|x<t) ‖ pθ(·|x<t)), when the base model scored too.
    pub kl_token: Option<f64>,
}

pub struct Scorer<'a> {
    pub model: &'a Model,
    pub base: Option<&'a Model>,
    pub batch_size: usize,
}

/// Rows of vocabulary-sized log-probabilities held at once.
const ROWS: usize = 256;

impl Scorer<'_> {
    /// Score a batch of items (right-padded into one forward pass per model).
    pub fn score(&self, items: &[Item]) -> Result<Vec<Scores>> {
        let dev = self.model.decoder.device();
        let t = items
            .iter()
            .map(|i| i.prefix.len() + i.tokens.len())
            .max()
            .unwrap_or(0);
        let b = items.len();
        // Padding sits after every real token, so causal attention never lets it change a real
        // position; its positions are simply not gathered.
        let mut ids = vec![0u32; b * t];
        let (mut rows, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
        for (r, it) in items.iter().enumerate() {
            let seq: Vec<u32> = it.prefix.iter().chain(&it.tokens).copied().collect();
            ids[r * t..r * t + seq.len()].copy_from_slice(&seq);
            for (j, &tok) in it.tokens.iter().enumerate() {
                rows.push((r * t + it.prefix.len() - 1 + j) as u32);
                targets.push(tok);
                owner.push(r);
            }
        }
        let ids = Tensor::from_vec(ids, (b, t), dev)?;
        let rows = Tensor::new(rows.as_slice(), dev)?;
        let targets_host = targets;
        let targets = Tensor::new(targets_host.as_slice(), dev)?;
        let hidden = |m: &Model| -> Result<Tensor> {
            let h = m.decoder.forward_hidden(&ids, None)?;
            Ok(h.reshape((b * t, m.cfg.hidden_size))?
                .index_select(&rows, 0)?)
        };
        let hm = hidden(self.model)?;
        let hb = self.base.map(hidden).transpose()?;
        let n = owner.len();
        let (mut sm, mut sb, mut sk) = (vec![0f64; b], vec![0f64; b], vec![0f64; b]);
        // Per-record sums on the device (f64 accumulators, index_add by owner), where the
        // composition runs; only 3 × batch numbers leave it, once.
        let own_dev = Tensor::new(
            owner
                .iter()
                .map(|&o| o as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            dev,
        )?;
        let zeros = || Tensor::zeros(b, DType::F64, dev);
        let (mut dm, mut db, mut dk) = (zeros()?, zeros()?, zeros()?);
        let mut start = 0;
        while start < n {
            let len = ROWS.min(n - start);
            let zm = logits(self.model, &hm.narrow(0, start, len)?)?;
            let zb = match (&hb, self.base) {
                (Some(hb), Some(base)) => Some(logits(base, &hb.narrow(0, start, len)?)?),
                _ => None,
            };
            let tg = &targets_host[start..start + len];
            // On the CPU, one threaded pass per row (fused::score_rows).
            if let Some(rows) = fused::score_rows(&zm, zb.as_ref(), tg)? {
                for (r, v) in owner[start..start + len].iter().zip(rows) {
                    sm[*r] += v[0];
                    sb[*r] += v[1];
                    sk[*r] += v[2];
                }
                start += len;
                continue;
            }
            let tg = targets.narrow(0, start, len)?.unsqueeze(1)?;
            let own = own_dev.narrow(0, start, len)?;
            let lpm = candle_nn::ops::log_softmax(&zm, D::Minus1)?;
            let tm = lpm.gather(&tg, 1)?.squeeze(1)?.to_dtype(DType::F64)?;
            dm = dm.index_add(&own, &tm, 0)?;
            if let Some(zb) = zb {
                let lpb = candle_nn::ops::log_softmax(&zb, D::Minus1)?;
                let kl = (lpb.exp()? * (&lpb - &lpm)?)?
                    .sum(D::Minus1)?
                    .to_dtype(DType::F64)?;
                let tb = lpb.gather(&tg, 1)?.squeeze(1)?.to_dtype(DType::F64)?;
                db = db.index_add(&own, &tb, 0)?;
                dk = dk.index_add(&own, &kl, 0)?;
            }
            start += len;
        }
        // The device's sums (zero where the kernel ran), read once.
        for (acc, d) in [(&mut sm, dm), (&mut sb, db), (&mut sk, dk)] {
            for (a, x) in acc.iter_mut().zip(d.to_vec1::<f64>()?) {
                *a += x;
            }
        }
        let out = (0..b)
            .map(|r| Scores {
                logprob_model: sm[r],
                logprob_base: self.base.map(|_| sb[r]),
                kl_token: self.base.map(|_| sk[r]),
            })
            .collect();
        Ok(out)
    }
}

/// A chunk's logits, in f32 for the half types (f32 and f64 as they are).
fn logits(m: &Model, h: &Tensor) -> Result<Tensor> {
    let z = m.decoder.logits(h)?;
    Ok(match z.dtype() {
        DType::F64 => z,
        _ => z.to_dtype(DType::F32)?,
    })
}
