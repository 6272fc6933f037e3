//! cf-merge: merge weights — an adapter into its base, or a fine-tuned model with the original
//! (WiSE-FT).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use cf_common::cli::LogArgs;
use cf_common::model::adapter::{self, AdapterConfig};
use cf_common::model::{save, Config, Decoder, ModelFiles, Source, Weights};
use clap::Parser;
use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

/// Merge model weights into a new model folder that transformers and the cf tools load.
///
/// A LoRA adapter folder (PEFT's adapter_config.json + adapter_model.safetensors) is merged
/// into its base: W + (α/r)·B·A. With --base, WiSE-FT (Wortsman et al. 2022), the paper's
/// weight-interpolation baseline: (1 − α)·θ₀ + α·θ for every weight, θ₀ the original (--base)
/// and θ the fine-tuned (--model, a model or an adapter). α = 0 gives the original, 1 the
/// fine-tuned model; sweep α from one run. The output is stored in the original's dtype
/// (--save-dtype for another), built under a temporary name and renamed whole.
///
/// Examples:
///   cf-merge --model ft-lora/ -o merged/                       # adapter into its base
///   cf-merge --base M0 --model ft/ --alpha 0.5 -o wise-0.5/     # WiSE-FT
///   for a in 0.25 0.5 0.75; do cf-merge --base M0 --model ft/ --alpha $a -o wise-$a/; done
///   cf-eval --model wise-0.5/ --task arc_easy:test.parquet --compare before.json
#[derive(Parser, Debug)]
#[command(
    name = "cf-merge",
    version,
    verbatim_doc_comment,
    allow_negative_numbers = true
)]
struct Args {
    /// The fine-tuned model: a model folder or cached id, or a PEFT adapter folder.
    #[arg(long, short = 'm', value_name = "DIR|ID")]
    model: String,

    /// The original model, for WiSE-FT (same shapes as --model).
    #[arg(long, value_name = "DIR|ID")]
    base: Option<String>,

    /// WiSE-FT's mixing weight: (1 − α)·base + α·model.
    #[arg(long, requires = "base")]
    alpha: Option<f64>,

    /// Output model folder.
    #[arg(short = 'o', long, value_name = "DIR")]
    output: String,

    /// dtype of the saved model: auto (the original's stored dtype), f32, bf16, f16.
    #[arg(long, value_name = "DTYPE", value_parser = ["auto", "f32", "bf16", "f16"])]
    save_dtype: Option<String>,

    /// Replace an existing output folder.
    #[arg(long)]
    overwrite: bool,

    #[command(flatten)]
    log: LogArgs,
}

fn main() -> ExitCode {
    cf_common::exit::run_main("cf-merge", || run(&cf_common::exit::parse::<Args>()?))
}

/// A model's weights in f32 by name (an adapter folder: merged into its base), its files
/// (the base's, for an adapter) and config.
fn weights_of(name: &str) -> Result<(HashMap<String, Tensor>, ModelFiles, Config)> {
    let dir = Path::new(name);
    let (base, adapter) = if adapter::is_adapter(dir) {
        let cfg = AdapterConfig::read(dir)?;
        (cfg.base_name(), Some(cfg))
    } else {
        (name.to_string(), None)
    };
    let files = ModelFiles::locate(&base)?;
    let cfg = Config::load(&files.config)?;
    let w = Weights::open(&files.weights, DType::F32, &Device::Cpu)?;
    let mut out = HashMap::new();
    for (n, shape) in Decoder::parameter_shapes(&cfg) {
        out.insert(n.clone(), w.get(&n, &shape)?);
    }
    if let Some(acfg) = adapter {
        // The adapter matrices, checked against the base's projections.
        let mut dec = Decoder::new(
            &cfg,
            &out,
            DType::F32,
            &Device::Cpu,
            cf_common::model::Mode::Infer,
        )?;
        for (module, a, b) in adapter::load_tensors(&mut dec, dir, &acfg, &Device::Cpu)? {
            let k = format!("{module}.weight");
            let merged = adapter::merged_weight(&out[&k], &a, &b, acfg.scale())?;
            out.insert(k, merged);
        }
    }
    Ok((out, files, cfg))
}

fn run(args: &Args) -> Result<()> {
    const TOOL: &str = "cf-merge";
    if let Some(a) = args.alpha {
        if !a.is_finite() {
            bail!("--alpha must be a number, got {a}");
        }
    }
    if args.base.is_some() && args.alpha.is_none() {
        bail!("--base needs --alpha (WiSE-FT's mixing weight)");
    }
    if args.base.is_none() && !adapter::is_adapter(Path::new(&args.model)) {
        bail!(
            "{}: not an adapter folder; to interpolate two models give --base and --alpha",
            args.model
        );
    }
    let out = Path::new(&args.output);
    if out.exists() && !args.overwrite {
        bail!("{}: exists (--overwrite replaces it)", out.display());
    }
    // The output's folder must take the new one before any weight is read.
    cf_common::temp::dir_beside(out).map(drop)?;
    let (theta, files, cfg) = weights_of(&args.model)?;
    let (tensors, files) = match (&args.base, args.alpha) {
        (Some(b), Some(alpha)) => {
            let (theta0, files0, cfg0) = weights_of(b)?;
            if (cfg0.vocab_size, cfg0.hidden_size, cfg0.num_layers)
                != (cfg.vocab_size, cfg.hidden_size, cfg.num_layers)
            {
                bail!("{b} and {}: the models have different shapes", args.model);
            }
            let mut mixed = HashMap::new();
            for (k, t0) in &theta0 {
                let t = theta
                    .get(k)
                    .with_context(|| format!("{}: {k} is missing", args.model))?;
                if t.dims() != t0.dims() {
                    bail!("{k}: shapes {:?} and {:?} differ", t0.dims(), t.dims());
                }
                mixed.insert(k.clone(), ((t0 * (1.0 - alpha))? + (t * alpha)?)?);
            }
            args.log
                .info(TOOL, format!("(1 − {alpha})·{b} + {alpha}·{}", args.model));
            (mixed, files0)
        }
        _ => {
            args.log
                .info(TOOL, format!("{} merged into its base", args.model));
            (theta, files)
        }
    };
    let dtype = match args.save_dtype.as_deref() {
        None | Some("auto") => save::stored_dtype(&files)?,
        Some(d) => cf_common::cli::parse_dtype(d)?,
    };
    save::atomic_dir(out, |tmp| save::model_folder(&files, &tensors, dtype, tmp))?;
    args.log.info(TOOL, format!("wrote {}", out.display()));
    Ok(())
}
