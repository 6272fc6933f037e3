//! `config.json` of a Hugging Face model, resolved into what the one decoder switches on.

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The model families the decoder implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3/3.1, DeepSeek-R1-Distill-Llama, Mistral-style configs without sliding window.
    Llama,
    /// OLMo (OLMo-1B-hf): non-parametric LayerNorm, optional `clip_qkv`.
    Olmo,
    /// OLMo-2: RMSNorm after each sublayer, RMSNorm on the full q and k projections.
    Olmo2,
    /// Qwen2 / Qwen2.5: biases on q, k and v.
    Qwen2,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Olmo => "olmo",
            Arch::Olmo2 => "olmo2",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// How rotary frequencies are scaled (`rope_scaling` in config.json).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// `rope_type: linear`: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// `rope_type: llama3` (Llama 3.1, DeepSeek-R1-Distill-Llama-8B).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Everything the decoder needs from `config.json`.
#[derive(Clone, Debug)]
pub struct Config {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// RMSNorm epsilon (OLMo's LayerNorm uses a fixed 1e-5, as transformers does).
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q, k, v (Llama `attention_bias`, always for Qwen2).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama `attention_bias`).
    pub o_bias: bool,
    /// Bias on gate/up/down (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// OLMo: clamp q, k, v to ±clip_qkv after projection.
    pub clip_qkv: Option<f64>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype the weights were saved in (`dtype`, transformers 4's `torch_dtype`), e.g.
    /// "bfloat16".
    pub torch_dtype: Option<String>,
}

#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers 5: `{rope_type, rope_theta, factor, ...}` in one object.
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    clip_qkv: Option<f64>,
    hidden_act: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
    use_sliding_window: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

/// Token ids in config files may be an integer, a list of integers or null.
pub fn token_ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(xs)) => xs
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        Config::parse(&text).with_context(|| path.display().to_string())
    }

    pub fn parse(text: &str) -> Result<Config> {
        let raw: Raw = serde_json::from_str(text).map_err(|e| anyhow!("invalid config: {e}"))?;
        let model_type = raw
            .model_type
            .clone()
            .or_else(|| raw.architectures.first().map(|a| a.to_lowercase()))
            .unwrap_or_default();
        let arch = match model_type.as_str() {
            "llama" | "mistral" => Arch::Llama,
            "olmo" => Arch::Olmo,
            "olmo2" => Arch::Olmo2,
            "qwen2" => Arch::Qwen2,
            other => bail!(
                "unknown architecture model_type={other:?} (cf supports llama, mistral, olmo, olmo2, qwen2)"
            ),
        };
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                bail!("hidden_act {act:?} is not supported (only silu)");
            }
        }
        if raw.use_sliding_window == Some(true) {
            bail!("use_sliding_window=true is not supported");
        }
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            bail!("num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})");
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size % heads == 0 => raw.hidden_size / heads,
            None => bail!(
                "hidden_size {} is not divisible by num_attention_heads {heads}",
                raw.hidden_size
            ),
        };
        if head_dim % 2 != 0 {
            bail!("head_dim {head_dim} must be even for rotary embeddings");
        }
        let (rope_theta, rope_scaling) = rope(&raw)?;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let norm_eps = raw.rms_norm_eps.unwrap_or(match arch {
            Arch::Olmo2 | Arch::Olmo => 1e-5,
            _ => 1e-6,
        });
        Ok(Config {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: arch == Arch::Llama && raw.mlp_bias.unwrap_or(false),
            clip_qkv: if arch == Arch::Olmo {
                raw.clip_qkv
            } else {
                None
            },
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
            pad_token_id: token_ids(&raw.pad_token_id).first().copied(),
            torch_dtype: raw.dtype.or(raw.torch_dtype),
        })
    }

    /// Parameters in the model (embeddings counted once when tied).
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attn = h * q
            + 2 * h * kv
            + q * h
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { h } else { 0 };
        let mlp = 3 * h * self.intermediate_size
            + if self.mlp_bias {
                2 * self.intermediate_size + h
            } else {
                0
            };
        let norms = match self.arch {
            Arch::Olmo => 0,
            Arch::Olmo2 => 2 * h + q + kv,
            _ => 2 * h,
        };
        let embed = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 };
        let final_norm = if self.arch == Arch::Olmo { 0 } else { h };
        embed + final_norm + self.num_layers * (attn + mlp + norms)
    }
}

/// Rotary base and scaling from either layout, as transformers 5 reads them
/// (`convert_rope_params_to_dict`, `standardize_rope_params`): the legacy `rope_scaling` object
/// when present (it replaces `rope_parameters` entirely, as in transformers), else
/// `rope_parameters`; the base is that object's `rope_theta`, else the top-level `rope_theta`,
/// else 10000. A transformers 4 config (top-level `rope_theta`, `rope_scaling`) reads the same
/// under both rules. An unsupported type is refused under either key.
fn rope(raw: &Raw) -> Result<(f64, RopeScaling)> {
    let nonempty = |v: &Option<Value>| match v {
        Some(Value::Object(m)) if !m.is_empty() => Ok(true),
        None | Some(Value::Null) | Some(Value::Object(_)) => Ok(false),
        Some(_) => Err(()),
    };
    let (key, params) = match (nonempty(&raw.rope_scaling), nonempty(&raw.rope_parameters)) {
        (Err(()), _) => bail!("rope_scaling must be an object"),
        (_, Err(())) => bail!("rope_parameters must be an object"),
        (Ok(true), _) => ("rope_scaling", raw.rope_scaling.as_ref()),
        (Ok(false), Ok(true)) => ("rope_parameters", raw.rope_parameters.as_ref()),
        _ => ("rope_parameters", None),
    };
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .map(|t| {
            t.as_f64()
                .filter(|t| *t > 0.0)
                .ok_or_else(|| anyhow!("{key}.rope_theta must be a positive number"))
        })
        .transpose()?
        .or(raw.rope_theta)
        .unwrap_or(10000.0);
    let max_pos = raw.max_position_embeddings.unwrap_or(4096) as f64;
    Ok((theta, parse_rope_scaling(key, params, max_pos)?))
}

