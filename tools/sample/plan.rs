//! What cf-sample generates (one job per sample index) and how: batches of equal-length
//! prefixes, records written in index order as they finish.

use anyhow::{anyhow, bail, Context, Result};
use cf_common::cli::LogArgs;
use cf_common::generate::{generate, sample_rng, Generated, SamplingParams};
use cf_common::model::Model;
use cf_common::record::{self, schema, Loc, Output, ReadOptions, Record, Writer};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Instant;

/// Where samples start when no prompts are given.
pub enum Start {
    /// The document-start token: BOS, else EOS.
    Document,
    Text(String),
    Ids(Vec<u32>),
    Chat,
}

/// One sample to draw.
pub struct Job {
    pub index: u64,
    pub prefix_ids: Vec<u32>,
    pub prefix_kind: &'static str,
    /// The prompt record, whose fields pass through.
    pub prompt: Option<Record>,
}

pub fn read_prompts(path: &str) -> Result<Vec<(Loc, Record)>> {
    record::read_all(Some(path), ReadOptions::default())
}

/// Say which generation_config.json sampling defaults are being ignored.
pub fn note_generation_config(model: &Model, log: &LogArgs) {
    let Some(p) = &model.files.generation_config else {
        return;
    };
    let Ok(v) = std::fs::read_to_string(p)
        .map(|t| serde_json::from_str::<Value>(&t).unwrap_or(Value::Null))
    else {
        return;
    };
    let set: Vec<String> = [
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "do_sample",
        "repetition_penalty",
    ]
    .iter()
    .filter_map(|k| v.get(*k).map(|x| format!("{k}={x}")))
    .collect();
    if !set.is_empty() {
        log.info(
            "cf-sample",
            format!(
                "ignoring generation_config.json's {} (pass flags to use them)",
                set.join(", ")
            ),
        );
    }
}

/// `[start] + tokens(text)`, without doubling the start token if the text already has it.
fn after_start(model: &Model, text: &str) -> Result<(Vec<u32>, &'static str)> {
    let (start, kind) = document_start(model)?;
    let ids = model.tok.encode(text, false)?;
    if ids.first() == Some(&start) {
        return Ok((ids, kind));
    }
    Ok((std::iter::once(start).chain(ids).collect(), kind))
}

fn document_start(model: &Model) -> Result<(u32, &'static str)> {
    match (model.tok.bos_id, model.tok.document_start()) {
        (Some(b), _) => Ok((b, "bos")),
        (None, Some(e)) => Ok((e, "eos")),
        _ => bail!(
            "{}: the tokenizer has neither a BOS nor an EOS token; use --prefix-ids",
            model.files.dir.display()
        ),
    }
}

fn chat_ids(model: &Model, messages: &Value, opening: bool) -> Result<Vec<u32>> {
    let tmpl = model.tok.chat_template.as_deref().ok_or_else(|| {
        anyhow!(
            "{}: the model has no chat template (chat_template.jinja or tokenizer_config.json)",
            model.files.dir.display()
        )
    })?;
    let (bos, eos) = (
        model.tok.bos_token.as_deref(),
        model.tok.eos_token.as_deref(),
    );
    let text = if opening {
        cf_common::chat::user_turn_opening(tmpl, bos, eos)
    } else {
        cf_common::chat::render(tmpl, messages, true, bos, eos)
    }
    .with_context(|| model.tok.chat_template_from.clone())?;
    // The template writes its own special tokens: never add them again.
    let ids = model.tok.encode(&text, false)?;
    if ids.is_empty() {
        bail!("the chat template rendered no tokens");
    }
    Ok(ids)
}

