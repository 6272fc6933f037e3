//! Batched sampling with the KV cache: temperature, top-k, top-p, min-p (vLLM's meanings and
//! order), one seeded random stream per sample, and continuous batching (a finished row's place
//! goes to the next sample, at its own positions). On a GPU the draw itself runs there
//! ([`crate::sampler`]).
//!
//! Reproducibility: sample `index` under `seed` draws its uniforms from ChaCha8 stream `index`
//! of key `seed`, so a sample does not depend on which batch or shard it was computed in.

use crate::model::{Decoder, SlotCache};
use anyhow::{bail, Result};
use candle_core::Tensor;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Sampling parameters. The defaults (temperature 1, no truncation) draw exactly from the
/// model's distribution, which is what an unbiased KL estimate needs.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub max_tokens: usize,
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("--temperature must be >= 0, got {}", self.temperature);
        }
        if self.top_k == Some(0) {
            bail!("--top-k must be at least 1");
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                bail!("--top-p must be in (0, 1], got {p}");
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                bail!("--min-p must be in [0, 1], got {p}");
            }
        }
        if self.max_tokens == 0 {
            bail!("--max-tokens must be at least 1");
        }
        Ok(())
    }

    /// True when samples are draws from the model itself (temperature 1, no truncation).
    pub fn is_unbiased(&self) -> bool {
        self.temperature == 1.0
            && self.top_k.is_none()
            && self.top_p.is_none_or(|p| p >= 1.0)
            && self.min_p.is_none_or(|p| p <= 0.0)
    }
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Eos,
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::Length => "length",
        }
    }
}

/// One finished continuation.
#[derive(Clone, Debug)]
pub struct Generated {
    /// Generated ids, including the final EOS when `finish` is `Eos`.
    pub tokens: Vec<u32>,
    /// Σ log p(token) under the untempered, untruncated model.
    pub logprob: f64,
    pub finish: Finish,
}

/// The random stream of sample `index` under `seed`.
pub fn sample_rng(seed: u64, index: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(index);
    r
}

/// A uniform in [0, 1) with 53 random bits.
fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Choose the next token from one row of logits. Returns the token and its log-probability
/// under the untempered model.
pub fn choose(logits: &[f32], p: &SamplingParams, rng: &mut ChaCha8Rng) -> (u32, f64) {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let lp = |t: usize| logits[t] as f64 - lse;
    if p.temperature == 0.0 {
        let best = (0..logits.len()).fold(0, |b, i| if logits[i] > logits[b] { i } else { b });
        return (best as u32, lp(best));
    }
    let u = uniform(rng);
    if p.is_unbiased() {
        // Inverse CDF over the vocabulary in id order.
        let mut acc = 0.0;
        let mut last = 0;
        for (i, &l) in logits.iter().enumerate() {
            let q = (l as f64 - lse).exp();
            if q > 0.0 {
                last = i;
            }
            acc += q;
            if u < acc {
                return (i as u32, lp(i));
            }
        }
        return (last as u32, lp(last));
    }
    // Tempered and/or truncated: temperature, then top-k, top-p, min-p (vLLM's order).
    let t = p.temperature;
    let tmax = max / t;
    let mut probs: Vec<f64> = logits
        .iter()
        .map(|&l| (l as f64 / t - tmax).exp())
        .collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= z);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    // Tokens tied with the last one kept at a top-k or top-p cut are kept too (vLLM's top-k
    // rule; the device sampler's threshold keeps them alike).
    let with_ties = |keep: usize| {
        let cut = probs[order[keep - 1]];
        keep + order[keep..]
            .iter()
            .take_while(|&&i| probs[i] == cut)
            .count()
    };
    let mut keep = order.len();
    if let Some(k) = p.top_k {
        if k < keep {
            keep = with_ties(k);
        }
    }
    if let Some(top_p) = p.top_p {
        let mut acc = 0.0;
        for (n, &i) in order[..keep].iter().enumerate() {
            acc += probs[i];
            if acc >= top_p {
                keep = with_ties(n + 1);
                break;
            }
        }
    }
    if let Some(min_p) = p.min_p {
        let floor = min_p * probs[order[0]];
        keep = order[..keep]
            .iter()
            .take_while(|&&i| probs[i] >= floor)
            .count()
            .max(1);
    }
    let mut kept: Vec<usize> = order[..keep].to_vec();
    kept.sort_unstable();
    let z: f64 = kept.iter().map(|&i| probs[i]).sum();
    let mut acc = 0.0;
    for &i in &kept {
        acc += probs[i] / z;
        if u < acc {
            return (i as u32, lp(i));
        }
    }
    let last = *kept.last().unwrap();
    (last as u32, lp(last))
}

