//! Finding a model's files: a folder, or a model id resolved from the local Hugging Face cache.

use crate::env;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The files of one Hugging Face model folder.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    pub dir: PathBuf,
    /// What the user named: a path or `org/name`.
    pub name: String,
    pub config: PathBuf,
    /// Safetensors files, in shard order.
    pub weights: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
    pub chat_template: Option<PathBuf>,
}

fn existing(p: PathBuf) -> Option<PathBuf> {
    p.is_file().then_some(p)
}

/// The Hugging Face hub cache folder, in huggingface_hub's order of precedence.
pub fn hub_cache() -> Option<PathBuf> {
    if let Some(p) = env::var(env::HF_HUB_CACHE).or_else(|| env::var(env::HUGGINGFACE_HUB_CACHE)) {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = env::var(env::HF_HOME) {
        return Some(PathBuf::from(home).join("hub"));
    }
    if let Some(xdg) = env::var(env::XDG_CACHE_HOME) {
        return Some(PathBuf::from(xdg).join("huggingface").join("hub"));
    }
    env::var("HOME").map(|h| {
        PathBuf::from(h)
            .join(".cache")
            .join("huggingface")
            .join("hub")
    })
}

/// `org/name` or `org/name@revision` → the snapshot folder in the cache.
fn from_cache(id: &str) -> Result<PathBuf> {
    let (repo, rev) = id.split_once('@').unwrap_or((id, "main"));
    let Some(cache) = hub_cache() else {
        bail!("{id}: not a folder, and no Hugging Face cache is configured")
    };
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    if !repo_dir.is_dir() {
        bail!(
            "{id}: not a folder, and not in the Hugging Face cache at {} (cf never downloads; fetch it with `hf download {repo}`)",
            cache.display()
        );
    }
    let refs = repo_dir.join("refs").join(rev);
    let commit = if refs.is_file() {
        std::fs::read_to_string(&refs)
            .with_context(|| format!("{}: cannot read", refs.display()))?
            .trim()
            .to_string()
    } else {
        rev.to_string()
    };
    let snap = repo_dir.join("snapshots").join(&commit);
    if !snap.is_dir() {
        bail!(
            "{id}: revision {rev} is not in the cache ({} is missing)",
            snap.display()
        );
    }
    Ok(snap)
}

impl ModelFiles {
    /// The tokenizer files of a folder that may hold no model (or of a model folder).
    pub fn tokenizer_only(name: &str) -> Result<ModelFiles> {
        let dir = PathBuf::from(name);
        if !dir.is_dir() {
            bail!("{name}: no such tokenizer folder (expected tokenizer.json inside)");
        }
        Ok(ModelFiles {
            name: name.to_string(),
            config: dir.join("config.json"),
            weights: Vec::new(),
            tokenizer: existing(dir.join("tokenizer.json")),
            tokenizer_config: existing(dir.join("tokenizer_config.json")),
            generation_config: existing(dir.join("generation_config.json")),
            chat_template: existing(dir.join("chat_template.jinja")),
            dir,
        })
    }

    /// Locate a model given as a folder or a cached model id.
    pub fn locate(name: &str) -> Result<ModelFiles> {
        let path = Path::new(name);
        let dir = if path.is_dir() {
            path.to_path_buf()
        } else if path.exists() {
            bail!("{name}: expected a model folder (config.json, *.safetensors, tokenizer.json), found a file");
        } else if !name.starts_with('.') && !name.starts_with('/') && name.matches('/').count() == 1
        {
            from_cache(name)?
        } else {
            bail!("{name}: no such model folder");
        };
        let config = dir.join("config.json");
        if !config.is_file() && dir.join("adapter_config.json").is_file() {
            bail!(
                "{}: holds a LoRA adapter, not a model (load it as --model ADAPTER_DIR, or merge it with cf-merge)",
                dir.display()
            );
        }
        if !config.is_file() {
            bail!("{}: no config.json in the model folder", dir.display());
        }
        let weights = find_weights(&dir)?;
        Ok(ModelFiles {
            name: name.to_string(),
            config,
            weights,
            tokenizer: existing(dir.join("tokenizer.json")),
            tokenizer_config: existing(dir.join("tokenizer_config.json")),
            generation_config: existing(dir.join("generation_config.json")),
            chat_template: existing(dir.join("chat_template.jinja")),
            dir,
        })
    }
}

fn find_weights(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("{}: cannot read", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", index.display()))?;
        let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
            bail!("{}: no weight_map", index.display());
        };
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        let mut out = Vec::new();
        for f in files {
            let p = dir.join(&f);
            if !p.is_file() {
                bail!("{}: shard {f} is missing", index.display());
            }
            out.push(p);
        }
        return Ok(out);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut any: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "safetensors")
                && !p.ends_with("adapter_model.safetensors")
        })
        .collect();
    if !any.is_empty() {
        any.sort();
        return Ok(any);
    }
    let pickles = [
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "model.bin",
    ];
    if pickles.iter().any(|p| dir.join(p).exists()) {
        bail!(
            "{}: only pytorch_model.bin (pickle) weights found; cf never unpickles: convert them to safetensors first (transformers: model.save_pretrained(dir, safe_serialization=True))",
            dir.display()
        );
    }
    bail!(
        "{}: no *.safetensors weights in the model folder",
        dir.display()
    )
}
