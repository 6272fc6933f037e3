//! Safetensors weights, memory-mapped, looked up by name with their shapes checked.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// Where a decoder gets its parameters from: files on disk, or tensors in memory (training,
/// tests). `get` returns a tensor of exactly `shape` in the requested dtype.
pub trait Source {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    fn contains(&self, name: &str) -> bool;
}

/// All tensors of a model's safetensors files (one file or shards), memory-mapped.
pub struct Weights {
    files: Vec<PathBuf>,
    st: MmapedSafetensors,
    /// tensor name → index into `files`
    index: HashMap<String, usize>,
    dtype: DType,
    device: Device,
}

impl Weights {
    pub fn open(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Weights> {
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            // SAFETY: the file is mapped read-only; cf never writes a model folder it reads
            // (outputs go to a temp file renamed into place, which leaves this mapping valid).
            let one = unsafe { MmapedSafetensors::new(f) }
                .map_err(|e| anyhow!("{}: not a valid safetensors file: {e}", f.display()))?;
            for (name, _) in one.tensors() {
                index.insert(name, i);
            }
        }
        // SAFETY: as above.
        let st = unsafe { MmapedSafetensors::multi(files) }
            .map_err(|e| anyhow!("{}: not a valid safetensors file: {e}", files[0].display()))?;
        Ok(Weights {
            files: files.to_vec(),
            st,
            index,
            dtype,
            device: device.clone(),
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    /// The dtype a tensor is stored in.
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        self.st
            .get(name)
            .ok()
            .and_then(|v| DType::try_from(v.dtype()).ok())
    }

    fn file_of(&self, name: &str) -> String {
        self.index.get(name).map_or_else(
            || "weights".into(),
            |&i| self.files[i].display().to_string(),
        )
    }
}

impl Source for Weights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if !self.index.contains_key(name) {
            let dir = self.files[0]
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            bail!("{dir}: tensor {name} is missing from the weights (does config.json describe this model?)");
        }
        let file = self.file_of(name);
        let view = self
            .st
            .get(name)
            .map_err(|e| anyhow!("{file}: {name}: {e}"))?;
        if view.shape() != shape {
            bail!(
                "{file}: tensor {name} has shape {:?} but config.json implies {:?}",
                view.shape(),
                shape
            );
        }
        let t = self
            .st
            .load(name, &self.device)
            .map_err(|e| anyhow!("{file}: {name}: {e}"))?;
        t.to_dtype(self.dtype)
            .with_context(|| format!("{file}: {name}"))
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

/// Tensors held in memory by name (for training, where parameters are Vars, and for tests).
impl Source for HashMap<String, Tensor> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .get(name)
            .ok_or_else(|| anyhow!("tensor {name} is missing"))?;
        if t.dims() != shape {
            bail!(
                "tensor {name} has shape {:?} but config.json implies {:?}",
                t.dims(),
                shape
            );
        }
        Ok(t.clone())
    }

    fn contains(&self, name: &str) -> bool {
        self.contains_key(name)
    }
}
