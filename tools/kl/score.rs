//! Scoring samples under one or two models: per-sample log-probabilities and the exact
//! per-position KL between the two next-token distributions.

use anyhow::Result;
use candle_core::{DType, Tensor, D};
use cf_common::model::Model;

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
        let targets = Tensor::new(targets.as_slice(), dev)?;
        let hidden = |m: &Model| -> Result<Tensor> {
            let h = m.decoder.forward_hidden(&ids, None)?;
            Ok(h.reshape((b * t, m.cfg.hidden_size))?
                .index_select(&rows, 0)?)
        };
        let hm = hidden(self.model)?;
        let hb = self.base.map(hidden).transpose()?;
        let n = owner.len();
        let mut out: Vec<Scores> = (0..b)
            .map(|_| Scores {
                logprob_model: 0.0,
                logprob_base: self.base.map(|_| 0.0),
                kl_token: self.base.map(|_| 0.0),
            })
            .collect();
        let mut start = 0;
        while start < n {
            let len = ROWS.min(n - start);
            let tg = targets.narrow(0, start, len)?.unsqueeze(1)?;
            let lpm = log_softmax(self.model, &hm.narrow(0, start, len)?)?;
            let tm: Vec<f32> = lpm.gather(&tg, 1)?.squeeze(1)?.to_vec1()?;
            let (tb, kl): (Vec<f32>, Vec<f32>) = match (&hb, self.base) {
                (Some(hb), Some(base)) => {
                    let lpb = log_softmax(base, &hb.narrow(0, start, len)?)?;
                    let kl = (lpb.exp()? * (&lpb - &lpm)?)?.sum(D::Minus1)?;
                    (lpb.gather(&tg, 1)?.squeeze(1)?.to_vec1()?, kl.to_vec1()?)
                }
                _ => (Vec::new(), Vec::new()),
            };
            for i in 0..len {
                let s = &mut out[owner[start + i]];
                s.logprob_model += tm[i] as f64;
                if let (Some(lb), Some(k)) = (s.logprob_base.as_mut(), s.kl_token.as_mut()) {
                    *lb += tb[i] as f64;
                    *k += kl[i] as f64;
                }
            }
            start += len;
        }
        Ok(out)
    }
}

fn log_softmax(m: &Model, h: &Tensor) -> Result<Tensor> {
    let logits = m.decoder.logits(h)?.to_dtype(DType::F32)?;
    Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
}
