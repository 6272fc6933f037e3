//! Reading samples, scoring them in batches, and turning the per-sample terms into estimates
//! with standard errors.

use crate::score::{Item, Scorer};
use crate::Args;
use anyhow::{anyhow, bail, Result};
use cf_common::record::{Loc, Output, Reader, Record, Writer};
use serde_json::{json, Value};
use std::time::Instant;

pub struct Summary {
    pub json: Value,
    /// The estimate `--max` is checked against, and its name.
    pub primary: f64,
    pub primary_name: &'static str,
}

/// Running mean and variance (Welford), for a mean's standard error.
#[derive(Default)]
struct Stat {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Stat {
    fn push(&mut self, x: f64) {
        self.n += 1.0;
        let d = x - self.mean;
        self.mean += d / self.n;
        self.m2 += d * (x - self.mean);
    }

    /// Standard error of the mean (sample standard deviation / √n); None below two samples.
    fn stderr(&self) -> Option<f64> {
        (self.n >= 2.0).then(|| (self.m2 / (self.n - 1.0)).sqrt() / self.n.sqrt())
    }

    /// 95% interval by the normal approximation (mean ± 1.96 standard errors).
    fn ci95(&self) -> Value {
        match self.stderr() {
            Some(se) => json!([self.mean - 1.96 * se, self.mean + 1.96 * se]),
            None => Value::Null,
        }
    }
}

/// The sample a record holds: `token_ids` (exact), else `text` tokenised; conditioned on
/// `prefix_ids`, else the document-start token.
fn item(scorer: &Scorer, rec: &Record) -> Result<Item> {
    let m = scorer.model;
    let vocab = m.cfg.vocab_size;
    let prefix = match cf_common::record::token_ids(rec, "prefix_ids", vocab)? {
        Some(p) if !p.is_empty() => p,
        Some(_) => {
            bail!("\"prefix_ids\" is empty: a sample must be conditioned on at least one token")
        }
        None => vec![m
            .tok
            .document_start()
            .ok_or_else(|| anyhow!("no prefix_ids, and the tokenizer has no BOS or EOS"))?],
    };
    let tokens = match (
        cf_common::record::token_ids(rec, "token_ids", vocab)?,
        rec.get("text"),
    ) {
        (Some(t), _) => t,
        (None, Some(Value::String(s))) => m.tok.encode(s, false)?,
        _ => bail!("neither \"token_ids\" nor \"text\": nothing to score"),
    };
    if tokens.is_empty() {
        bail!("the sample has no tokens");
    }
    if prefix.len() + tokens.len() > m.cfg.max_position_embeddings {
        bail!(
            "{} tokens exceed the model's {} positions",
            prefix.len() + tokens.len(),
            m.cfg.max_position_embeddings
        );
    }
    Ok(Item { prefix, tokens })
}

/// True when a record says it was drawn with temperature ≠ 1 or with truncation.
fn tempered(rec: &Record) -> bool {
    let num = |k: &str| rec.get(k).and_then(Value::as_f64);
    num("temperature").is_some_and(|t| t != 1.0)
        || num("top_k").is_some()
        || num("top_p").is_some_and(|p| p < 1.0)
        || num("min_p").is_some_and(|p| p > 0.0)
}

pub fn run(
    scorer: &Scorer,
    mut reader: Reader,
    per_record: Option<&Output>,
    args: &Args,
) -> Result<Summary> {
    let with_base = scorer.base.is_some();
    let mut writer = per_record.map(Writer::create).transpose()?;
    let (mut seq, mut tok) = (Stat::default(), Stat::default());
    let (mut tokens, mut truncated, mut biased) = (0usize, 0usize, 0usize);
    let t0 = Instant::now();
    let progress = cf_common::progress::Progress::new("cf-kl", "records", None, &args.log);
    let (mut batch, mut items): (Vec<(Loc, Record)>, Vec<Item>) = (Vec::new(), Vec::new());
    let mut flush = |batch: &mut Vec<(Loc, Record)>, items: &mut Vec<Item>| -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let scores = scorer.score(items)?;
        progress.inc(batch.len() as u64);
        for ((loc, mut rec), (s, it)) in
            batch.drain(..).zip(scores.into_iter().zip(items.drain(..)))
        {
            let lp0 = match s.logprob_base {
                Some(b) => b,
                None => rec.get("logprob").and_then(Value::as_f64).ok_or_else(|| {
                    anyhow!("{loc}: no \"logprob\" field; give --base to score the original model")
                })?,
            };
            let kl_seq = lp0 - s.logprob_model;
            if !kl_seq.is_finite() || s.kl_token.is_some_and(|k| !k.is_finite()) {
                bail!("{loc}: a model gave a non-finite log-probability (NaN or infinity); its weights may have diverged");
            }
            seq.push(kl_seq);
            tokens += it.tokens.len();
            truncated +=
                usize::from(rec.get("finish_reason").and_then(Value::as_str) == Some("length"));
            biased += usize::from(tempered(&rec));
            if let Some(k) = s.kl_token {
                tok.push(k);
            }
            if let Some(w) = writer.as_mut() {
                rec.insert("logprob_base".into(), json!(lp0));
                rec.insert("logprob_model".into(), json!(s.logprob_model));
                rec.insert("kl_seq".into(), json!(kl_seq));
                if let Some(k) = s.kl_token {
                    rec.insert("kl_token".into(), json!(k));
                }
                w.write(&rec)?;
            }
        }
        Ok(())
    };
    while let Some(next) = reader.next() {
        let (loc, rec) = next?;
        match item(scorer, &rec) {
            Ok(it) => {
                batch.push((loc, rec));
                items.push(it);
            }
            Err(e) => reader.reject(&loc, e)?,
        }
        if batch.len() >= scorer.batch_size {
            flush(&mut batch, &mut items)?;
        }
    }
    flush(&mut batch, &mut items)?;
    progress.finish();
    if seq.n == 0.0 {
        bail!("{}: no samples to score", reader.name());
    }
    if let Some(w) = writer {
        w.finish()?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let tool = "cf-kl";
    if biased > 0 {
        args.log.warn(tool, format!("{biased} of {} samples were drawn tempered or truncated (temperature ≠ 1, top-k/top-p/min-p): not draws from the base model, so the estimates are biased", seq.n));
    }
    if truncated > 0 {
        args.log.warn(tool, format!("{truncated} of {} samples were cut at the length limit: the estimates are of the KL between the length-truncated distributions", seq.n));
    }
    if reader.skipped() > 0 {
        args.log
            .warn(tool, format!("skipped {} bad records", reader.skipped()));
    }
    let n_models = if with_base { 2.0 } else { 1.0 };
    args.log.info(tool, format!("scored {} samples, {tokens} tokens under {n_models} model(s) in {secs:.1} s: {:.0} tokens/s", seq.n, tokens as f64 * n_models / secs.max(1e-9)));
    let mut j = json!({
        "direction": "KL(base || model)",
        "base": args.base.clone().map_or(Value::String("logprob field of the records".into()), Value::String),
        "model": args.model.model,
        "n": seq.n as u64,
        "tokens": tokens,
        "kl_seq": seq.mean,
        "kl_seq_stderr": seq.stderr(),
        "kl_seq_ci95": seq.ci95(),
        "kl_per_token": seq.mean * seq.n / tokens as f64,
    });
    let map = j.as_object_mut().unwrap();
    if with_base {
        map.insert("kl_token".into(), json!(tok.mean));
        map.insert("kl_token_stderr".into(), json!(tok.stderr()));
        map.insert("kl_token_ci95".into(), tok.ci95());
    }
    let mut est = serde_json::Map::new();
    est.insert("kl_seq".into(), json!("sequence-level Monte Carlo: mean over samples x ~ base of log p_base(x) - log p_model(x)"));
    if with_base {
        est.insert("kl_token".into(), json!("token-level Rao-Blackwellised: mean over samples of the sum over positions t of the exact KL(p_base(.|x<t) || p_model(.|x<t)) over the vocabulary"));
    }
    map.insert("estimators".into(), Value::Object(est));
    map.insert(
        "ci95_method".into(),
        json!("normal approximation: estimate ± 1.96 standard errors"),
    );
    map.insert("truncated".into(), json!(truncated));
    map.insert("tempered_or_truncated_sampling".into(), json!(biased));
    map.insert("skipped".into(), json!(reader.skipped()));
    map.insert(
        "tokens_per_s".into(),
        json!(tokens as f64 * n_models / secs.max(1e-9)),
    );
    let (primary, primary_name) = if with_base {
        (tok.mean, "kl_token")
    } else {
        (seq.mean, "kl_seq")
    };
    Ok(Summary {
        json: j,
        primary,
        primary_name,
    })
}
