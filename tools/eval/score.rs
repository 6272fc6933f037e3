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
        // Only the continuation tokens' log-probabilities and the argmaxes leave the device,
        // never whole vocabulary rows.
        let first = lsm(d.logits(&h.narrow(1, ctx.len() - 1, 1)?.squeeze(1)?)?)?.squeeze(0)?;
        let firsts: Vec<u32> = conts.iter().map(|c| c[0]).collect();
        let first_lp: Vec<f32> = first
            .index_select(&Tensor::new(firsts.as_slice(), dev)?, 0)?
            .to_vec1()?;
        let first_best = first.argmax(0)?.to_scalar::<u32>()?;
        let n = conts.len();
        cache.select_rows(&vec![0u32; n])?;
        let mut ids = vec![0u32; n * longest];
        let mut next = vec![0u32; n * longest.saturating_sub(1)];
        for (i, c) in conts.iter().enumerate() {
            ids[i * longest..i * longest + c.len()].copy_from_slice(c);
            // Position j predicts token j + 1.
            next[i * (longest - 1)..i * (longest - 1) + c.len() - 1].copy_from_slice(&c[1..]);
        }
        let (rest_lp, rest_best) = if longest > 1 {
            let h =
                d.forward_hidden(&Tensor::from_vec(ids, (n, longest), dev)?, Some(&mut cache))?;
            let lp = lsm(d.logits(&h.narrow(1, 0, longest - 1)?)?)?;
            let tg = Tensor::from_vec(next, (n, longest - 1, 1), dev)?;
            (
                lp.gather(&tg, 2)?.squeeze(2)?.to_vec2::<f32>()?,
                lp.argmax(D::Minus1)?.to_vec2::<u32>()?,
            )
        } else {
            (vec![Vec::new(); n], vec![Vec::new(); n])
        };
        Ok(conts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let ll = first_lp[i] as f64
                    + rest_lp[i][..c.len() - 1]
                        .iter()
                        .map(|&x| x as f64)
                        .sum::<f64>();
                let greedy = first_best == c[0] && rest_best[i][..c.len() - 1] == c[1..];
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
            total += self.shared(&ctx, &[toks[start..end].to_vec()])?[0].0;
            start = end;
        }
        Ok((total, toks.len()))
    }
}

fn lsm(logits: Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(
        &logits.to_dtype(DType::F32)?,
        D::Minus1,
    )?)
}
