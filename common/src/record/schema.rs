//! Every record field the cf tools read or write, documented once.
//!
//! Fields a tool does not know pass through untouched.
//!
//! ## Input text
//! - `text` (string): a document; the loss covers every token.
//! - `token_ids` (list of int): the exact token ids of a sample; preferred over `text` wherever
//!   both exist, because a re-tokenisation of decoded text is not the same sequence.
//!
//! ## cf-sample output (one record per sample)
//! - `text` (string): the generated text, decoded without the prefix and without the final EOS.
//! - `token_ids` (list of int): the generated ids exactly, including the final EOS when
//!   `finish_reason` is `eos`, excluding the prefix.
//! - `prefix_ids` (list of int): the ids the sample was conditioned on (BOS, EOS, or a prefix).
//! - `prefix` (string): how the prefix was chosen: `bos`, `eos`, `text`, `ids`, `chat`, `prompt`.
//! - `n_tokens` (int): `len(token_ids)`.
//! - `logprob` (float): Σ log p(token) of `token_ids` under the untempered model.
//! - `finish_reason` (string): `eos` (an EOS id was sampled) or `length` (`--max-tokens` reached).
//! - `index` (int): the sample's index in the unsharded run; with `--seed` it fixes the sample.
//! - `seed` (int), `temperature`, `top_p`, `top_k`, `min_p`, `max_tokens`: the sampling parameters.
//! - `model` (string): the model as given to `--model`.

/// Field names, so tools never spell them twice.
pub const TEXT: &str = "text";
pub const TOKEN_IDS: &str = "token_ids";
pub const PREFIX_IDS: &str = "prefix_ids";
pub const PREFIX: &str = "prefix";
pub const N_TOKENS: &str = "n_tokens";
pub const LOGPROB: &str = "logprob";
pub const FINISH_REASON: &str = "finish_reason";
pub const INDEX: &str = "index";
pub const SEED: &str = "seed";
pub const MODEL: &str = "model";

/// The type of a field cf writes, for a column whose values are all null in some file: such a
/// column still gets this type (an unused `top_p` is a float column of nulls, not text), so files
/// from runs with other flags concatenate (polars, DuckDB).
pub fn known_float(name: &str) -> Option<bool> {
    match name {
        LOGPROB | "temperature" | "top_p" | "min_p" | "weight" | "logprob_base"
        | "logprob_model" | "kl_seq" | "kl_token" => Some(true),
        N_TOKENS | INDEX | SEED | "top_k" | "max_tokens" => Some(false),
        _ => None,
    }
}
