//! The trainable state: the model with its parameters as variables (full fine-tuning: every
//! weight, f32 masters; LoRA: PEFT-initialised adapters on a frozen base), from `--model` or a
//! checkpoint.

use crate::save::LoraSpec;
use crate::Args;
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use cf_common::model::{Decoder, Lora, Mode, Model, Source};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
/// The ChaCha stream of LoRA's initialisation and dropout (data order uses streams 0, 1, … per epoch).
const LORA_STREAM: u64 = 1 << 40;

/// The trainable state: parameters by name (full fine-tuning: every weight; LoRA: adapters).
pub struct Trainable {
    pub model: Model,
    pub vars: Vec<(String, Var)>,
    /// Full fine-tuning in a half-precision compute dtype: the decoder is rebuilt every step
    /// from the f32 master weights cast to it (gradients flow back through the cast).
    pub half: Option<DType>,
    pub lora: Option<LoraSpec>,
    pub lora_rng: Option<Arc<Mutex<ChaCha8Rng>>>,
}

pub fn lora_name(module: &str, ab: &str) -> String {
    format!("base_model.model.{module}.lora_{ab}.weight")
}

/// Load the model with trainable parameters, from `--model` or from a checkpoint.
pub fn trainable(
    args: &Args,
    device: &Device,
    dtype: DType,
    resume: Option<&Path>,
) -> Result<Trainable> {
    let Some(rank) = args.lora_rank else {
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
    // LoRA: frozen base weights (plain tensors: no gradient graph), f32 adapters.
    let mut model = Model::load(&args.model.model, dtype, device, Mode::Train)?;
    let targets: Vec<String> = if args.lora_targets.iter().any(|t| t == "all") {
        ALL_TARGETS.iter().map(|s| s.to_string()).collect()
    } else {
        args.lora_targets.clone()
    };
    let alpha = args.lora_alpha.unwrap_or(rank as f64);
    let mut init = ChaCha8Rng::seed_from_u64(args.seed);
    init.set_stream(LORA_STREAM);
    let dropout_rng = {
        let mut r = ChaCha8Rng::seed_from_u64(args.seed);
        r.set_stream(LORA_STREAM + 1);
        Arc::new(Mutex::new(r))
    };
    let saved = match resume {
        Some(dir) => Some(candle_core::safetensors::load(
            dir.join("adapter_model.safetensors"),
            device,
        )?),
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
                    .ok_or_else(|| anyhow!("checkpoint: {an} is missing"))?
                    .to_dtype(DType::F32)?,
                s.get(&bn)
                    .ok_or_else(|| anyhow!("checkpoint: {bn} is missing"))?
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
    let spec = LoraSpec {
        rank,
        alpha,
        dropout: args.lora_dropout,
        targets,
    };
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
