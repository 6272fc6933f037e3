//! Training examples from records: token ids and which of them the loss covers.
//!
//! - `token_ids` (cf-sample output): conditioned on `prefix_ids`, loss on exactly those ids;
//! - `messages` (or ShareGPT `conversations`): the chat template, loss on assistant turns only;
//! - `prompt`/`completion` (text or message lists), Alpaca `instruction`/`input`/`output`:
//!   loss on the completion only;
//! - `text`: loss on every token.
//!
//! Which tokens carry loss, as TRL 1.16's SFTTrainer decides it:
//! - prompt/completion: prompt and prompt+completion are tokenised as wholes, and the
//!   completion starts where the two token lists part (TRL's `common_prefix_length`); when that
//!   is inside the prompt (a token spans the boundary, or a chat template renders the prompt
//!   alone differently, like DeepSeek-R1's `<think>\n`), a warning says so;
//! - a chat template with `{% generation %}` blocks: exactly the tokens those blocks produce
//!   (TRL's `assistant_only_loss`), and for prompt/completion only those after the prompt;
//! - a chat template without them (`messages`): each assistant turn from where the
//!   conversation parts from that turn's generation prompt to where it parts from the
//!   conversation rendered up to and including that turn. A template that renders a turn
//!   differently once later turns follow (Qwen3 drops earlier turns' reasoning) leaves no such
//!   span and is refused with a pointer to `--chat-template` and a template with markers (TRL
//!   ships them, e.g. `qwen3_training.jinja`); TRL without markers trains every token instead.
//! - A template that drops an assistant message's reasoning (DeepSeek-R1-Distill's keeps only
//!   what follows `</think>`) trains only what it renders; a warning counts such messages.
//!
//! Plain text is tokenised with the tokenizer's own special tokens when it adds any (Llama-3:
//! BOS), as TRL does; when it adds none, cf puts the document-start token (BOS, else EOS, as
//! cf-sample starts its samples) in front so the first token is trained too. EOS is appended
//! unless the text or completion already ends with it, and is trained. Templates write their
//! own special tokens: nothing is added to a rendered conversation.

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
    /// Warnings met while building examples, with how often.
    pub notes: std::cell::RefCell<std::collections::BTreeMap<String, usize>>,
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

