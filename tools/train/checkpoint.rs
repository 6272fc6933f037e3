//! Checkpoints and the final output: what is written (model folder, adapter, optimizer state,
//! trainer state with the settings a resume must share), and the checks before it is written.

use crate::optim::AdamW;
use crate::params::{lora_name, tensors_of, Trainable};
use crate::Args;
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use cf_common::model::save;
use cf_common::model::{Decoder, Source};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

const TOOL: &str = "cf-train";

/// Weights as a model folder in `dtype` (checkpoints keep the f32 master weights, so a resumed
/// run continues exactly), or as a PEFT adapter.
pub fn write_weights(t: &Trainable, dtype: DType, dir: &Path) -> Result<()> {
    match &t.lora {
        None => save::model_folder(&t.model.files, &tensors_of(&t.vars), dtype, dir),
        Some(spec) => save::adapter_folder(&t.model.files, spec, &tensors_of(&t.vars), dir),
    }
}

/// A checkpoint or model is saved only when every weight is finite: a finite loss and
/// gradient can still take an update to inf (a huge learning rate).
pub fn finite_weights(t: &Trainable, step: u64, last_good: &str) -> Result<()> {
    let mut bad = 0usize;
    for (_, v) in &t.vars {
        let x = v.as_tensor().to_dtype(DType::F32)?.flatten_all()?;
        let finite = x
            .abs()?
            .le(f32::MAX as f64)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize;
        bad += x.elem_count() - finite;
    }
    if bad > 0 {
        bail!("step {step}: {bad} weights are not finite; not saving them (last good checkpoint: {last_good})");
    }
    Ok(())
}

/// The flags a resumed run must share with the run it continues (those that change its
/// trajectory), as written into every checkpoint.
pub fn settings(args: &Args) -> serde_json::Map<String, Value> {
    let v = json!({
        "lr": args.lr, "epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size,
        "batch_tokens": args.batch_tokens, "grad_accum": args.grad_accum, "warmup": args.warmup,
        "warmup_ratio": args.warmup_ratio, "schedule": format!("{:?}", args.schedule).to_lowercase(),
        "weight_decay": args.weight_decay, "adam_beta1": args.adam_beta1, "adam_beta2": args.adam_beta2,
        "adam_eps": args.adam_eps, "max_grad_norm": args.max_grad_norm, "max_length": args.max_length,
        "weight": args.weight, "exact_kl": args.exact_kl, "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout, "lora_targets": args.lora_targets,
        "dtype": args.model.dtype, "model": args.model.model, "adapter": args.model.adapter, "l2_init": args.l2_init,
    });
    v.as_object().cloned().unwrap_or_default()
}

pub fn checkpoint(
    args: &Args,
    t: &Trainable,
    opt: &AdamW,
    dir: &Path,
    epoch: u64,
    micro: usize,
    fp: &str,
) -> Result<()> {
    save::atomic_dir(dir, |tmp| {
        write_weights(t, DType::F32, tmp)?;
        cf_common::model::save::save_safetensors(&opt.state(), &tmp.join("optimizer.safetensors"))?;
        let state = json!({
            "global_step": opt.step,
            "epoch": epoch,
            "micro_batch": micro,
            "seed": args.seed,
            "data": fp,
            "lora_dropout_word_pos": t.lora_rng.as_ref().map(|r| r.lock().unwrap().get_word_pos().to_string()),
            "settings": settings(args),
        });
        cf_common::record::write_atomic(
            &tmp.join("trainer_state.json"),
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )
    })?;
    args.log.info(TOOL, format!("saved {}", dir.display()));
    Ok(())
}

pub fn final_output(args: &Args, t: &Trainable, out: &Path) -> Result<()> {
    let dtype = match args.save_dtype.as_deref() {
        None | Some("auto") => save::stored_dtype(&t.model.files)?,
        Some(d) => cf_common::cli::parse_dtype(d)?,
    };
    write_weights(t, dtype, out)?;
    if let (Some(spec), true) = (&t.lora, args.merge) {
        // W + (α/r)·B·A for every adapted projection; the rest as loaded.
        let files = &t.model.files;
        let w = cf_common::model::Weights::open(&files.weights, DType::F32, &Device::Cpu)?;
        let adapters = tensors_of(&t.vars);
        let mut merged = HashMap::new();
        for (name, shape) in Decoder::parameter_shapes(&t.model.cfg) {
            let mut x = w.get(&name, &shape)?;
            if let Some(module) = name.strip_suffix(".weight") {
                if let (Some(a), Some(b)) = (
                    adapters.get(&lora_name(module, "A")),
                    adapters.get(&lora_name(module, "B")),
                ) {
                    x = cf_common::model::adapter::merged_weight(&x, a, b, spec.scale())?;
                }
            }
            merged.insert(name, x);
        }
        let dir = out.join("merged");
        save::atomic_dir(&dir, |tmp| save::model_folder(files, &merged, dtype, tmp))?;
    }
    Ok(())
}
