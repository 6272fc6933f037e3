//! cf-train: fine-tune without forgetting.

mod batch;
mod checkpoint;
mod data;
mod l2;
mod optim;
mod outdir;
mod params;
mod plan;
mod save;
mod step;
mod trainer;

use anyhow::{anyhow, bail, Context, Result};
use cf_common::cli::{LogArgs, ModelArgs};
use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, Parser};
use std::process::ExitCode;

/// Fine-tune a model (full or LoRA) on a mix from cf-mix, so that context-free samples in the
/// mix keep it close to the original.
///
/// The loss is the mean next-token NLL over trained tokens, each record's tokens multiplied by
/// its weight (`weight` field, or --weight SOURCE=λ): context-free samples with weight λ add
/// λ·KL(p0 ‖ pθ) to the objective (--exact-kl SOURCE uses the exact KL to the frozen original
/// instead of the sampled tokens). Loss is reported per source. Records may be text, prompt/
/// completion, messages (chat template; assistant turns trained), Alpaca, ShareGPT, or
/// cf-sample output (token_ids, trained exactly). The output folder is a Hugging Face model
/// (or a PEFT adapter with --lora-rank) that transformers and the other cf tools load.
/// Every flag can also be set in --config FILE (TOML, same names: lr = 1e-4, lora_rank = 16);
/// flags on the command line win.
///
/// Examples:
///   cf-train --model M mix.parquet -o ft/ --lr 1e-5 --epochs 2 --metrics ft/metrics.jsonl
///   cf-train --model M mix.parquet -o ft/ --lora-rank 16 --lora-targets all --merge
///   cf-train --model M mix.parquet -o ft/ --save-every 100 ...; cf-train ... --resume  # continue exactly
///   cf-train --model M mix.parquet --inspect 2 -o ft/                 # tokens and labels, then exit
///   jq -c '{step, loss, loss_by_source}' ft/metrics.jsonl
#[derive(Parser, Debug, Clone)]
#[command(
    name = "cf-train",
    version,
    verbatim_doc_comment,
    args_override_self = true,
    allow_negative_numbers = true
)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Training records (cf-mix output), JSONL or Parquet; none or - for stdin.
    pub input: Option<String>,

    /// Output folder: the final model, checkpoint-N/ folders, and (with --merge) merged/.
    /// Not needed with --inspect or --plan, which write nothing.
    #[arg(short = 'o', long, value_name = "DIR", required_unless_present_any = ["inspect", "plan"])]
    pub output: Option<String>,

    /// TOML file of flag values (keys are the flag names); command-line flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<String>,

    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f64,

    /// Passes over the data (ignored when --max-steps is given).
    #[arg(long, default_value_t = 1)]
    pub epochs: u64,

    /// Optimiser steps to take (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,

    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,

    /// Fill micro-batches up to this many (padded) tokens instead of --batch-size sequences.
    #[arg(long)]
    pub batch_tokens: Option<usize>,

    /// Micro-batches per optimiser step (the gradient is that of their union).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,

    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,

    /// Warm-up as a fraction of all steps (overrides --warmup).
    #[arg(long)]
    pub warmup_ratio: Option<f64>,

    /// Learning-rate schedule after warm-up.
    #[arg(long, value_enum, default_value_t = optim::Schedule::Linear)]
    pub schedule: optim::Schedule,

    /// Decoupled weight decay (not applied to norms and biases).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,

    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,

    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,

    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,

    /// Clip the gradient's global norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,

    /// Longest sequence; longer ones are truncated (and counted).
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,

    /// Seed of the data order and of LoRA's initialisation and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Loss weight of a source's records (overrides their `weight` field).
    #[arg(long, value_name = "SOURCE=λ")]
    pub weight: Vec<String>,

    /// ℓ2 regularisation toward the original weights: add λ/2·‖θ − θ₀‖² to the loss (with
    /// LoRA, θ − θ₀ is the adapters' change of each adapted weight, (α/r)·B·A).
    #[arg(long, value_name = "λ")]
    pub l2_init: Option<f64>,

    /// Train a source's records towards the frozen original model's full next-token
    /// distribution (exact KL) instead of their sampled tokens.
    #[arg(long, value_name = "SOURCE")]
    pub exact_kl: Vec<String>,

    /// LoRA rank (enables LoRA; the base weights stay frozen).
    #[arg(long)]
    pub lora_rank: Option<usize>,

    /// LoRA alpha (scale alpha/rank); default: the rank.
    #[arg(long)]
    pub lora_alpha: Option<f64>,

    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,

    /// Modules to adapt: comma-separated names (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,
    /// down_proj) or all. PEFT's default for Llama-family models is q_proj,v_proj.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    pub lora_targets: Vec<String>,

    /// dtype of the saved model (and merged/): auto keeps the base model's stored dtype, as
    /// transformers' save_pretrained does; or f32, bf16, f16. Checkpoints always keep the f32
    /// master weights. config.json's `dtype` and `torch_dtype` say what is saved.
    #[arg(long, value_name = "DTYPE", value_parser = ["auto", "f32", "bf16", "f16"])]
    pub save_dtype: Option<String>,

    /// With LoRA: also write the merged full model to OUTPUT/merged/.
    #[arg(long)]
    pub merge: bool,

    /// Save a checkpoint every N steps (0: only the final model).
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,

    /// Continue from the newest checkpoint in the output folder, exactly (with the same data
    /// and training flags; a changed one is refused, by name).
    #[arg(long)]
    pub resume: bool,

    /// Start over in an output folder that holds an earlier run (its checkpoints and merged/
    /// are removed first). Without it, such a folder is refused.
    #[arg(long, conflicts_with_all = ["resume", "resume_from"])]
    pub overwrite: bool,

    /// Continue from this checkpoint folder.
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    pub resume_from: Option<String>,

    /// Append one JSON line of metrics per step to FILE.
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<String>,

    /// Print a progress line every N steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,

    /// Print N examples token by token with their labels, and exit.
    #[arg(long, value_name = "N")]
    pub inspect: Option<usize>,

    /// --inspect as a table, or as JSONL records of input_ids and labels (-100: no loss).
    #[arg(long, value_enum, default_value_t = data::InspectFormat::Table)]
    pub inspect_format: data::InspectFormat,

    /// Chat template file to use instead of the model's (e.g. one with {% generation %}
    /// blocks, whose output alone is trained, as TRL's assistant_only_loss).
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<String>,

    /// Print the predicted peak memory and its parts (JSON on stdout, a table on stderr) for
    /// these flags, reading config.json only (no weights, no data); the micro-batch is taken
    /// at its largest: --batch-size sequences of --max-length tokens (or --batch-tokens).
    #[arg(long)]
    pub plan: bool,

    /// Recompute each decoder layer in the backward pass instead of keeping its activations
    /// (transformers' name): one layer's activations live at a time, for about a third more
    /// compute. Gradients are the same.
    #[arg(long)]
    pub gradient_checkpointing: bool,

    /// Skip (and count) records that cannot be used instead of failing.
    #[arg(long)]
    pub skip_bad: bool,

    #[command(flatten)]
    pub log: LogArgs,
}