/// Draw each row's next token from `logits` (rows, vocab), row r from `rngs[r]`. On a GPU the
/// draw runs there ([`crate::sampler`]): only the rows' uniforms go in and their tokens and
/// log-probabilities come out. On the CPU each row samples from its own stream in parallel,
/// and every draw is the same as one after another.
fn draw(
    logits: &Tensor,
    rngs: Vec<&mut ChaCha8Rng>,
    p: &SamplingParams,
) -> Result<Vec<(u32, f64)>> {
    if !logits.device().is_cpu() {
        return draw_on_device(logits, rngs, p);
    }
    let logits = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    let drawn: Vec<Option<(u32, f64)>> = rngs
        .into_par_iter()
        .zip(logits.par_iter())
        .map(|(rng, l)| l.iter().all(|x| x.is_finite()).then(|| choose(l, p, rng)))
        .collect();
    drawn
        .into_iter()
        .map(|d| {
            d.ok_or_else(|| {
                anyhow::anyhow!("the model produced non-finite logits (NaN or infinity); its weights may have diverged")
            })
        })
        .collect()
}

/// [`crate::sampler::draw`] with each row's next uniform from its stream: the same uniforms, in
/// the same order, as [`choose`] takes (none when greedy).
pub fn draw_on_device(
    logits: &Tensor,
    rngs: Vec<&mut ChaCha8Rng>,
    p: &SamplingParams,
) -> Result<Vec<(u32, f64)>> {
    let uniforms: Vec<f64> = if p.temperature == 0.0 {
        vec![0.0; rngs.len()]
    } else {
        rngs.into_iter().map(uniform).collect()
    };
    crate::sampler::draw(logits, &uniforms, p)
}

/// A prefix without its last token, and its keys and values per layer.
type Prefilled = (Vec<u32>, Vec<(Tensor, Tensor)>);

/// One row of the decoding batch.
struct Slot {
    /// The job's number in the order the jobs came.
    job: usize,
    rng: ChaCha8Rng,
    out: Generated,
    /// The row's input at the next step.
    next: u32,
}

fn fresh() -> Generated {
    Generated {
        tokens: Vec::new(),
        logprob: 0.0,
        finish: Finish::Length,
    }
}

