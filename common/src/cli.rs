//! clap argument groups shared by all tools, so the same flag means the same thing everywhere.

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::Args;

/// `--model`, `--device`, `--dtype`.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model: a Hugging Face folder (config.json, *.safetensors, tokenizer.json) or a model id
    /// (org/name[@revision]) already in the local Hugging Face cache.
    #[arg(long, short = 'm', value_name = "DIR|ID")]
    pub model: String,

    /// Where to compute: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,

    /// Compute dtype: f32, bf16, f16 or f64 (default f32 on CPU, bf16 on CUDA).
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
}

impl ModelArgs {
    pub fn device(&self) -> Result<Device> {
        parse_device(&self.device)
    }

    pub fn dtype(&self, device: &Device) -> Result<DType> {
        match &self.dtype {
            Some(s) => parse_dtype(s),
            None if device.is_cuda() => Ok(DType::BF16),
            None => Ok(DType::F32),
        }
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| anyhow::anyhow!("--device {s}: expected cuda:N"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device {s}: this build has no CUDA support (build with `--features cuda`)"
                );
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
    }
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        "f64" | "float64" => Ok(DType::F64),
        other => bail!("--dtype {other}: expected f32, bf16, f16 or f64"),
    }
}

/// Repeatable `NAME=VALUE` flag values (`--weight cf=0.5`, `--map a=b`), split at the first `=`;
/// `usage` completes the error, e.g. "expected SOURCE=λ".
pub fn name_values(items: &[String], flag: &str, usage: &str) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|s| {
            s.split_once('=')
                .filter(|(a, b)| !a.is_empty() && !b.is_empty())
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow::anyhow!("{flag} {s}: {usage}"))
        })
        .collect()
}

/// `--weight NAME=λ` values of cf-mix and cf-train, parsed one way: λ is a finite number >= 0
/// (`nan`, `inf` and negative weights are errors), each name at most once. Whether a name is a
/// known source is for the caller to check.
pub fn loss_weights(items: &[String]) -> Result<Vec<(String, f64)>> {
    let mut out: Vec<(String, f64)> = Vec::new();
    for (k, v) in name_values(items, "--weight", "expected SOURCE=λ")? {
        let w: f64 = v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--weight {k}={v}: not a number"))?;
        if !(w.is_finite() && w >= 0.0) {
            bail!("--weight {k}={v}: must be a finite number >= 0");
        }
        if out.iter().any(|(o, _)| *o == k) {
            bail!("--weight {k}: given twice");
        }
        out.push((k, w));
    }
    Ok(out)
}

/// `-q` / `-v`.
#[derive(Args, Clone, Debug, Default)]
pub struct LogArgs {
    /// Print only errors.
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,
    /// Print more about what is happening.
    #[arg(long, short = 'v', global = true)]
    pub verbose: bool,
}

impl LogArgs {
    /// Print a message to stderr unless `-q`.
    pub fn info(&self, tool: &str, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{tool}: {}", msg.as_ref());
        }
    }

    /// Print a detail to stderr with `-v` (timings, what was loaded, settings resolved).
    pub fn detail(&self, tool: &str, msg: impl AsRef<str>) {
        if self.verbose && !self.quiet {
            eprintln!("{tool}: {}", msg.as_ref());
        }
    }

    /// Print a warning to stderr unless `-q`.
    pub fn warn(&self, tool: &str, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{tool}: warning: {}", msg.as_ref());
        }
    }
}
