//! Writing safetensors the way transformers expects them: `{"format": "pt"}` metadata, written
//! to a temporary file beside the target and renamed into place.

use anyhow::{anyhow, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// Save named tensors to `path` atomically, with transformers' metadata.
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = crate::temp::file_beside(path)?;
    let mut items: Vec<(&String, &Tensor)> = tensors.iter().collect();
    items.sort_by(|a, b| a.0.cmp(b.0));
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(items, Some(meta), tmp.path())
        .map_err(|e| anyhow!("{}: cannot write: {e}", path.display()))?;
    crate::temp::persist(tmp, path)
}
