//! Writing safetensors the way transformers expects them: `{"format": "pt"}` metadata, written
//! to a temporary file beside the target and renamed into place.

use anyhow::{anyhow, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// Save named tensors to `path` atomically, with transformers' metadata.
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".cf-")
        .suffix(".safetensors.tmp")
        .tempfile_in(&dir)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    let mut items: Vec<(&String, &Tensor)> = tensors.iter().collect();
    items.sort_by(|a, b| a.0.cmp(b.0));
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(items, Some(meta), tmp.path())
        .map_err(|e| anyhow!("{}: cannot write: {e}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}
