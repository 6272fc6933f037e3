//! Training examples from records: token ids and which of them the loss covers.
//!
//! - `token_ids` (cf-sample output): conditioned on `prefix_ids`, loss on exactly those ids;
//! - `messages` (or ShareGPT `conversations`): the chat template, loss on assistant turns only,
//!   found by rendering the conversation up to each assistant turn (no marker search);
//! - `prompt`/`completion` (text or message lists), Alpaca `instruction`/`input`/`output`:
//!   loss on the completion only;
//! - `text`: loss on every token.
//!
//! Plain text starts with the document-start token (BOS, else EOS, as cf-sample does) and ends
//! with EOS, which is always trained. Templates write their own special tokens: nothing is
//! added to them, and a doubled BOS is removed.

use anyhow::{anyhow, bail, Context, Result};
use cf_common::record::Record;
use cf_common::tokenizer::Tok;
use serde_json::{json, Value};

/// One tokenised training sequence.
#[derive(Clone, Debug)]
pub struct Example {
    pub ids: Vec<u32>,
    /// `target[i]`: the loss covers predicting `ids[i]` from `ids[..i]` (never true at 0).
    pub target: Vec<bool>,
    pub source: String,
    pub weight: f64,
    /// Trained towards the frozen original model's full next-token distribution (exact KL)
    /// instead of the sampled token.
    pub exact_kl: bool,
    pub truncated: bool,
}

impl Example {
    pub fn n_targets(&self) -> usize {
        self.target.iter().filter(|&&t| t).count()
    }
}

pub struct Builder<'a> {
    pub tok: &'a Tok,
    pub vocab: usize,
    pub eos_ids: &'a [u32],
    pub max_length: usize,
    /// Per-source weights from --weight (override the records' `weight`).
    pub weights: &'a [(String, f64)],
    /// Sources trained with the exact KL to the original model.
    pub exact_kl: &'a [String],
}

fn sharegpt_to_messages(conv: &Value) -> Result<Value> {
    let turns = conv
        .as_array()
        .ok_or_else(|| anyhow!("\"conversations\" is not a list"))?;
    let msgs = turns
        .iter()
        .map(|t| {
            let role = match t.get("from").and_then(Value::as_str) {
                Some("human") | Some("user") => "user",
                Some("gpt") | Some("assistant") => "assistant",
                Some("system") => "system",
                other => bail!("conversations: unknown speaker {other:?}"),
            };
            let content = t
                .get("value")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("conversations: a turn has no \"value\""))?;
            Ok(json!({"role": role, "content": content}))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Value::Array(msgs))
}

