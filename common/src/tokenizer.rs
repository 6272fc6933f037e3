//! tokenizer.json with the special tokens of tokenizer_config.json and generation_config.json,
//! and the chat template (chat_template.jinja or tokenizer_config.json's `chat_template`).

use crate::model::config::token_ids;
use crate::model::ModelFiles;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// Each token's byte range in the encoded text.
pub type Offsets = Vec<(usize, usize)>;

/// A model's tokenizer and the special tokens the tools need.
pub struct Tok {
    pub inner: tokenizers::Tokenizer,
    /// BOS as the tokenizer defines it (tokenizer_config.json `bos_token`); None for OLMo, Qwen.
    pub bos_id: Option<u32>,
    /// EOS of the tokenizer (tokenizer_config.json `eos_token`).
    pub eos_id: Option<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
    /// Where the chat template came from, for messages: a file, or tokenizer_config.json.
    pub chat_template_from: String,
    /// Largest id the tokenizer can produce, plus one.
    pub vocab_len: usize,
    /// Bytes of the longest vocabulary entry (an upper bound on one token's text).
    pub longest_token: usize,
    /// Whether tokenizer.json's post-processor adds special tokens (Llama-3's BOS) when asked.
    pub adds_special_tokens: bool,
}

/// A prefix of `text` of at most `cap` bytes, cut after a whitespace when there is one in its
/// second half (so the pre-tokenizer splits what is kept as it would split the whole), and
/// whether anything was cut.
pub fn cut_right(text: &str, cap: usize) -> (&str, bool) {
    if text.len() <= cap {
        return (text, false);
    }
    let mut end = cap;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if let Some(ws) = text[end / 2..end].rfind(char::is_whitespace) {
        end = end / 2 + ws;
    }
    (&text[..end], true)
}

/// A suffix of `text` of at most `cap` bytes, cut before a whitespace when there is one.
pub fn cut_left(text: &str, cap: usize) -> (&str, bool) {
    if text.len() <= cap {
        return (text, false);
    }
    let mut start = text.len() - cap;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let mid = start + (text.len() - start) / 2;
    let mut mid = mid;
    while !text.is_char_boundary(mid) {
        mid += 1;
    }
    if let Some(ws) = text[start..mid].find(char::is_whitespace) {
        start += ws;
    }
    (&text[start..], true)
}

fn read_json(p: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}: invalid JSON: {e}", p.display()))
}

/// A special token in tokenizer_config.json: a string or an AddedToken object `{"content": ..}`.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

impl Tok {
    pub fn load(files: &ModelFiles) -> Result<Tok> {
        let Some(path) = &files.tokenizer else {
            bail!(
                "{}: no tokenizer.json in the model folder",
                files.dir.display()
            );
        };
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: not a valid tokenizer: {e}", path.display()))?;
        let tc = match &files.tokenizer_config {
            Some(p) => read_json(p)?,
            None => Value::Null,
        };
        let bos_token = token_str(tc.get("bos_token"));
        let eos_token = token_str(tc.get("eos_token"));
        let id = |tok: &Option<String>, what: &str| -> Result<Option<u32>> {
            match tok {
                None => Ok(None),
                Some(t) => inner.token_to_id(t).map(Some).ok_or_else(|| {
                    anyhow!(
                        "tokenizer_config.json: {what} {t:?} is not in tokenizer.json's vocabulary"
                    )
                }),
            }
        };
        let bos_id = id(&bos_token, "bos_token")?;
        let eos_id = id(&eos_token, "eos_token")?;
        let chat_template_from = match (&files.chat_template, &files.tokenizer_config) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(p)) => format!("{} (chat_template)", p.display()),
            (None, None) => files.dir.display().to_string(),
        };
        let chat_template = match &files.chat_template {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("{}: cannot read", p.display()))?,
            ),
            None => match tc.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|t| t.get("template").and_then(Value::as_str).map(String::from)),
                _ => None,
            },
        };
        let vocab_len = inner
            .get_vocab(true)
            .values()
            .map(|&i| i as usize + 1)
            .max()
            .unwrap_or(0);
        let longest_token = inner
            .get_vocab(true)
            .keys()
            .map(|k| k.len())
            .max()
            .unwrap_or(1);
        let adds_special_tokens = {
            let enc = |special| inner.encode("a", special).map(|e| e.get_ids().to_vec());
            matches!((enc(true), enc(false)), (Ok(a), Ok(b)) if a != b)
        };
        Ok(Tok {
            adds_special_tokens,
            longest_token,
            inner,
            bos_id,
            eos_id,
            bos_token,
            eos_token,
            chat_template,
            chat_template_from,
            vocab_len,
        })
    }

    /// Bytes of text that certainly hold the first (or last) `tokens` tokens, with a margin:
    /// texts are cut to this before tokenizing, so memory per record is bounded (the tokenizer
    /// takes ~200 bytes of memory per byte of input).
    pub fn byte_cap(&self, tokens: usize) -> usize {
        (tokens + 16).saturating_mul(self.longest_token.max(4) * 4) + (1 << 16)
    }

    /// The token a context-free sample starts from: BOS, else EOS (lm-evaluation-harness's
    /// `prefix_token_id` rule).
    pub fn document_start(&self) -> Option<u32> {
        self.bos_id.or(self.eos_id)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizer: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// Token ids and each token's byte range in `text`.
    pub fn encode_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Offsets)> {
        let e = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok((e.get_ids().to_vec(), e.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("tokenizer: {e}"))
    }
}

/// EOS ids from generation_config.json (an int or a list), if the file exists.
pub fn generation_eos(files: &ModelFiles) -> Result<Vec<u32>> {
    match &files.generation_config {
        Some(p) => Ok(token_ids(&read_json(p)?.get("eos_token_id").cloned())),
        None => Ok(Vec::new()),
    }
}