/// The settings: the command line, then the --config file for every flag the command line
/// did not set (uv's layering: one precedence rule, no merging of lists). A file value is
/// checked against the kind of flag it names (switch, one value, or a list) and passed to
/// clap as `--flag=value`, so clap's own parser types it and a negative number stays a value.
fn settings() -> Result<Args> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli: Args = cf_common::exit::parse_from(&argv)?;
    let Some(path) = cli.config.clone() else {
        return Ok(cli);
    };
    let matches = Args::command()
        .try_get_matches_from(&argv)
        .map_err(|e| anyhow!("{}", cf_common::exit::clap_line(&e)))?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("{path}: cannot read"))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| anyhow!("{path}: {}", e.message().trim()))?;
    let cmd = Args::command();
    let mut merged: Vec<std::ffi::OsString> = vec![argv[0].clone()];
    for (key, value) in &table {
        let flag = key.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()) && flag != "config")
            .ok_or_else(|| {
                anyhow!("{path}: unknown key {key:?} (keys are cf-train's flag names)")
            })?;
        if matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            continue;
        }
        let scalar = |v: &toml::Value| -> Result<String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                _ => bail!("{path}: {key}: expected a string or a number"),
            }
        };
        match (arg.get_action(), value) {
            (ArgAction::SetTrue, toml::Value::Boolean(b)) => {
                if *b {
                    merged.push(format!("--{flag}").into());
                }
            }
            (ArgAction::SetTrue, _) => bail!("{path}: {key}: expected true or false"),
            (ArgAction::Append, toml::Value::Array(items)) => {
                for it in items {
                    merged.push(format!("--{flag}={}", scalar(it)?).into());
                }
            }
            (_, toml::Value::Array(_)) => bail!("{path}: {key}: expected one value, not a list"),
            (_, v) => merged.push(format!("--{flag}={}", scalar(v)?).into()),
        }
    }
    merged.extend(argv.into_iter().skip(1));
    cf_common::exit::parse_from(merged).map_err(|e| anyhow!("{path}: {e}"))
}

fn main() -> ExitCode {
    cf_common::exit::run_main("cf-train", || {
        let args = settings()?;
        trainer::run(&args)
    })
}
