//! Log-likelihood requests scored as lm-evaluation-harness 0.4.13's HF backend does (its
//! tokenisation rules, truncation and rolling windows), with the context computed once per
//! question for all its choices, or (`--batch-size N`) many questions' rows in one forward pass.

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Tensor, D};
use cf_common::model::{KvCache, Model};

pub struct Scorer<'a> {
    pub model: &'a Model,
    /// lm-eval's `add_bos_token`: None leaves it to the tokenizer (tokenizer.json's
    /// post-processor), Some(true) puts BOS in front, Some(false) adds nothing.
    pub add_bos: Option<bool>,
    /// lm-eval's max_length (the model's max_position_embeddings).
    pub max_len: usize,
    /// The prefix token's text: a text starting with it gets no second one.
    prefix_text: String,
}

/// (log-likelihood, whether every continuation token was the argmax).
pub type Ll = (f64, bool);

/// Python's `str.isspace`: Unicode White_Space plus the separators \x1c–\x1f.
pub fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

impl<'a> Scorer<'a> {
    pub fn new(model: &'a Model, add_bos: Option<bool>, max_len: usize) -> Result<Scorer<'a>> {
        let prefix = model
            .tok
            .document_start()
            .ok_or_else(|| anyhow!("the tokenizer has neither BOS nor EOS"))?;
        let prefix_text = model.tok.decode(&[prefix], false)?;
        Ok(Scorer {
            model,
            add_bos,
            max_len,
            prefix_text,
        })
    }

    /// lm-eval's `prefix_token_id`: BOS, else EOS.
    pub fn prefix(&self) -> Result<u32> {
        self.model
            .tok
            .document_start()
            .ok_or_else(|| anyhow!("the tokenizer has neither BOS nor EOS"))
    }

    /// Encode with the special tokens lm-eval's `add_bos_token` asks for (`add_special`
    /// = None is the tokenizer's default).
    fn encode_special(&self, s: &str, add_special: Option<bool>) -> Result<Vec<u32>> {
        let tok = &self.model.tok;
        match add_special {
            None => tok.encode(s, true),
            Some(false) => tok.encode(s, false),
            // transformers replaces the post-processor by "<bos> $A" (no BOS token: nothing).
            Some(true) => {
                let mut ids: Vec<u32> = tok.bos_id.into_iter().collect();
                ids.extend(tok.encode(s, false)?);
                Ok(ids)
            }
        }
    }

    /// lm-eval's `tok_encode`: no special tokens when the text already starts with the prefix
    /// token's text (no second BOS), else as `add_bos_token` says.
    pub fn tok_encode(&self, s: &str) -> Result<Vec<u32>> {
        if !self.prefix_text.is_empty() && s.starts_with(&self.prefix_text) {
            return self.model.tok.encode(s, false);
        }
        self.encode_special(s, self.add_bos)
    }

    /// A generation prompt, as lm-eval's `tok_batch_encode`: no special tokens when the text
    /// starts with the BOS text, else as `add_bos_token` says; then the last `keep` tokens.
    pub fn prompt_ids(&self, s: &str, keep: usize) -> Result<Vec<u32>> {
        let tok = &self.model.tok;
        // Only the last `keep` tokens are used: a huge prompt is cut from the left first, so
        // memory stays bounded (the tokenizer takes ~200 bytes per byte of input).
        let s = cf_common::tokenizer::cut_left(s, tok.byte_cap(keep)).0;
        let ids = match tok.bos_token.as_deref() {
            Some(b) if !b.is_empty() && s.starts_with(b) => tok.encode(s, false)?,
            _ => self.encode_special(s, self.add_bos)?,
        };
        Ok(ids[ids.len().saturating_sub(keep)..].to_vec())
    }

    /// lm-eval's `_encode_pair`, and for an empty context its `loglikelihood` rule: the
    /// context is the prefix token (or the continuation's own first token when that is it).
    pub fn encode_pair(&self, ctx: &str, cont: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        if ctx.is_empty() {
            let c = self.model.tok.encode(cont, false)?;
            let p = self.prefix()?;
            return Ok(match c.first() {
                Some(&f) if f == p => (c[..1].to_vec(), c[1..].to_vec()),
                _ => (vec![p], c),
            });
        }
        // Only the last max_len + 1 tokens are scored: a huge context is cut from the left
        // first (far beyond what is kept), so memory stays bounded.
        let ctx = cf_common::tokenizer::cut_left(ctx, self.model.tok.byte_cap(self.max_len + 1)).0;
        let trimmed = ctx.trim_end_matches(py_space);
        let (ctx, cont) = (trimmed, format!("{}{cont}", &ctx[trimmed.len()..]));
        let whole = self.tok_encode(&format!("{ctx}{cont}"))?;
        let c = self.tok_encode(ctx)?;
        if c.is_empty() {
            bail!("the context is only whitespace (lm-eval asserts on it)");
        }
        Ok((c.clone(), whole.get(c.len()..).unwrap_or(&[]).to_vec()))
    }

    /// Log-likelihoods of continuations that share one context: the context runs once, then
    /// every continuation (but its last token, which is only predicted) continues from its
    /// cache in one batch.
    fn shared(&self, ctx: &[u32], conts: &[Vec<u32>]) -> Result<Vec<Ll>> {
        let d = &self.model.decoder;
        let dev = d.device();
        let longest = conts.iter().map(Vec::len).max().unwrap_or(0);
        let mut cache = KvCache::new(d.cfg.num_layers, ctx.len() + longest - 1);
        let h = d.forward_hidden(&Tensor::new(ctx, dev)?.unsqueeze(0)?, Some(&mut cache))?;
        // Only the continuation tokens' log-probabilities and the argmaxes leave the device,
        // never whole vocabulary rows.
        let first = lsm(d.logits(&h.narrow(1, ctx.len() - 1, 1)?.squeeze(1)?)?)?.squeeze(0)?;
        let firsts: Vec<u32> = conts.iter().map(|c| c[0]).collect();
        let first_lp: Vec<f32> = first
            .index_select(&Tensor::new(firsts.as_slice(), dev)?, 0)?
            .to_vec1()?;
        let first_best = first.argmax(0)?.to_scalar::<u32>()?;
        let n = conts.len();
        let (rest_lp, rest_best) = if longest > 1 {
            cache.select_rows(&vec![0u32; n])?;
            let w = longest - 1;
            let mut ids = vec![0u32; n * w];
            let mut next = vec![0u32; n * w];
            for (i, c) in conts.iter().enumerate() {
                // Position j (token c[j]) predicts c[j + 1].
                ids[i * w..i * w + c.len() - 1].copy_from_slice(&c[..c.len() - 1]);
                next[i * w..i * w + c.len() - 1].copy_from_slice(&c[1..]);
            }
            let h = d.forward_hidden(&Tensor::from_vec(ids, (n, w), dev)?, Some(&mut cache))?;
            let lp = lsm(d.logits(&h)?)?;
            let tg = Tensor::from_vec(next, (n, w, 1), dev)?;
            (
                lp.gather(&tg, 2)?.squeeze(2)?.to_vec2::<f32>()?,
                lp.argmax(D::Minus1)?.to_vec2::<u32>()?,
            )
        } else {
            (vec![Vec::new(); n], vec![Vec::new(); n])
        };
        conts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let ll = first_lp[i] as f64
                    + rest_lp[i][..c.len() - 1]
                        .iter()
                        .map(|&x| x as f64)
                        .sum::<f64>();
                if !ll.is_finite() {
                    bail!(
                        "{}: the model gives a non-finite log-likelihood ({ll}); do its weights hold NaN or inf?",
                        self.model.files.dir.display()
                    );
                }
                let greedy = first_best == c[0] && rest_best[i][..c.len() - 1] == c[1..];
                Ok((ll, greedy))
            })
            .collect()
    }

    /// lm-eval's `_loglikelihood_tokens` input: the last max_len + 1 tokens of context +
    /// continuation, the last of them only predicted. Returns the context part kept.
    fn truncate(&self, ctx: &[u32], cont: &[u32]) -> Result<Vec<u32>> {
        if cont.is_empty() {
            bail!("the continuation has no tokens of its own after the context");
        }
        if cont.len() > self.max_len {
            bail!(
                "a continuation of {} tokens is longer than the model's {} positions",
                cont.len(),
                self.max_len
            );
        }
        let over = (ctx.len() + cont.len()).saturating_sub(self.max_len + 1);
        Ok(ctx[over.min(ctx.len())..].to_vec())
    }

    /// Score (context, continuation) token pairs: pairs with the same context share its
    /// forward pass.
    fn score_pairs(&self, pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<Ll>> {
        let mut kept = Vec::with_capacity(pairs.len());
        for (c, k) in pairs {
            kept.push((self.truncate(c, k)?, k.clone()));
        }
        // A kept context is never empty: the continuation fits in max_len positions.
        if kept.windows(2).all(|w| w[0].0 == w[1].0) {
            let conts: Vec<Vec<u32>> = kept.iter().map(|p| p.1.clone()).collect();
            return self.shared(&kept[0].0, &conts);
        }
        kept.iter()
            .map(|(c, k)| self.shared(c, std::slice::from_ref(k)).map(|v| v[0]))
            .collect()
    }

    /// Score (context, continuation) pairs of many questions, up to `rows` of them in one
    /// forward pass (lm-eval's batching): each pair is one row, its context and continuation
    /// but the continuation's last token, right-padded (the causal mask keeps padding out of
    /// every real position). Longest rows first, as lm-eval orders them; results in input
    /// order. Only the continuation positions' hidden states go through the output layer.
    pub fn score_batched(&self, pairs: &[(Vec<u32>, Vec<u32>)], rows: usize) -> Result<Vec<Ll>> {
        let d = &self.model.decoder;
        let dev = d.device();
        let mut kept = Vec::with_capacity(pairs.len());
        for (c, k) in pairs {
            kept.push((self.truncate(c, k)?, k.clone()));
        }
        let len = |i: usize| kept[i].0.len() + kept[i].1.len() - 1;
        let mut order: Vec<usize> = (0..kept.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(len(i)));
        let mut out = vec![(0.0, false); kept.len()];
        for chunk in order.chunks(rows.max(1)) {
            let w = chunk.iter().map(|&i| len(i)).max().unwrap_or(1);
            let mut ids = vec![0u32; chunk.len() * w];
            let (mut at, mut next) = (Vec::new(), Vec::new());
            for (r, &i) in chunk.iter().enumerate() {
                let (c, k) = &kept[i];
                let row = &mut ids[r * w..r * w + len(i)];
                row[..c.len()].copy_from_slice(c);
                row[c.len()..].copy_from_slice(&k[..k.len() - 1]);
                // Position c.len() − 1 + j predicts k[j].
                for (j, &tok) in k.iter().enumerate() {
                    at.push((r * w + c.len() - 1 + j) as u32);
                    next.push(tok);
                }
            }
            let h = d.forward_hidden(&Tensor::from_vec(ids, (chunk.len(), w), dev)?, None)?;
            let h = h
                .reshape((chunk.len() * w, h.dim(2)?))?
                .index_select(&Tensor::new(at.as_slice(), dev)?, 0)?;
            let lp = lsm(d.logits(&h)?)?;
            let tg = Tensor::new(next.as_slice(), dev)?.unsqueeze(1)?;
            let lps: Vec<f32> = lp.gather(&tg, 1)?.squeeze(1)?.to_vec1()?;
            let best: Vec<u32> = lp.argmax(D::Minus1)?.to_vec1()?;
            let mut o = 0;
            for &i in chunk {
                let k = kept[i].1.len();
                let ll: f64 = lps[o..o + k].iter().map(|&x| x as f64).sum();
                if !ll.is_finite() {
                    bail!(
                        "{}: the model gives a non-finite log-likelihood ({ll}); do its weights hold NaN or inf?",
                        self.model.files.dir.display()
                    );
                }
                out[i] = (ll, best[o..o + k] == next[o..o + k]);
                o += k;
            }
        }
        Ok(out)
    }

    /// Score one question's requests.
    pub fn loglikelihoods(&self, requests: &[(String, String)]) -> Result<Vec<Ll>> {
        let pairs = requests
            .iter()
            .map(|(c, k)| self.encode_pair(c, k))
            .collect::<Result<Vec<_>>>()?;
        self.score_pairs(&pairs)
    }

    /// lm-eval's `loglikelihood_rolling`: the text as `tok_encode` encodes it, in windows of
    /// max_len predicted tokens (`get_rolling_token_windows` with context_len 1 and
    /// `make_disjoint_window`): the first after the prefix token, each later full window
    /// after the one token before it, the last partial one after as many earlier tokens as
    /// fill the model. Returns (log-likelihood, tokens scored).
    pub fn rolling(&self, text: &str) -> Result<(f64, usize)> {
        let toks = self.tok_encode(text)?;
        let l = self.max_len;
        let mut total = 0.0;
        for (ctx, cont) in rolling_windows(&toks, self.prefix()?, l) {
            total += self.score_pairs(&[(ctx, cont)])?[0].0;
        }
        Ok((total, toks.len()))
    }
}

