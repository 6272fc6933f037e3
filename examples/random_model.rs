//! A model folder with random weights in the real shapes of a known model, for benchmarks that
//! need no download: config.json, model.safetensors (bf16 or f32) and the project's test
//! tokenizer (its 320 ids fit any of these vocabularies).
//!
//!     cargo run --release --example random_model -- SHAPE DTYPE OUT [LAYERS]
//!
//! LAYERS keeps the shape's widths and vocabulary with fewer layers (memory measurements of
//! the full shapes on a small machine).
//! SHAPE: olmo-1b (allenai/OLMo-1B-hf), llama3-8b (Llama-3.1-8B / DeepSeek-R1-Distill-Llama-8B),
//! small (the ~26M CPU benchmark config). DTYPE: bf16 or f32.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use cf_common::model::{save::save_safetensors, Config, Decoder};
use std::collections::HashMap;
use std::path::Path;

fn config(shape: &str) -> Result<&'static str> {
    Ok(match shape {
        "olmo-1b" => {
            r#"{"architectures": ["OlmoForCausalLM"], "model_type": "olmo", "vocab_size": 50304,
            "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 16,
            "num_key_value_heads": 16, "max_position_embeddings": 2048, "rope_theta": 10000.0, "clip_qkv": null,
            "tie_word_embeddings": true, "hidden_act": "silu", "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "bfloat16"}"#
        }
        "llama3-8b" => {
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}, "tie_word_embeddings": false, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}"#
        }
        "small" => {
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8192,
            "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 6, "num_attention_heads": 8,
            "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": false, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}"#
        }
        other => bail!("unknown shape {other} (olmo-1b, llama3-8b, small)"),
    })
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let (shape, dtype, out, layers) = match &a[..] {
        [s, d, o] => (s, d, o, None),
        [s, d, o, l] => (s, d, o, Some(l.parse::<usize>()?)),
        _ => bail!("usage: random_model SHAPE DTYPE OUT [LAYERS]"),
    };
    let dtype = cf_common::cli::parse_dtype(dtype)?;
    let out = Path::new(out);
    std::fs::create_dir_all(out)?;
    let mut cfg_json: serde_json::Value = serde_json::from_str(config(shape)?)?;
    if let Some(l) = layers {
        cfg_json["num_hidden_layers"] = serde_json::json!(l);
    }
    let text = cfg_json.to_string();
    let cfg = Config::parse(&text)?;
    let mut tensors = HashMap::new();
    for (name, shape) in Decoder::parameter_shapes(&cfg) {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, DType::F32, &Device::Cpu)?
        } else {
            (Tensor::randn(0f32, 1.0, shape.clone(), &Device::Cpu)?
                * (0.5 / (*shape.last().unwrap() as f64).sqrt()))?
        };
        tensors.insert(name, t.to_dtype(dtype)?);
    }
    save_safetensors(&tensors, &out.join("model.safetensors"))?;
    cfg_json["torch_dtype"] = serde_json::json!(if dtype == DType::BF16 {
        "bfloat16"
    } else {
        "float32"
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&cfg_json)?,
    )?;
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/llama");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fx.join(f), out.join(f))?;
    }
    eprintln!(
        "random_model: {shape}, {} parameters, {dtype:?}, in {}",
        cfg.num_params(),
        out.display()
    );
    Ok(())
}
