//! Models: Hugging Face folders (config.json, safetensors, tokenizer files) and the one
//! Llama-family decoder.

pub mod adapter;
pub mod attention;
pub mod config;
pub mod decoder;
pub mod files;
mod flash;
pub mod fused;
mod op_io;
pub mod save;
pub mod staged;
pub mod vocab_loss;
pub mod weights;

pub use config::{Arch, Config};
pub use decoder::{Decoder, KvCache, Linear, Lora, Mode, SlotCache};
pub use files::ModelFiles;
pub use weights::{Source, Weights};

use crate::tokenizer::{generation_eos, Tok};
use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// A loaded model: its files, config, decoder and tokenizer.
pub struct Model {
    pub files: ModelFiles,
    pub cfg: Config,
    pub decoder: Decoder,
    pub tok: Tok,
    /// Every id that ends a sequence: config.json's, generation_config.json's and the
    /// tokenizer's EOS, sorted and without repeats.
    pub eos_ids: Vec<u32>,
    /// The PEFT adapter on the base, when the model was given as an adapter folder.
    pub adapter: Option<(std::path::PathBuf, adapter::AdapterConfig)>,
}

impl Model {
    /// One line on what was loaded, for `-v`.
    pub fn describe_loaded(&self, dtype: DType, device: &Device, secs: f64) -> String {
        format!(
            "loaded {} ({}, {} layers, {} parameters, vocabulary {}, context {}) as {dtype:?} on {device:?}{} in {secs:.1} s",
            self.files.dir.display(),
            self.cfg.arch.name(),
            self.cfg.num_layers,
            self.cfg.num_params(),
            self.cfg.vocab_size,
            self.cfg.max_position_embeddings,
            if device.is_cpu() {
                format!(" ({} threads)", candle_core::utils::get_num_threads())
            } else {
                String::new()
            }
        )
    }
}

impl Model {
    /// Load a model folder or a cached model id. Config, weights and tokenizer are checked
    /// against each other before any tensor is read.
    pub fn load(name: &str, dtype: DType, device: &Device, mode: Mode) -> Result<Model> {
        let dir = std::path::Path::new(name);
        if adapter::is_adapter(dir) {
            return Model::load_adapter(None, name, dtype, device, mode);
        }
        Model::load_with(
            name,
            |cfg, weights| Decoder::new(cfg, weights, dtype, device, mode),
            dtype,
            device,
        )
    }

    /// A base model with a PEFT adapter on it: `base` or, when None, the adapter's own
    /// `base_model_name_or_path` (with its `revision`).
    pub fn load_adapter(
        base: Option<&str>,
        adapter_dir: &str,
        dtype: DType,
        device: &Device,
        mode: Mode,
    ) -> Result<Model> {
        let dir = std::path::Path::new(adapter_dir);
        if !dir.join("adapter_config.json").is_file() {
            bail!("{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)");
        }
        let cfg = adapter::AdapterConfig::read(dir)?;
        let base = base.map(String::from).unwrap_or_else(|| cfg.base_name());
        let mut m = Model::load_with(
            &base,
            |c, weights| Decoder::new(c, weights, dtype, device, mode),
            dtype,
            device,
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "{adapter_dir}: base model {base}: {}",
                crate::exit::one_line(&e)
            )
        })?;
        adapter::attach(&mut m.decoder, dir, &cfg)?;
        m.adapter = Some((dir.to_path_buf(), cfg));
        Ok(m)
    }

    /// Config and tokenizer of a model folder (an adapter folder: of its base), checked
    /// against each other, without weights.
    pub fn describe(name: &str) -> Result<(ModelFiles, Config, Tok, Vec<u32>)> {
        let dir = std::path::Path::new(name);
        if adapter::is_adapter(dir) {
            let cfg = adapter::AdapterConfig::read(dir)?;
            return Model::describe(&cfg.base_name());
        }
        let files = ModelFiles::locate(name)?;
        let cfg = Config::load(&files.config)?;
        let tok = Tok::load(&files)?;
        if tok.vocab_len > cfg.vocab_size {
            bail!(
                "{}: the tokenizer's vocabulary ({} ids) does not fit the embedding ({} rows, config.json vocab_size)",
                files.tokenizer.as_ref().unwrap().display(),
                tok.vocab_len,
                cfg.vocab_size
            );
        }
        let mut eos_ids = cfg.eos_token_ids.clone();
        eos_ids.extend(generation_eos(&files)?);
        eos_ids.extend(tok.eos_id);
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok((files, cfg, tok, eos_ids))
    }

    /// Load a model whose decoder `build` makes from its config and weights (training makes
    /// its parameters trainable this way).
    pub fn load_with(
        name: &str,
        build: impl FnOnce(&Config, &Weights) -> Result<Decoder>,
        dtype: DType,
        device: &Device,
    ) -> Result<Model> {
        let (files, cfg, tok, eos_ids) = Model::describe(name)?;
        if device.is_cpu() {
            let bytes = cfg.num_params() as f64 * dtype.size_in_bytes() as f64;
            crate::mem::require(
                bytes,
                &format!(
                    "{}: {} parameters in {dtype:?}",
                    files.dir.display(),
                    cfg.num_params()
                ),
            )?;
        }
        let weights = Weights::open(&files.weights, dtype, device)?;
        let decoder = build(&cfg, &weights)?;
        Ok(Model {
            files,
            cfg,
            decoder,
            tok,
            eos_ids,
            adapter: None,
        })
    }
}