/// Continue each job's prefix with its own random stream, `batch` sequences at a time, with
/// continuous batching: when a row finishes, the next job takes its place in the batch at its
/// own positions (vLLM's scheduling), so the batch stays full until the jobs run out.
/// `done(j, g)` is called as job j (numbered from 0 in the order the jobs came) finishes, which
/// is not job order; `on_token(rows)` after every step. `longest` bounds the jobs' prefix
/// lengths. A job's tokens depend only on its prefix and its stream (up to floating-point
/// rounding), not on the batch it shared.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    dec: &Decoder,
    jobs: impl IntoIterator<Item = (Vec<u32>, ChaCha8Rng)>,
    batch: usize,
    longest: usize,
    p: &SamplingParams,
    eos: &[u32],
    mut done: impl FnMut(usize, Generated) -> Result<()>,
    mut on_token: impl FnMut(usize),
) -> Result<()> {
    let mut jobs = jobs.into_iter().enumerate();
    let mut next_job = || -> Result<Option<(usize, Vec<u32>, ChaCha8Rng)>> {
        match jobs.next() {
            None => Ok(None),
            Some((j, (prefix, rng))) => {
                if prefix.is_empty() || prefix.len() > longest {
                    bail!(
                        "internal: job {j} has a prefix of {} tokens (1..={longest} allowed)",
                        prefix.len()
                    );
                }
                Ok(Some((j, prefix, rng)))
            }
        }
    };
    let mut first = Vec::new();
    while first.len() < batch.max(1) {
        match next_job()? {
            Some(j) => first.push(j),
            None => break,
        }
    }
    if first.is_empty() {
        return Ok(());
    }
    let mut cache = dec.slot_cache(first.len(), longest + p.max_tokens)?;
    // Room behind the first step's column for the longest prefix.
    cache.skip(longest - 1);
    // A prefix's keys and values are computed once for a run of jobs that share it (n samples
    // of one prompt, or of the document start).
    let mut memo: Option<Prefilled> = None;
    let mut begin = |cache: &mut SlotCache, row: usize, prefix: &[u32]| -> Result<u32> {
        let n = prefix.len() - 1;
        if memo.as_ref().is_none_or(|(ids, _)| ids[..] != prefix[..n]) {
            memo = Some((prefix[..n].to_vec(), dec.prefill(&prefix[..n])?));
        }
        cache.begin(row, &memo.as_ref().unwrap().1, n)?;
        Ok(prefix[n])
    };
    let mut slots = Vec::with_capacity(first.len());
    for (row, (job, prefix, rng)) in first.into_iter().enumerate() {
        let next = begin(&mut cache, row, &prefix)?;
        slots.push(Slot {
            job,
            rng,
            out: fresh(),
            next,
        });
    }
    loop {
        let ids: Vec<u32> = slots.iter().map(|s| s.next).collect();
        let h = dec.forward_slots(&ids, &mut cache)?;
        let logits = dec.logits(&h)?;
        let drawn = draw(&logits, slots.iter_mut().map(|s| &mut s.rng).collect(), p)?;
        on_token(slots.len());
        let mut keep: Vec<u32> = Vec::with_capacity(slots.len());
        for (row, (tok, lp)) in drawn.into_iter().enumerate() {
            let s = &mut slots[row];
            s.out.tokens.push(tok);
            s.out.logprob += lp;
            let finish = if eos.contains(&tok) {
                Some(Finish::Eos)
            } else if s.out.tokens.len() >= p.max_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            let Some(finish) = finish else {
                s.next = tok;
                keep.push(row as u32);
                continue;
            };
            s.out.finish = finish;
            done(s.job, std::mem::replace(&mut s.out, fresh()))?;
            if let Some((job, prefix, rng)) = next_job()? {
                s.next = begin(&mut cache, row, &prefix)?;
                s.job = job;
                s.rng = rng;
                keep.push(row as u32);
            }
        }
        if keep.is_empty() {
            return Ok(());
        }
        if keep.len() < slots.len() {
            // The jobs ran out: finished rows leave the batch, so they stop costing compute.
            cache.select_rows(&keep)?;
            let mut old: Vec<Option<Slot>> = slots.into_iter().map(Some).collect();
            slots = keep
                .iter()
                .map(|&r| old[r as usize].take().unwrap())
                .collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f64) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: None,
            top_p: None,
            min_p: None,
            max_tokens: 4,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut r = sample_rng(0, 0);
        assert_eq!(choose(&[0.0, 3.0, 3.0, 1.0], &params(0.0), &mut r).0, 1);
    }

    #[test]
    fn truncation_never_picks_outside_the_kept_set() {
        let logits = [2.0f32, 1.0, 0.5, 0.0, -1.0];
        for seed in 0..200 {
            let mut r = sample_rng(seed, 0);
            let p = SamplingParams {
                top_k: Some(2),
                ..params(1.5)
            };
            assert!(choose(&logits, &p, &mut r).0 < 2);
            let p = SamplingParams {
                min_p: Some(0.5),
                ..params(1.0)
            };
            // exp(-1) < 0.5 < exp(0): only token 0 and 1 (p1/p0 = e^-1 = 0.37 < 0.5 → only 0)
            assert_eq!(choose(&logits, &p, &mut r).0, 0);
        }
    }

    #[test]
    fn tokens_tied_at_a_cut_are_kept() {
        // top-k 2 over [2, 1, 1, 0]: ids 1 and 2 tie at the cut, so both stay (vLLM's rule);
        // id 3 never comes.
        let logits = [2.0f32, 1.0, 1.0, 0.0];
        let p = SamplingParams {
            top_k: Some(2),
            ..params(1.0)
        };
        let seen: std::collections::BTreeSet<u32> = (0..400)
            .map(|s| choose(&logits, &p, &mut sample_rng(s, 0)).0)
            .collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn logprob_is_untempered() {
        let logits = [1.0f32, 0.0];
        let mut r = sample_rng(1, 0);
        let (t, lp) = choose(&logits, &params(0.0), &mut r);
        assert_eq!(t, 0);
        let want = 1.0 - (1f64.exp() + 1.0).ln();
        assert!((lp - want).abs() < 1e-7);
    }

    #[test]
    fn streams_differ_by_index_and_repeat_by_seed() {
        let a: Vec<u64> = (0..4).map(|_| sample_rng(7, 3).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(sample_rng(7, 3).next_u64(), sample_rng(7, 4).next_u64());
    }
}