fn parse_rope_scaling(key: &str, v: Option<&Value>, max_pos: f64) -> Result<RopeScaling> {
    let Some(Value::Object(m)) = v else {
        return Ok(RopeScaling::None);
    };
    let kind = m
        .get("rope_type")
        .or_else(|| m.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let f = |k: &str| -> Result<f64> {
        m.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("{key}.{k} is missing"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: f("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            // transformers fills a missing one with max_position_embeddings.
            original_max_position_embeddings: m
                .get("original_max_position_embeddings")
                .and_then(Value::as_f64)
                .unwrap_or(max_pos),
        }),
        other => bail!("{key}: rope_type {other:?} is not supported (default, linear, llama3)"),
    }
}

impl RopeScaling {
    /// Rotary inverse frequencies for `head_dim`, computed as transformers computes them
    /// (`_compute_default_rope_parameters`, `_compute_llama3_parameters`): in float32, in the
    /// same order of operations. The frequencies are part of the model's definition, so they
    /// are reproduced exactly; the angles (position × frequency) are then taken in f64.
    pub fn inv_freq(&self, head_dim: usize, theta: f64) -> Vec<f64> {
        let theta = theta as f32;
        let base: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f32 / head_dim as f32))
            .collect();
        let out: Vec<f32> = match *self {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let (factor, low, high, old) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    old as f32,
                );
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                base.iter()
                    .map(|&f| {
                        // PyTorch evaluates `scalar / tensor` as `tensor.reciprocal() * scalar`.
                        let wavelen = (1.0 / f) * (2.0 * std::f32::consts::PI);
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        // transformers' `~(wavelen < high) * ~(wavelen > low)`, kept as written.
                        #[allow(clippy::neg_cmp_op_on_partial_ord)]
                        let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                        if medium {
                            let smooth = ((1.0 / wavelen) * old - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        };
        out.into_iter().map(f64::from).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_architecture_is_named() {
        let e = Config::parse(r#"{"model_type":"gpt2","vocab_size":1,"hidden_size":4,"intermediate_size":4,"num_hidden_layers":1,"num_attention_heads":1}"#).unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown architecture model_type=\"gpt2\""),
            "{e}"
        );
    }

    #[test]
    fn eos_may_be_a_list() {
        let c = Config::parse(r#"{"model_type":"qwen2","vocab_size":8,"hidden_size":4,"intermediate_size":4,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"eos_token_id":[5,6]}"#).unwrap();
        assert_eq!(c.eos_token_ids, vec![5, 6]);
        assert!(c.qkv_bias && !c.o_bias);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let base = RopeScaling::None.inv_freq(128, 500000.0);
        let scaled = s.inv_freq(128, 500000.0);
        assert_eq!(scaled[0], base[0]);
        assert!((scaled[63] - base[63] / 8.0).abs() < 1e-12 * base[63]);
    }

    const BASE: &str = r#""model_type":"llama","vocab_size":8,"hidden_size":8,"intermediate_size":4,"num_hidden_layers":1,"num_attention_heads":2"#;

    #[test]
    fn rope_parameters_of_transformers_5_are_read() {
        let c = Config::parse(&format!(
            r#"{{{BASE},"rope_parameters":{{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}},"dtype":"bfloat16"}}"#
        ))
        .unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
        // Default type, theta only under rope_parameters.
        let c = Config::parse(&format!(
            r#"{{{BASE},"rope_parameters":{{"rope_type":"default","rope_theta":500000.0}}}}"#
        ))
        .unwrap();
        assert_eq!(
            (c.rope_theta, c.rope_scaling),
            (500000.0, RopeScaling::None)
        );
        // The legacy layout still works.
        let c = Config::parse(&format!(
            r#"{{{BASE},"rope_theta":1000.0,"rope_scaling":{{"type":"linear","factor":2.0}},"torch_dtype":"float32"}}"#
        ))
        .unwrap();
        assert_eq!(c.rope_theta, 1000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        let c = Config::parse(&format!(
            r#"{{{BASE},"rope_theta":1000.0,"rope_parameters":{{"rope_type":"default"}}}}"#
        ))
        .unwrap();
        assert_eq!(
            c.rope_theta, 1000.0,
            "rope_theta falls back to the top level"
        );
    }

    #[test]
    fn unsupported_rope_types_are_refused_under_either_key() {
        for key in ["rope_parameters", "rope_scaling"] {
            let e = Config::parse(&format!(
                r#"{{{BASE},"{key}":{{"rope_type":"yarn","rope_theta":10000.0,"factor":4.0}}}}"#
            ))
            .unwrap_err();
            assert!(
                e.to_string().contains(key) && e.to_string().contains("yarn"),
                "{e}"
            );
        }
    }
}
