//! How many records (or tokens) each source contributes, which ones, and in what order.

use crate::source::{Ratio, Source};
use anyhow::{bail, Result};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The realised contribution of one source.
pub struct Take {
    /// Indices of the source's records in the mix (with repeats when oversampled).
    pub picks: Vec<u32>,
    /// Units asked for (records or tokens).
    pub target: f64,
}

fn rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

/// Uniform index below n (rejection sampling, no modulo bias).
fn below(r: &mut ChaCha8Rng, n: usize) -> usize {
    let n = n as u64;
    let zone = u64::MAX - u64::MAX % n;
    loop {
        let x = r.next_u64();
        if x < zone {
            return (x % n) as usize;
        }
    }
}

pub fn shuffle<T>(v: &mut [T], r: &mut ChaCha8Rng) {
    for i in (1..v.len()).rev() {
        let j = below(r, i + 1);
        v.swap(i, j);
    }
}

/// Units each source should contribute, by the ratio forms (see cf-mix --help), checked to
/// be a mix this machine can plan (each record out costs ~16 bytes of index).
pub fn targets(
    sources: &[Source],
    by_tokens: bool,
    total: Option<f64>,
    cap: bool,
) -> Result<Vec<f64>> {
    let t = raw_targets(sources, by_tokens, total, cap)?;
    let records: f64 = sources
        .iter()
        .zip(&t)
        .map(|(s, &t)| {
            let units = if by_tokens {
                s.total_tokens().unwrap_or(0) as f64
            } else {
                s.len() as f64
            };
            if units > 0.0 {
                t / units * s.len() as f64
            } else {
                0.0
            }
        })
        .sum();
    if !records.is_finite() || records > u32::MAX as f64 * 16.0 {
        bail!("the mix would have {records:.3e} records: too many to write");
    }
    cf_common::mem::require(records * 16.0, &format!("a mix of {records:.0} records"))?;
    Ok(t)
}

fn raw_targets(
    sources: &[Source],
    by_tokens: bool,
    total: Option<f64>,
    cap: bool,
) -> Result<Vec<f64>> {
    let units: Vec<f64> = sources
        .iter()
        .map(|s| {
            if by_tokens {
                s.total_tokens().unwrap_or(0) as f64
            } else {
                s.len() as f64
            }
        })
        .collect();
    let shares: Vec<Option<f64>> = sources
        .iter()
        .map(|s| {
            if let Ratio::Share(w) = s.spec.ratio {
                Some(w)
            } else {
                None
            }
        })
        .collect();
    let n_shares = shares.iter().flatten().count();
    if n_shares > 0 && n_shares < sources.len() {
        bail!("give every source a share (e.g. a=1 b=3), or none: shares cannot be mixed with all, n: or per:");
    }
    if n_shares > 0 {
        let sum: f64 = shares.iter().flatten().sum();
        let f: Vec<f64> = shares.iter().map(|w| w.unwrap() / sum).collect();
        // The mix size at which source i is used exactly once.
        let full: Vec<f64> = units.iter().zip(&f).map(|(u, f)| u / f).collect();
        let limit = if cap {
            full.iter().cloned().fold(f64::INFINITY, f64::min)
        } else {
            full.iter().cloned().fold(0.0, f64::max)
        };
        let size = match total {
            Some(t) if cap => t.min(limit),
            Some(t) => t,
            None => limit,
        };
        return Ok(f.iter().map(|f| f * size).collect());
    }
    if total.is_some() {
        bail!("--total applies to shares (a=1 b=1); with all, n: and per: the sizes are given");
    }
    let fixed: f64 = sources
        .iter()
        .zip(&units)
        .map(|(s, u)| match s.spec.ratio {
            Ratio::All => *u,
            Ratio::Count(n) => {
                if cap {
                    (n as f64).min(*u)
                } else {
                    n as f64
                }
            }
            _ => 0.0,
        })
        .sum();
    Ok(sources
        .iter()
        .zip(&units)
        .map(|(s, &u)| {
            let t = match s.spec.ratio {
                Ratio::All => u,
                Ratio::Count(n) => n as f64,
                Ratio::Per(r) => r * fixed,
                Ratio::Share(_) => unreachable!(),
            };
            if cap {
                t.min(u)
            } else {
                t
            }
        })
        .collect())
}

/// Whole record counts that sum to the rounded total (largest remainder), for record mode.
pub fn apportion(targets: &[f64]) -> Vec<usize> {
    let total = targets.iter().sum::<f64>().round() as usize;
    let mut out: Vec<usize> = targets.iter().map(|t| t.floor() as usize).collect();
    let mut rest: Vec<(usize, f64)> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| (i, t - t.floor()))
        .collect();
    rest.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut missing = total.saturating_sub(out.iter().sum());
    for (i, _) in rest {
        if missing == 0 {
            break;
        }
        out[i] += 1;
        missing -= 1;
    }
    out
}

/// k records of a source: each record ⌊k/n⌋ times, plus k mod n distinct records at random.
pub fn pick_records(n: usize, k: usize, r: &mut ChaCha8Rng) -> Vec<u32> {
    if n == 0 {
        return Vec::new();
    }
    let mut picks = Vec::with_capacity(k);
    for _ in 0..k / n {
        picks.extend(0..n as u32);
    }
    let mut idx: Vec<u32> = (0..n as u32).collect();
    let rem = k % n;
    for i in 0..rem {
        let j = i + below(r, n - i);
        idx.swap(i, j);
    }
    picks.extend_from_slice(&idx[..rem]);
    picks
}

/// Records of a source in a seeded order, cycling, until their tokens reach `target`.
pub fn pick_tokens(tokens: &[u32], target: f64, r: &mut ChaCha8Rng) -> Result<Vec<u32>> {
    let n = tokens.len();
    let mut picks = Vec::new();
    if target <= 0.0 {
        return Ok(picks);
    }
    let mut order: Vec<u32> = (0..n as u32).collect();
    shuffle(&mut order, r);
    let mut acc = 0.0;
    if tokens.iter().all(|&t| t == 0) {
        bail!("it has no tokens to give");
    }
    // Whole passes in one seeded order keep every record's count within one of the others'.
    while acc < target {
        for &i in &order {
            if acc >= target {
                break;
            }
            picks.push(i);
            acc += tokens[i as usize] as f64;
        }
    }
    Ok(picks)
}

/// One source's contribution.
pub fn take(
    src: &Source,
    index: usize,
    target: f64,
    whole: Option<usize>,
    seed: u64,
) -> Result<Take> {
    let mut r = rng(seed, index as u64 + 1);
    if src.len() == 0 && target > 0.0 {
        bail!(
            "source {}: no records to take {target} from",
            src.spec.label
        );
    }
    let picks = match (&src.tokens, whole) {
        (_, Some(k)) => pick_records(src.len(), k, &mut r),
        (Some(t), None) => pick_tokens(t, target, &mut r)
            .map_err(|e| e.context(format!("source {}", src.spec.label)))?,
        (None, None) => unreachable!("token mode without token counts"),
    };
    Ok(Take { picks, target })
}

/// The order of the whole mix: (source, record) pairs shuffled with stream 0 of the seed.
pub fn order(takes: &[Take], seed: u64) -> Vec<(u32, u32)> {
    let mut all: Vec<(u32, u32)> = takes
        .iter()
        .enumerate()
        .flat_map(|(s, t)| t.picks.iter().map(move |&i| (s as u32, i)))
        .collect();
    shuffle(&mut all, &mut rng(seed, 0));
    all
}