fn prompt_prefix(model: &Model, loc: &Loc, rec: &Record) -> Result<Vec<u32>> {
    // A prompt far longer than the model's context is refused before it is tokenized (the
    // tokenizer takes ~200 bytes of memory per byte of input).
    let limit = model.tok.byte_cap(model.cfg.max_position_embeddings);
    let bytes = rec
        .get("prompt")
        .or(rec.get("messages"))
        .map_or(0, |v| v.to_string().len());
    if bytes > limit {
        bail!(
            "{loc}: a prompt of {bytes} bytes cannot fit the model's {} positions",
            model.cfg.max_position_embeddings
        );
    }
    let got = match (rec.get("prompt"), rec.get("messages")) {
        (Some(Value::String(s)), _) => after_start(model, s).map(|x| x.0),
        (Some(m @ Value::Array(_)), _) | (None, Some(m @ Value::Array(_))) => {
            chat_ids(model, m, false)
        }
        _ => Err(anyhow!(
            "no prompt: expected a \"prompt\" field (text or messages) or a \"messages\" field"
        )),
    };
    got.with_context(|| loc.to_string())
}

/// The samples to draw: every prompt (or the one start) n times, sample index i taking
/// prefix i / n. Jobs are made one at a time from the index, so memory follows the samples
/// this process draws, not -n.
pub struct Jobs {
    prefixes: Vec<(Vec<u32>, &'static str, Option<Record>)>,
    n: u64,
    /// The indices this process draws (its shard).
    pub range: std::ops::Range<u64>,
}

impl Jobs {
    pub fn get(&self, index: u64) -> Job {
        let (ids, kind, prompt) = &self.prefixes[(index / self.n) as usize];
        Job {
            index,
            prefix_ids: ids.clone(),
            prefix_kind: kind,
            prompt: prompt.clone(),
        }
    }

    /// Sample `index`'s prefix ids.
    fn prefix(&self, index: u64) -> &[u32] {
        &self.prefixes[(index / self.n) as usize].0
    }

    fn longest(&self) -> usize {
        let (a, b) = (
            self.range.start / self.n.max(1),
            self.range.end.div_ceil(self.n.max(1)),
        );
        self.prefixes[a as usize..b as usize]
            .iter()
            .map(|p| p.0.len())
            .max()
            .unwrap_or(0)
    }
}

pub fn jobs(
    model: &Model,
    start: &Start,
    prompts: Option<&[(Loc, Record)]>,
    n: u64,
    shard: Option<(u64, u64)>,
) -> Result<Jobs> {
    let vocab = model.cfg.vocab_size as u32;
    let mut prefixes = Vec::new();
    match prompts {
        Some(prompts) => {
            for (loc, rec) in prompts {
                prefixes.push((prompt_prefix(model, loc, rec)?, "prompt", Some(rec.clone())));
            }
        }
        None => {
            let (ids, kind) = match start {
                Start::Document => {
                    let (s, k) = document_start(model)?;
                    (vec![s], k)
                }
                Start::Text(t) => (after_start(model, t)?.0, "text"),
                Start::Ids(ids) => {
                    if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
                        bail!("--prefix-ids: id {bad} is outside the vocabulary (0..{vocab})");
                    }
                    if ids.is_empty() {
                        bail!("--prefix-ids: give at least one id");
                    }
                    (ids.clone(), "ids")
                }
                Start::Chat => (chat_ids(model, &Value::Null, true)?, "chat"),
            };
            prefixes.push((ids, kind, None));
        }
    }
    let total = (prefixes.len() as u64).checked_mul(n).ok_or_else(|| {
        anyhow!(
            "-n {n} times {} prompts is more samples than can be counted",
            prefixes.len()
        )
    })?;
    let range = match shard {
        // In u128: (k − 1)·total / N cannot overflow.
        Some((k, parts)) => {
            let at = |k: u64| ((k as u128 * total as u128) / parts as u128) as u64;
            at(k - 1)..at(k)
        }
        None => 0..total,
    };
    Ok(Jobs {
        prefixes,
        n: n.max(1),
        range,
    })
}

