//! Writing models the way transformers and peft expect them: safetensors with
//! `{"format": "pt"}` metadata, model folders (config.json saying the dtype stored, tokenizer
//! and generation files beside), PEFT adapter folders. Files go through temporary names and
//! folders are built under one and renamed whole, so a reader never sees half of one.

use crate::model::adapter::AdapterConfig;
use crate::model::ModelFiles;
use crate::record::write_atomic;
use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Save named tensors to `path` atomically, with transformers' metadata. The safetensors
/// crate writes through a temporary file of its own (mode 0600) that it renames; that happens
/// inside a temporary folder of ours, so an interruption leaves nothing behind, and the file
/// then gets the mode a new file gets under the umask (the folder's, less execute bits).
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let dir = crate::temp::dir_beside(path)?;
    let inner = dir.path().join("out.safetensors");
    let mut items: Vec<(&String, &Tensor)> = tensors.iter().collect();
    items.sort_by(|a, b| a.0.cmp(b.0));
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(items, Some(meta), &inner)
        .map_err(|e| anyhow!("{}: cannot write: {e}", path.display()))?;
    let dir_mode = std::fs::metadata(dir.path())?.permissions().mode();
    let file = std::fs::File::open(&inner)?;
    file.set_permissions(std::fs::Permissions::from_mode(dir_mode & 0o666))?;
    file.sync_all()
        .with_context(|| format!("{}: cannot write", path.display()))?;
    std::fs::rename(&inner, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    crate::temp::unregister(dir.path());
    drop(dir);
    crate::temp::sync_dir(&crate::temp::parent_of(path))
}

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
    let w = crate::model::Weights::open(&src.weights, DType::F32, &Device::Cpu)?;
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

/// A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) that peft and vLLM
/// load. Tensor names are `base_model.model.<module>.lora_{A,B}.weight`.
pub fn adapter_folder(
    src: &ModelFiles,
    cfg: &AdapterConfig,
    tensors: &HashMap<String, Tensor>,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    save_safetensors(tensors, &dir.join("adapter_model.safetensors"))?;
    write_atomic(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&cfg.to_json())?.as_bytes(),
    )?;
    copy_side_files(src, dir)
}

/// Build a directory with `fill`, then rename it to `dest` (replacing an older one).
pub fn atomic_dir(dest: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = crate::temp::dir_beside(dest)?;
    fill(tmp.path())?;
    crate::temp::persist_dir(tmp, dest)
}
