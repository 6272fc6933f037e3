//! What cf-train writes: Hugging Face model folders, PEFT adapters, checkpoints. Every file is
//! written to a temporary name and renamed; a checkpoint directory is built under a temporary
//! name and renamed whole, so a reader never sees half of one.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use cf_common::model::save::save_safetensors;
use cf_common::model::ModelFiles;
use cf_common::record::write_atomic;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Tokenizer and generation files copied beside the weights, so the folder is a whole model.
const COPIED: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.model",
];

pub fn copy_side_files(src: &ModelFiles, dir: &Path) -> Result<()> {
    for f in COPIED {
        let from = src.dir.join(f);
        if from.is_file() {
            let bytes =
                std::fs::read(&from).with_context(|| format!("{}: cannot read", from.display()))?;
            write_atomic(&dir.join(f), &bytes)?;
        }
    }
    Ok(())
}

/// The dtype a model's weights are stored in (that of its token embedding), as
/// `save_pretrained` would keep it.
pub fn stored_dtype(src: &ModelFiles) -> Result<DType> {
    let w = cf_common::model::Weights::open(&src.weights, DType::F32, &Device::Cpu)?;
    Ok(w.stored_dtype("model.embed_tokens.weight")
        .filter(|d| matches!(d, DType::F32 | DType::BF16 | DType::F16 | DType::F64))
        .unwrap_or(DType::F32))
}

/// transformers' name of a dtype (`config.json`'s `dtype` / `torch_dtype`).
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// A full model folder: model.safetensors in `dtype`, config.json saying so under both keys
/// (`dtype`, read by transformers 5, and `torch_dtype`, read by transformers 4), side files.
pub fn model_folder(
    src: &ModelFiles,
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let text = std::fs::read_to_string(&src.config)
        .with_context(|| format!("{}: cannot read", src.config.display()))?;
    let mut cfg: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", src.config.display()))?;
    if let Some(m) = cfg.as_object_mut() {
        m.insert("torch_dtype".into(), json!(dtype_name(dtype)));
        m.insert("dtype".into(), json!(dtype_name(dtype)));
    }
    let cast = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    save_safetensors(&cast, &dir.join("model.safetensors"))?;
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    copy_side_files(src, dir)
}

/// LoRA settings, as PEFT's adapter_config.json records them.
#[derive(Clone, Debug)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<String>,
}

/// A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) that peft and vLLM
/// load. Tensor names are `base_model.model.<module>.lora_{A,B}.weight`.
pub fn adapter_folder(
    src: &ModelFiles,
    base_name: &str,
    lora: &LoraSpec,
    tensors: &HashMap<String, Tensor>,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let cfg = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    save_safetensors(tensors, &dir.join("adapter_model.safetensors"))?;
    write_atomic(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    copy_side_files(src, dir)
}

/// Build a directory with `fill`, then rename it to `dest` (replacing an older one).
pub fn atomic_dir(dest: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = cf_common::temp::dir_beside(dest)?;
    fill(tmp.path())?;
    cf_common::temp::persist_dir(tmp, dest)
}

/// The newest `checkpoint-N` directory in `dir`.
pub fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse::<u64>()
                .ok()?;
            e.path()
                .join("trainer_state.json")
                .is_file()
                .then_some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}