impl Builder<'_> {
    fn start(&self) -> Result<u32> {
        self.tok
            .document_start()
            .ok_or_else(|| anyhow!("the tokenizer has neither BOS nor EOS"))
    }

    fn eos(&self) -> Result<u32> {
        self.tok
            .eos_id
            .or_else(|| self.eos_ids.first().copied())
            .ok_or_else(|| anyhow!("the model has no EOS token"))
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tok.encode(text, false)
    }

    fn template(&self) -> Result<&str> {
        self.tok
            .chat_template
            .as_deref()
            .ok_or_else(|| anyhow!("messages need a chat template, and the model has none"))
    }

    fn render(&self, msgs: &[Value], gen: bool) -> Result<String> {
        cf_common::chat::render(
            self.template()?,
            &Value::Array(msgs.to_vec()),
            gen,
            self.tok.bos_token.as_deref(),
            self.tok.eos_token.as_deref(),
        )
    }

    /// Pieces of text, each with whether it is trained, tokenised piece by piece.
    fn pieces(&self, pieces: &[(String, bool)]) -> Result<(Vec<u32>, Vec<bool>)> {
        let (mut ids, mut target) = (Vec::new(), Vec::new());
        for (text, trained) in pieces {
            let t = self.encode(text)?;
            target.extend(std::iter::repeat_n(*trained, t.len()));
            ids.extend(t);
        }
        Ok((ids, target))
    }

    /// A conversation through the chat template; assistant turns are trained.
    fn messages(&self, msgs: &[Value]) -> Result<(Vec<u32>, Vec<bool>)> {
        let full = self.render(msgs, false)?;
        let mut pieces = Vec::new();
        let mut at = 0;
        for (i, m) in msgs.iter().enumerate() {
            if m.get("role").and_then(Value::as_str) != Some("assistant") {
                continue;
            }
            let before = self.render(&msgs[..i], true)?;
            let after = self.render(&msgs[..=i], false)?;
            if !full.starts_with(&before)
                || !full.starts_with(&after)
                || before.len() < at
                || after.len() < before.len()
            {
                bail!("the chat template does not render message {i} as a continuation of the ones before it, so its assistant turn cannot be isolated");
            }
            pieces.push((full[at..before.len()].to_string(), false));
            pieces.push((full[before.len()..after.len()].to_string(), true));
            at = after.len();
        }
        if at < full.len() {
            pieces.push((full[at..].to_string(), false));
        }
        if !pieces.iter().any(|p| p.1) {
            bail!("the conversation has no assistant turn to train on");
        }
        let (mut ids, mut target) = self.pieces(&pieces)?;
        if let Some(b) = self.tok.bos_id {
            if ids.len() >= 2 && ids[0] == b && ids[1] == b {
                ids.remove(0);
                target.remove(0);
            }
        }
        Ok((ids, target))
    }

    /// `[start] prompt completion EOS`, loss on the completion and EOS.
    fn prompt_completion(&self, prompt: &str, completion: &str) -> Result<(Vec<u32>, Vec<bool>)> {
        let mut ids = vec![self.start()?];
        let mut target = vec![false];
        let p = self.encode(prompt)?;
        target.extend(std::iter::repeat_n(false, p.len()));
        ids.extend(p);
        let c = self.encode(completion)?;
        target.extend(std::iter::repeat_n(true, c.len() + 1));
        ids.extend(c);
        ids.push(self.eos()?);
        Ok((ids, target))
    }

    pub fn build(&self, rec: &Record) -> Result<Example> {
        let vocab = self.vocab;
        let source = rec
            .get("source")
            .and_then(Value::as_str)
            .unwrap_or("train")
            .to_string();
        let str_of = |k: &str| rec.get(k).and_then(Value::as_str);
        let (mut ids, mut target) = if let Some(tokens) =
            cf_common::record::token_ids(rec, "token_ids", vocab)?
        {
            let prefix = match cf_common::record::token_ids(rec, "prefix_ids", vocab)? {
                Some(p) if !p.is_empty() => p,
                _ => vec![self.start()?],
            };
            let mut target = vec![false; prefix.len()];
            target.extend(std::iter::repeat_n(true, tokens.len()));
            (prefix.into_iter().chain(tokens).collect(), target)
        } else if let Some(m) = rec.get("messages").filter(|v| !v.is_null()) {
            self.messages(
                m.as_array()
                    .ok_or_else(|| anyhow!("\"messages\" is not a list"))?,
            )?
        } else if let Some(c) = rec.get("conversations").filter(|v| !v.is_null()) {
            self.messages(sharegpt_to_messages(c)?.as_array().unwrap())?
        } else if let (Some(p), Some(c)) = (rec.get("prompt"), rec.get("completion")) {
            match (p, c) {
                (Value::String(p), Value::String(c)) => self.prompt_completion(p, c)?,
                (Value::Array(p), Value::Array(c)) => {
                    let all: Vec<Value> = p.iter().chain(c).cloned().collect();
                    self.messages(&all)?
                }
                _ => bail!(
                    "\"prompt\" and \"completion\" must both be text or both be message lists"
                ),
            }
        } else if let (Some(ins), Some(out)) = (str_of("instruction"), str_of("output")) {
            let prompt = match str_of("input").filter(|s| !s.is_empty()) {
                Some(inp) => format!("{ins}\n\n{inp}"),
                None => ins.to_string(),
            };
            if self.tok.chat_template.is_some() {
                self.messages(&[
                    json!({"role": "user", "content": prompt}),
                    json!({"role": "assistant", "content": out}),
                ])?
            } else {
                self.prompt_completion(&format!("{prompt}\n\n"), out)?
            }
        } else if let Some(text) = str_of("text") {
            let body = self.encode(text)?;
            let mut ids = vec![self.start()?];
            ids.extend(body);
            ids.push(self.eos()?);
            let mut target = vec![true; ids.len()];
            target[0] = false;
            (ids, target)
        } else {
            bail!("nothing to train on: expected token_ids, messages, conversations, prompt/completion, instruction/output or text");
        };
        let truncated = ids.len() > self.max_length;
        ids.truncate(self.max_length);
        target.truncate(self.max_length);
        if let Some(t) = target.first_mut() {
            *t = false;
        }
        let weight = match self.weights.iter().find(|(s, _)| *s == source) {
            Some((_, w)) => *w,
            None => match rec.get("weight") {
                None | Some(Value::Null) => 1.0,
                Some(w) => w
                    .as_f64()
                    .filter(|w| w.is_finite() && *w >= 0.0)
                    .ok_or_else(|| anyhow!("\"weight\" must be a number >= 0"))?,
            },
        };
        let exact_kl = self.exact_kl.contains(&source);
        let ex = Example {
            ids,
            target,
            source,
            weight,
            exact_kl,
            truncated,
        };
        if ex.n_targets() == 0 {
            bail!(
                "no token is left to train on (all masked{})",
                if truncated {
                    ", after truncation to --max-length"
                } else {
                    ""
                }
            );
        }
        Ok(ex)
    }
}

/// Print examples token by token with their labels (-100 where the loss does not look), as
/// `--inspect` does.
pub fn inspect(tok: &Tok, examples: &[Example], out: &mut dyn std::io::Write) -> Result<()> {
    for (n, ex) in examples.iter().enumerate() {
        writeln!(
            out,
            "example {n}: source {}, weight {}, {} tokens, {} trained{}{}",
            ex.source,
            ex.weight,
            ex.ids.len(),
            ex.n_targets(),
            if ex.truncated { ", truncated" } else { "" },
            if ex.exact_kl { ", exact KL" } else { "" }
        )?;
        writeln!(out, "{:>6} {:>8} {:>8}  token", "pos", "id", "label")?;
        for (i, (&id, &t)) in ex.ids.iter().zip(&ex.target).enumerate() {
            let piece = tok.decode(&[id], false).context("decoding")?;
            let label = if t {
                id.to_string()
            } else {
                "-100".to_string()
            };
            writeln!(out, "{i:>6} {id:>8} {label:>8}  {piece:?}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}
