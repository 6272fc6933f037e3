//! One micro-batch: which positions carry which loss, the vocabulary losses (in chunks, with
//! their own backward: `cf_common::model::vocab_loss`), and the backward pass through one graph
//! or layer by layer (`--gradient-checkpointing`: `cf_common::model::staged`).

use crate::data::Example;
use anyhow::{anyhow, Result};
use candle_core::{DType, Tensor, Var};
use cf_common::model::vocab_loss::{self, LossGrad, Target};
use cf_common::model::Decoder;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Per-source sums for reporting: (loss sum, positions).
pub type SourceStats = BTreeMap<String, (f64, usize)>;

pub use cf_common::model::staged::Grads;

pub struct Step<'a> {
    pub dec: &'a Decoder,
    /// The frozen original, for --exact-kl sources.
    pub base: Option<&'a Decoder>,
    pub vars: &'a [(String, Var)],
    pub checkpointing: bool,
    pub lora_rng: Option<&'a Arc<Mutex<ChaCha8Rng>>>,
}

/// Trained positions of a micro-batch, split by loss: (row in the flattened (b·l) hidden
/// states, target id, weight, example).
struct Rows {
    nll: Vec<(u32, u32, f32, usize)>,
    kl: Vec<(u32, u32, f32, usize)>,
}

fn rows(exs: &[&Example], l: usize) -> Rows {
    let (mut nll, mut kl) = (Vec::new(), Vec::new());
    for (r, e) in exs.iter().enumerate() {
        for i in 1..e.ids.len() {
            if e.target[i] {
                let row = ((r * l + i - 1) as u32, e.ids[i], e.weight as f32, r);
                if e.exact_kl {
                    kl.push(row)
                } else {
                    nll.push(row)
                }
            }
        }
    }
    Rows { nll, kl }
}

impl Step<'_> {
    /// Add this micro-batch's gradient of Σ w·loss / denom to `acc`; returns its loss.
    pub fn run(
        &self,
        exs: &[&Example],
        denom: f64,
        stats: &mut SourceStats,
        acc: &mut Grads,
    ) -> Result<f64> {
        let dec = self.dec;
        let dev = dec.device().clone();
        let (b, l) = (
            exs.len(),
            exs.iter().map(|e| e.ids.len()).max().unwrap_or(1),
        );
        let mut ids = vec![0u32; b * l];
        for (r, e) in exs.iter().enumerate() {
            ids[r * l..r * l + e.ids.len()].copy_from_slice(&e.ids);
        }
        let ids = Tensor::from_vec(ids, (b, l), &dev)?;
        let rows = rows(exs, l);
        let hsz = dec.cfg.hidden_size;
        // The frozen model's hidden states at the exact-KL rows (no graph).
        let base_h = match (rows.kl.is_empty(), self.base) {
            (true, _) => None,
            (false, None) => return Err(anyhow!("internal: exact KL without the original model")),
            (false, Some(base)) => {
                let idx = Tensor::new(
                    rows.kl.iter().map(|x| x.0).collect::<Vec<_>>().as_slice(),
                    &dev,
                )?;
                Some(
                    base.forward_hidden(&ids, None)?
                        .reshape((b * l, hsz))?
                        .index_select(&idx, 0)?,
                )
            }
        };
        let weight_trainable = dec.lm_head().track_op();
        // The losses at the final hidden states `h` (b, l, hidden), as a surrogate to
        // backpropagate; the loss itself is accumulated into `loss`.
        let mut loss = 0.0;
        let mut head = |h: &Tensor| -> Result<Tensor> {
            let h = h.reshape((b * l, hsz))?;
            let mut s = Tensor::zeros((), DType::F32, &dev)?;
            for (set, kl) in [(&rows.nll, false), (&rows.kl, true)] {
                if set.is_empty() {
                    continue;
                }
                let idx =
                    Tensor::new(set.iter().map(|x| x.0).collect::<Vec<_>>().as_slice(), &dev)?;
                let hr = h.index_select(&idx, 0)?;
                let w: Vec<f32> = set.iter().map(|x| x.2).collect();
                let tokens: Vec<u32> = set.iter().map(|x| x.1).collect();
                let target = match (kl, &base_h, self.base) {
                    (true, Some(hb), Some(base)) => Target::Model { base, hidden: hb },
                    _ => Target::Tokens(&tokens),
                };
                let g: LossGrad =
                    vocab_loss::loss_grad(dec, &hr, &target, &w, denom, weight_trainable)?;
                for (x, v) in set.iter().zip(&g.values) {
                    let key = if kl {
                        format!("{} (exact KL)", exs[x.3].source)
                    } else {
                        exs[x.3].source.clone()
                    };
                    let e = stats.entry(key).or_default();
                    e.0 += *v as f64;
                    e.1 += 1;
                    loss += x.2 as f64 * *v as f64 / denom;
                }
                let lm = weight_trainable.then(|| dec.lm_head());
                s = (s + vocab_loss::surrogate(&hr, &g, lm)?)?;
            }
            Ok(s)
        };
        cf_common::model::staged::backward(
            dec,
            &ids,
            &mut head,
            self.vars,
            self.checkpointing,
            self.lora_rng,
            acc,
        )?;
        Ok(loss)
    }
}