/// How many leading tokens two token lists share (TRL's `common_prefix_length`).
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
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

    /// Count a warning, printed once with its count after the data is read.
    fn note(&self, msg: &str) {
        *self.notes.borrow_mut().entry(msg.to_string()).or_default() += 1;
    }

    /// `text` cut to what can hold --max-length tokens (later tokens are truncated anyway), so
    /// a huge record costs bounded memory.
    fn bounded<'t>(&self, text: &'t str) -> &'t str {
        let (t, cut) = cf_common::tokenizer::cut_right(text, self.tok.byte_cap(self.max_length));
        if cut {
            self.note("records longer than --max-length were cut before tokenizing");
        }
        t
    }

    /// Plain text as the tokenizer encodes it with its special tokens; when it adds none, the
    /// document-start token goes in front.
    fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let text = self.bounded(text);
        if self.tok.adds_special_tokens {
            return self.tok.encode(text, true);
        }
        let mut ids = vec![self.start()?];
        ids.extend(self.tok.encode(text, false)?);
        Ok(ids)
    }

    /// EOS after `ids` unless `text` already ends with the EOS token.
    fn with_eos(&self, text: &str, mut ids: Vec<u32>) -> Result<Vec<u32>> {
        let ends = self
            .tok
            .eos_token
            .as_deref()
            .is_some_and(|e| !e.is_empty() && text.ends_with(e));
        if !ends {
            ids.push(self.eos()?);
        }
        Ok(ids)
    }

    fn template(&self) -> Result<&str> {
        self.tok
            .chat_template
            .as_deref()
            .ok_or_else(|| anyhow!("messages need a chat template, and the model has none"))
    }

    fn render(&self, msgs: &[Value], gen: bool) -> Result<cf_common::chat::Rendered> {
        cf_common::chat::render_spans(
            self.template()?,
            &Value::Array(msgs.to_vec()),
            gen,
            self.tok.bos_token.as_deref(),
            self.tok.eos_token.as_deref(),
        )
        .with_context(|| self.tok.chat_template_from.clone())
    }

    /// A rendered conversation's tokens (the template wrote its special tokens).
    fn chat_ids(&self, text: &str) -> Result<Vec<u32>> {
        self.tok.encode(self.bounded(text), false)
    }

    /// Warn when the template dropped an assistant message's reasoning from the rendering.
    fn check_reasoning(&self, msgs: &[Value], text: &str) {
        for m in msgs {
            let Some(c) = m.get("content").and_then(Value::as_str) else {
                continue;
            };
            if m.get("role").and_then(Value::as_str) != Some("assistant") {
                continue;
            }
            if let Some((before, _)) = c.split_once("</think>") {
                let r = before.trim().trim_start_matches("<think>").trim();
                if !r.is_empty() && !text.contains(r) {
                    self.note("the chat template drops the reasoning (before </think>) of assistant messages, so it is not trained; to train reasoning traces give a template that keeps it, with {% generation %} blocks (e.g. TRL's deepseek_r1_distill_training.jinja), with --chat-template");
                }
            }
        }
    }

    /// A conversation through the chat template. With `prompt_len = Some(k)`, the first k
    /// messages are a prompt and the rest its completion (conversational prompt/completion).
    fn conversation(
        &self,
        msgs: &[Value],
        prompt_len: Option<usize>,
    ) -> Result<(Vec<u32>, Vec<bool>)> {
        let full = self.render(msgs, false)?;
        self.check_reasoning(msgs, &full.text);
        let markers = cf_common::chat::has_generation_markers(self.template()?);
        let (ids, offsets) = self.tok.encode_offsets(self.bounded(&full.text), false)?;
        let mut target = vec![false; ids.len()];
        if markers {
            for (t, &(s, e)) in offsets.iter().enumerate() {
                target[t] = full.generation.iter().any(|&(a, b)| s < b && e > a);
            }
        }
        match prompt_len {
            Some(k) => {
                let p = self.chat_ids(&self.render(&msgs[..k], true)?.text)?;
                let start = common_prefix(&p, &ids);
                if start < p.len() {
                    self.note("the rendered prompt is not a prefix of the rendered prompt+completion (the template renders the prompt alone differently, or a token spans the boundary): the completion's loss starts where they part, as in TRL");
                }
                for (t, x) in target.iter_mut().enumerate() {
                    *x = t >= start && (*x || !markers);
                }
            }
            None if markers => {}
            None => {
                for (i, m) in msgs.iter().enumerate() {
                    if m.get("role").and_then(Value::as_str) != Some("assistant") {
                        continue;
                    }
                    let before = self.chat_ids(&self.render(&msgs[..i], true)?.text)?;
                    let after = self.chat_ids(&self.render(&msgs[..=i], false)?.text)?;
                    let (s, e) = (common_prefix(&before, &ids), common_prefix(&after, &ids));
                    if e <= s {
                        bail!("the chat template renders assistant message {i} differently once later messages follow (e.g. it drops earlier turns' reasoning), so its tokens cannot be told apart; give a template with {{% generation %}} blocks (TRL ships them, e.g. qwen3_training.jinja) with --chat-template, or one conversation per record");
                    }
                    target[s..e].iter_mut().for_each(|x| *x = true);
                }
            }
        }
        if !target.iter().any(|&t| t) {
            bail!("the conversation has no assistant tokens to train on");
        }
        Ok((ids, target))
    }

    /// Text prompt/completion: tokenised together, loss from where the prompt's own tokens
    /// stop matching (and on EOS).
    fn prompt_completion(&self, prompt: &str, completion: &str) -> Result<(Vec<u32>, Vec<bool>)> {
        let p = self.encode_plain(prompt)?;
        let whole = self.with_eos(
            completion,
            self.encode_plain(&format!("{prompt}{completion}"))?,
        )?;
        let start = common_prefix(&p, &whole);
        if start < p.len() {
            self.note("a prompt/completion boundary falls inside a token (e.g. \" caf\" + \"é\"): the loss starts at that token, as in TRL");
        }
        let target = (0..whole.len()).map(|i| i >= start).collect();
        Ok((whole, target))
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
            self.conversation(
                m.as_array()
                    .ok_or_else(|| anyhow!("\"messages\" is not a list"))?,
                None,
            )?
        } else if let Some(c) = rec.get("conversations").filter(|v| !v.is_null()) {
            self.conversation(sharegpt_to_messages(c)?.as_array().unwrap(), None)?
        } else if let (Some(p), Some(c)) = (rec.get("prompt"), rec.get("completion")) {
            match (p, c) {
                (Value::String(p), Value::String(c)) => self.prompt_completion(p, c)?,
                (Value::Array(p), Value::Array(c)) => {
                    let all: Vec<Value> = p.iter().chain(c).cloned().collect();
                    self.conversation(&all, Some(p.len()))?
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
                self.conversation(
                    &[
                        json!({"role": "user", "content": prompt}),
                        json!({"role": "assistant", "content": out}),
                    ],
                    None,
                )?
            } else {
                self.prompt_completion(&format!("{prompt}\n\n"), out)?
            }
        } else if let Some(text) = str_of("text") {
            let ids = self.with_eos(text, self.encode_plain(text)?)?;
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

/// How `--inspect` prints.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq)]
pub enum InspectFormat {
    /// A table per example: position, id, label, token.
    #[default]
    Table,
    /// One JSON record per example: input_ids and labels (-100 where no loss), as TRL's
    /// prepared dataset holds them, plus source, weight and the trained text.
    Jsonl,
}

/// Print examples token by token with their labels (-100 where the loss does not look), as
/// `--inspect` does.
pub fn inspect(
    tok: &Tok,
    examples: &[Example],
    format: InspectFormat,
    out: &mut dyn std::io::Write,
) -> Result<()> {
    if format == InspectFormat::Jsonl {
        for ex in examples {
            let labels: Vec<i64> = ex
                .ids
                .iter()
                .zip(&ex.target)
                .map(|(&id, &t)| if t { id as i64 } else { -100 })
                .collect();
            let trained: Vec<u32> = ex
                .ids
                .iter()
                .zip(&ex.target)
                .filter(|p| *p.1)
                .map(|p| *p.0)
                .collect();
            let line = json!({
                "source": ex.source, "weight": ex.weight, "exact_kl": ex.exact_kl,
                "truncated": ex.truncated, "input_ids": ex.ids, "labels": labels,
                "trained_text": tok.decode(&trained, false)?,
            });
            writeln!(out, "{line}")?;
        }
        return Ok(());
    }
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