pub struct Run<'a> {
    pub model: &'a Model,
    pub model_name: &'a str,
    pub params: &'a SamplingParams,
    pub seed: u64,
    pub batch_size: usize,
    pub ignore_eos: bool,
    pub log: &'a LogArgs,
}

impl Run<'_> {
    fn record(&self, job: &Job, g: Generated) -> Result<Record> {
        let mut rec = job.prompt.clone().unwrap_or_default();
        let body_end = g.tokens.len() - usize::from(g.finish == cf_common::generate::Finish::Eos);
        let text = self.model.tok.decode(&g.tokens[..body_end], false)?;
        let p = self.params;
        let fields = [
            (schema::TEXT, json!(text)),
            (schema::TOKEN_IDS, json!(g.tokens)),
            (schema::PREFIX_IDS, json!(job.prefix_ids)),
            (schema::PREFIX, json!(job.prefix_kind)),
            (schema::N_TOKENS, json!(g.tokens.len())),
            (schema::LOGPROB, json!(g.logprob)),
            (schema::FINISH_REASON, json!(g.finish.as_str())),
            (schema::INDEX, json!(job.index)),
            (schema::SEED, json!(self.seed)),
            ("temperature", json!(p.temperature)),
            ("top_p", json!(p.top_p)),
            ("top_k", json!(p.top_k)),
            ("min_p", json!(p.min_p)),
            ("max_tokens", json!(p.max_tokens)),
            (schema::MODEL, json!(self.model_name)),
        ];
        for (k, v) in fields {
            rec.insert(k.to_string(), v);
        }
        Ok(rec)
    }

    pub fn execute(&self, jobs: Jobs, output: &Output) -> Result<()> {
        let longest = jobs.longest();
        let limit = self.model.cfg.max_position_embeddings;
        if longest + self.params.max_tokens > limit {
            bail!("a prefix of {longest} tokens plus --max-tokens {} exceeds the model's {limit} positions", self.params.max_tokens);
        }
        let eos_ids: &[u32] = if self.ignore_eos {
            &[]
        } else {
            &self.model.eos_ids
        };
        let mut writer = Writer::create(output)?.flush_each(true);
        let bar = cf_common::progress::Progress::new(
            "cf-sample",
            "samples",
            Some(jobs.range.end - jobs.range.start),
            self.log,
        );
        let (t0, mut tokens, mut eos) = (Instant::now(), 0usize, 0usize);
        // Records leave in index order so output bytes do not depend on the batch size.
        let mut pending: BTreeMap<u64, Record> = BTreeMap::new();
        let mut next = jobs.range.start;
        let first = jobs.range.start;
        generate(
            &self.model.decoder,
            jobs.range
                .clone()
                .map(|x| (jobs.prefix(x).to_vec(), sample_rng(self.seed, x))),
            self.batch_size,
            longest,
            self.params,
            eos_ids,
            |k, g| {
                eos += usize::from(g.finish == cf_common::generate::Finish::Eos);
                let job = jobs.get(first + k as u64);
                pending.insert(job.index, self.record(&job, g)?);
                bar.inc(1);
                while let Some(rec) = pending.remove(&next) {
                    writer.write(&rec)?;
                    next += 1;
                }
                Ok(())
            },
            |active| {
                tokens += active;
                if tokens % 256 < active {
                    let secs = t0.elapsed().as_secs_f64().max(1e-9);
                    bar.set_message(format!("{:.0} tok/s", tokens as f64 / secs));
                }
            },
        )?;
        bar.finish();
        let n = writer.count();
        writer.finish()?;
        let secs = t0.elapsed().as_secs_f64();
        self.log.info(
            "cf-sample",
            format!(
                "{n} samples to {}: {tokens} tokens ({eos} ended at EOS, {} at --max-tokens) in {secs:.1} s, {:.0} tokens/s",
                output.name(),
                n - eos,
                tokens as f64 / secs.max(1e-9)
            ),
        );
        Ok(())
    }
}
