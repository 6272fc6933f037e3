//! Log-likelihood requests scored as lm-evaluation-harness's HF backend does, but with the
//! context computed once per question for all its choices.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use cf_common::model::{KvCache, Model};

pub struct Scorer<'a> {
    pub model: &'a Model,
    /// lm-eval's `add_bos_token` (off by default: the tokenizer adds no special tokens).
    pub add_bos: bool,
    /// Longest input; longer ones lose context tokens from the left, as in lm-eval.
    pub max_len: usize,
}

/// (log-likelihood, whether every continuation token was the argmax).
pub type Ll = (f64, bool);

impl Scorer<'_> {
    fn tok(&self, s: &str) -> Result<Vec<u32>> {
        self.model.tok.encode(s, self.add_bos)
    }

    /// lm-eval's `_encode_pair`: trailing spaces of the context move onto the continuation,
    /// the continuation's tokens are those of context+continuation after the context's, and an
    /// empty context is the prefix token (BOS, else EOS).
    pub fn encode_pair(&self, ctx: &str, cont: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        if ctx.is_empty() {
            let prefix = self
                .model
                .tok
                .document_start()
                .ok_or_else(|| anyhow::anyhow!("no BOS or EOS token for an empty context"))?;
            return Ok((vec![prefix], self.tok(cont)?));
        }
        let trimmed = ctx.trim_end();
        let (ctx, cont) = (
            trimmed.to_string(),
            format!("{}{cont}", &ctx[trimmed.len()..]),
        );
        let whole = self.tok(&format!("{ctx}{cont}"))?;
        let c = self.tok(&ctx)?;
        if c.is_empty() {
            bail!("the context is only whitespace");
        }
        let cont_enc = whole.get(c.len()..).unwrap_or(&[]).to_vec();
        if cont_enc.is_empty() {
            bail!("the continuation {cont:?} has no tokens of its own after the context");
        }
        Ok((c, cont_enc))
    }

    /// Log-likelihoods of continuations that share one context: the context runs once, then
    /// every continuation continues from its cache in one batch.
    fn shared(&self, ctx: &[u32], conts: &[Vec<u32>]) -> Result<Vec<Ll>> {
        let d = &self.model.decoder;
        let dev = d.device();
        let longest = conts.iter().map(Vec::len).max().unwrap_or(0);
        let mut cache = KvCache::new(d.cfg.num_layers, ctx.len() + longest);
        let h = d.forward_hidden(&Tensor::new(ctx, dev)?.unsqueeze(0)?, Some(&mut cache))?;
        let first = lsm(d.logits(&h.narrow(1, ctx.len() - 1, 1)?.squeeze(1)?)?)?.squeeze(0)?;
        let first: Vec<f32> = first.to_vec1()?;
        let n = conts.len();
        cache.select_rows(&vec![0u32; n])?;
        let mut ids = vec![0u32; n * longest];
        for (i, c) in conts.iter().enumerate() {
            ids[i * longest..i * longest + c.len()].copy_from_slice(c);
        }
        let rest = if longest > 1 {
            let h =
                d.forward_hidden(&Tensor::from_vec(ids, (n, longest), dev)?, Some(&mut cache))?;
            Some(lsm(d.logits(&h)?)?.to_vec3::<f32>()?)
        } else {
            None
        };
        let argmax = |row: &[f32]| {
            row.iter()
                .enumerate()
                .fold(0, |b, (i, &x)| if x > row[b] { i } else { b })
        };
        Ok(conts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut ll = first[c[0] as usize] as f64;
                let mut greedy = argmax(&first) == c[0] as usize;
                for j in 1..c.len() {
                    let row = &rest.as_ref().unwrap()[i][j - 1];
                    ll += row[c[j] as usize] as f64;
                    greedy &= argmax(row) == c[j] as usize;
                }
                (ll, greedy)
            })
            .collect())
    }

    /// Log-likelihoods of (context, continuation) token pairs, each a full forward pass.
    fn separate(&self, pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<Ll>> {
        pairs
            .iter()
            .map(|(c, k)| self.shared(c, std::slice::from_ref(k)).map(|v| v[0]))
            .collect()
    }

    /// Score one question's requests.
    pub fn loglikelihoods(&self, requests: &[(String, String)]) -> Result<Vec<Ll>> {
        let mut pairs = requests
            .iter()
            .map(|(c, k)| self.encode_pair(c, k))
            .collect::<Result<Vec<_>>>()?;
        for (c, k) in pairs.iter_mut() {
            // lm-eval keeps the last max_len + 1 tokens of context + continuation.
            let over = (c.len() + k.len()).saturating_sub(self.max_len + 1);
            if over >= c.len() {
                bail!(
                    "a continuation of {} tokens does not fit the model's {} positions",
                    k.len(),
                    self.max_len
                );
            }
            c.drain(..over);
        }
        if pairs.windows(2).all(|w| w[0].0 == w[1].0) {
            let conts: Vec<Vec<u32>> = pairs.iter().map(|p| p.1.clone()).collect();
            self.shared(&pairs[0].0, &conts)
        } else {
            self.separate(&pairs)
        }
    }

    /// lm-eval's `loglikelihood_rolling`: the text's tokens after the prefix token, in windows
    /// of max_len predicted tokens, each window conditioned on the token before it.
    pub fn rolling(&self, text: &str) -> Result<(f64, usize)> {
        let toks = self.model.tok.encode(text, false)?;
        let prefix = self
            .model
            .tok
            .document_start()
            .ok_or_else(|| anyhow::anyhow!("no BOS or EOS token"))?;
        let mut total = 0.0;
        let mut start = 0;
        while start < toks.len() {
            let end = (start + self.max_len).min(toks.len());
            let ctx = vec![if start == 0 { prefix } else { toks[start - 1] }];
            // The window's own earlier tokens are its context: score it as one continuation.
            let ll = self.window(&ctx, &toks[start..end])?;
            total += ll;
            start = end;
        }
        Ok((total, toks.len()))
    }

    fn window(&self, ctx: &[u32], toks: &[u32]) -> Result<f64> {
        Ok(self.shared(ctx, &[toks.to_vec()])?[0].0)
    }
}

fn lsm(logits: Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(
        &logits.to_dtype(DType::F32)?,
        D::Minus1,
    )?)
}
