//! The trainable state: the model with its parameters as variables (full fine-tuning: every
//! weight, f32 masters; LoRA: PEFT-initialised adapters on a frozen base), from `--model` or a
//! checkpoint.

use crate::Args;
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use cf_common::model::adapter::AdapterConfig;
use cf_common::model::{Decoder, Lora, Mode, Model, Source};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The projections `--lora-targets all` adapts.
pub use cf_common::model::adapter::MODULES as ALL_TARGETS;
/// The ChaCha stream of LoRA's initialisation and dropout (data order uses streams 0, 1, … per epoch).
const LORA_STREAM: u64 = 1 << 40;

/// The trainable state: parameters by name (full fine-tuning: every weight; LoRA: adapters).
pub struct Trainable {
    pub model: Model,
    pub vars: Vec<(String, Var)>,
    /// Full fine-tuning in a half-precision compute dtype: the decoder is rebuilt every step
    /// from the f32 master weights cast to it (gradients flow back through the cast).
    pub half: Option<DType>,
    pub lora: Option<AdapterConfig>,
    pub lora_rng: Option<Arc<Mutex<ChaCha8Rng>>>,
}

pub fn lora_name(module: &str, ab: &str) -> String {
    cf_common::model::adapter::tensor_name(module, ab)
}

/// The adapter a run continues: `--adapter DIR`, or `--model` naming an adapter folder. Its
/// settings stand; LoRA flags that contradict them are refused.
pub fn start_adapter(args: &Args) -> Result<Option<(PathBuf, AdapterConfig, String)>> {
    let (dir, base) = match &args.model.adapter {
        Some(a) => (PathBuf::from(a), Some(args.model.model.clone())),
        None if cf_common::model::adapter::is_adapter(Path::new(&args.model.model)) => {
            (PathBuf::from(&args.model.model), None)
        }
        None => return Ok(None),
    };
    let cfg = AdapterConfig::read(&dir)?;
    if args.lora_rank.is_some_and(|r| r != cfg.rank) {
        bail!(
            "--lora-rank {}: the adapter {} has rank {}",
            args.lora_rank.unwrap(),
            dir.display(),
            cfg.rank
        );
    }
    let base = base.unwrap_or_else(|| cfg.base_name());
    Ok(Some((dir, cfg, base)))
}

/// Load the model with trainable parameters, from `--model` or from a checkpoint.
pub fn trainable(
    args: &Args,
    device: &Device,
    dtype: DType,
    resume: Option<&Path>,
) -> Result<Trainable> {
    let start = start_adapter(args)?;
    let Some(rank) = args.lora_rank.or(start.as_ref().map(|s| s.1.rank)) else {
        // Full fine-tuning: f32 master weights as Vars.
        let mut vars = Vec::new();
        let model = Model::load_with(
            &args.model.model,
            |cfg, weights| {
                let ckpt = match resume {
                    Some(dir) => Some(cf_common::model::Weights::open(
                        &[dir.join("model.safetensors")],
                        DType::F32,
                        device,
                    )?),
                    None => None,
                };
                let src: &dyn Source = match &ckpt {
                    Some(c) => c,
                    None => weights,
                };
                let mut map = HashMap::new();
                for (name, shape) in Decoder::parameter_shapes(cfg) {
                    let v = Var::from_tensor(&src.get(&name, &shape)?.to_dtype(DType::F32)?)?;
                    map.insert(name.clone(), v.as_tensor().clone());
                    vars.push((name, v));
                }
                Decoder::new(cfg, &map, DType::F32, device, Mode::Train)
            },
            DType::F32,
            device,
        )?;
        let half = (dtype != DType::F32).then_some(dtype);
        return Ok(Trainable {
            model,
            vars,
            half,
            lora: None,
            lora_rng: None,
        });
    };
    // LoRA: frozen base weights (plain tensors: no gradient graph), f32 adapters, started
    // from PEFT's initialisation, from an adapter folder, or from a checkpoint.
    let base = start
        .as_ref()
        .map_or(args.model.model.clone(), |s| s.2.clone());
    let mut model = Model::load(&base, dtype, device, Mode::Train)?;
    let (targets, alpha): (Vec<String>, f64) = match &start {
        Some((_, c, _)) => (c.targets.clone(), c.alpha),
        None => (
            if args.lora_targets.iter().any(|t| t == "all") {
                ALL_TARGETS.iter().map(|s| s.to_string()).collect()
            } else {
                args.lora_targets.clone()
            },
            args.lora_alpha.unwrap_or(rank as f64),
        ),
    };
    let mut init = ChaCha8Rng::seed_from_u64(args.seed);
    init.set_stream(LORA_STREAM);
    let dropout_rng = {
        let mut r = ChaCha8Rng::seed_from_u64(args.seed);
        r.set_stream(LORA_STREAM + 1);
        Arc::new(Mutex::new(r))
    };
    let from: Option<&Path> = resume.or(start.as_ref().map(|s| s.0.as_path()));
    let saved = match from {
        Some(dir) => {
            let f = dir.join("adapter_model.safetensors");
            Some(
                candle_core::safetensors::load(&f, device)
                    .map_err(|e| anyhow!("{}: {e}", f.display()))?,
            )
        }
        None => None,
    };
    let mut vars = Vec::new();
    model.decoder.for_each_linear(|name, lin| {
        let short = name.rsplit('.').next().unwrap_or(name);
        if !targets.iter().any(|t| t == short) {
            return Ok(());
        }
        let (out, inp) = lin.weight.dims2()?;
        let (an, bn) = (lora_name(name, "A"), lora_name(name, "B"));
        let (a, b) = match &saved {
            Some(s) => (
                s.get(&an)
                    .ok_or_else(|| anyhow!("adapter: {an} is missing"))?
                    .to_dtype(DType::F32)?,
                s.get(&bn)
                    .ok_or_else(|| anyhow!("adapter: {bn} is missing"))?
                    .to_dtype(DType::F32)?,
            ),
            None => {
                // PEFT's init: A ~ U(±1/√in) (kaiming_uniform with a=√5), B = 0.
                let bound = 1.0 / (inp as f64).sqrt();
                let av: Vec<f32> = (0..rank * inp)
                    .map(|_| {
                        ((init.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
                            * bound as f32
                    })
                    .collect();
                (
                    Tensor::from_vec(av, (rank, inp), device)?,
                    Tensor::zeros((out, rank), DType::F32, device)?,
                )
            }
        };
        let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        lin.lora = Some(Lora {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: alpha / rank as f64,
            dropout: args.lora_dropout as f32,
            rng: Some(dropout_rng.clone()),
        });
        vars.push((an, a));
        vars.push((bn, b));
        Ok(())
    })?;
    if vars.is_empty() {
        bail!("--lora-targets matched no module");
    }
    let spec = AdapterConfig::new(&base, rank, alpha, args.lora_dropout, targets);
    Ok(Trainable {
        model,
        vars,
        half: None,
        lora: Some(spec),
        lora_rng: Some(dropout_rng),
    })
}

pub fn tensors_of(vars: &[(String, Var)]) -> HashMap<String, Tensor> {
    vars.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}