/// `make_disjoint_window(get_rolling_token_windows(tokens, prefix, max_len, 1))`.
pub fn rolling_windows(t: &[u32], prefix: u32, max_len: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut out = Vec::new();
    if t.is_empty() {
        return out;
    }
    let first = max_len.min(t.len());
    // ([prefix] + t[..first-1], t[..first]) made disjoint: the prefix alone.
    out.push((vec![prefix], t[..first].to_vec()));
    let mut predicted = first;
    while predicted < t.len() {
        let pred = (t.len() - predicted).min(max_len);
        let end = predicted + pred;
        let a = &t[end - max_len - 1..end - 1];
        let b = t[end - pred..end].to_vec();
        out.push((a[..a.len() - (b.len() - 1)].to_vec(), b));
        predicted += pred;
    }
    out
}

fn lsm(logits: Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(
        &logits.to_dtype(DType::F32)?,
        D::Minus1,
    )?)
}

#[cfg(test)]
mod tests {
    use super::rolling_windows;

    #[test]
    fn windows_are_lm_evals() {
        // lm-eval's own output for L = 8 (get_rolling_token_windows + make_disjoint_window).
        let t: Vec<u32> = (10..30).collect();
        let w = rolling_windows(&t, 1, 8);
        assert_eq!(w[0], (vec![1], (10..18).collect()));
        assert_eq!(w[1], (vec![17], (18..26).collect()));
        // The last partial window: the 8-token input t[11..19] (values 21..29), predicting
        // the last 4, so its context is the 5 tokens before them.
        assert_eq!(w[2], ((21..26).collect(), (26..30).collect()));
        let exact: Vec<u32> = (0..8).collect();
        assert_eq!(rolling_windows(&exact, 1, 8).len(), 1);
        let plus1: Vec<u32> = (0..9).collect();
        assert_eq!(
            rolling_windows(&plus1, 1, 8)[1],
            ((0..8).collect(), vec![8])
        );
    }
}
