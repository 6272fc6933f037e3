//! Writing safetensors the way transformers expects them: `{"format": "pt"}` metadata, written
//! in a temporary folder beside the target and renamed into place.

use anyhow::{anyhow, Context, Result};
use candle_core::Tensor;
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
