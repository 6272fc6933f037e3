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

    /// A PEFT LoRA adapter folder to put on --model (which may also be an adapter folder
    /// itself: its adapter_config.json names the base).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<String>,
}

impl ModelArgs {
    pub fn device(&self) -> Result<Device> {
        parse_device(&self.device)
    }

    /// The model these flags name: --model, with --adapter on it when given.
    pub fn load(
        &self,
        dtype: DType,
        device: &Device,
        mode: crate::model::Mode,
    ) -> Result<crate::model::Model> {
        match &self.adapter {
            Some(a) => crate::model::Model::load_adapter(Some(&self.model), a, dtype, device, mode),
            None => crate::model::Model::load(&self.model, dtype, device, mode),
        }
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
            let dev = Device::new_cuda(ordinal)?;
            #[cfg(feature = "cuda")]
            tune_cuda(&dev)?;
            Ok(dev)
        }
        other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
    }
}

/// Set a CUDA device up for many small kernels and allocations (a decoding step is hundreds of
/// each; the kit's `cfshim.c` measured both costs):
/// - cudarc creates two events per allocation for the case of several streams sharing memory;
///   candle runs each device on one stream, where they are never waited on and only cost their
///   creation: tracking is off;
/// - the default memory pool hands freed memory back to the driver at every synchronisation
///   (release threshold 0), so the next step allocates it again: the threshold is raised to
///   keep it, as PyTorch's caching allocator does. A device without memory pools (some vGPU
///   and WSL set-ups; cudarc then allocates synchronously) is left as it is.
#[cfg(feature = "cuda")]
fn tune_cuda(dev: &Device) -> Result<()> {
    use cudarc::driver::sys;
    let cuda = dev.as_cuda_device()?;
    let stream = cuda.cuda_stream();
    let ctx = stream.context();
    // SAFETY: every kernel and copy of this device goes through candle's one stream, so no
    // allocation is ever used on another stream before its writes finish.
    unsafe { ctx.disable_event_tracking() };
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: plain driver calls on a device the context above has initialised.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    if r != sys::CUresult::CUDA_SUCCESS {
        bail!(
            "--device cuda:{}: cannot read the memory pool: {r:?}",
            ctx.ordinal()
        );
    }
    let mut keep = u64::MAX;
    let r = unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut keep as *mut u64 as *mut std::ffi::c_void,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        bail!(
            "--device cuda:{}: cannot set the memory pool's release threshold: {r:?}",
            ctx.ordinal()
        );
    }
    Ok(())
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

/// vLLM's sampling flags, the same in cf-sample and cf-eval. The default temperature is the
/// tool's: cf-sample 1 (draws from the model), cf-eval 0 (greedy, as lm-eval).
#[derive(Args, Clone, Debug, Default)]
pub struct SamplingArgs {
    /// Softmax temperature; 0 is greedy (default: cf-sample 1, cf-eval 0). Anything but 1
    /// biases KL estimates.
    #[arg(long)]
    pub temperature: Option<f64>,

    /// Keep only the smallest set of tokens whose probability reaches P (off by default).
    #[arg(long)]
    pub top_p: Option<f64>,

    /// Keep only the K most probable tokens (off by default).
    #[arg(long)]
    pub top_k: Option<usize>,

    /// Keep only tokens with probability at least P times the most probable one's (off by
    /// default).
    #[arg(long)]
    pub min_p: Option<f64>,

    /// A preset that sets temperature and top-p: r1 is DeepSeek-R1's (0.6, 0.95). Flags given
    /// beside it win.
    #[arg(long, value_parser = ["r1"])]
    pub sampling: Option<String>,
}

impl SamplingArgs {
    /// The sampling parameters, checked (before any weights load).
    pub fn params(
        &self,
        default_temperature: f64,
        max_tokens: usize,
    ) -> Result<crate::generate::SamplingParams> {
        let (pt, pp) = match self.sampling.as_deref() {
            Some("r1") => (Some(0.6), Some(0.95)),
            _ => (None, None),
        };
        let p = crate::generate::SamplingParams {
            temperature: self.temperature.or(pt).unwrap_or(default_temperature),
            top_k: self.top_k,
            top_p: self.top_p.or(pp),
            min_p: self.min_p,
            max_tokens,
        };
        p.validate()?;
        Ok(p)
    }
}

/// `--shard K/N` (1-based), or `--shard auto`: K and N from the scheduler that started the
/// job — a Slurm job array (`SLURM_ARRAY_TASK_ID`, `_MIN`, `_COUNT`, `_STEP`) or a Kubernetes
/// Indexed Job (`JOB_COMPLETION_INDEX`, with `CF_SHARD_COUNT` set to its completions).
pub fn parse_shard(s: &str) -> Result<(u64, u64)> {
    use crate::env::{self as e, var};
    if s == "auto" {
        let num = |name: &str| -> Result<Option<u64>> {
            var(name)
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| {
                        anyhow::anyhow!("--shard auto: {name}={v:?} is not a whole number")
                    })
                })
                .transpose()
        };
        let (k, n) = if let Some(id) = num(e::SLURM_ARRAY_TASK_ID)? {
            let min = num(e::SLURM_ARRAY_TASK_MIN)?.unwrap_or(0);
            let step = num(e::SLURM_ARRAY_TASK_STEP)?.unwrap_or(1).max(1);
            let count = num(e::SLURM_ARRAY_TASK_COUNT)?.ok_or_else(|| {
                anyhow::anyhow!(
                    "--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not"
                )
            })?;
            if id < min || (id - min) % step != 0 {
                bail!("--shard auto: SLURM_ARRAY_TASK_ID {id} is not in the array (min {min}, step {step})");
            }
            ((id - min) / step + 1, count)
        } else if let Some(i) = num(e::JOB_COMPLETION_INDEX)? {
            let n = num(e::CF_SHARD_COUNT)?.ok_or_else(|| {
                anyhow::anyhow!("--shard auto: JOB_COMPLETION_INDEX is set; set CF_SHARD_COUNT to the Job's completions too")
            })?;
            (i + 1, n)
        } else {
            bail!("--shard auto: no scheduler says which part this is (SLURM_ARRAY_TASK_ID, or JOB_COMPLETION_INDEX with CF_SHARD_COUNT); give --shard K/N");
        };
        if k == 0 || n == 0 || k > n {
            bail!("--shard auto: part {k} of {n} is not a part");
        }
        return Ok((k, n));
    }
    let bad = || anyhow::anyhow!("--shard {s}: expected K/N with 1 <= K <= N, e.g. 2/4, or auto");
    let (k, n) = s.split_once('/').ok_or_else(bad)?;
    let (k, n): (u64, u64) = (
        k.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if k == 0 || n == 0 || k > n {
        return Err(bad());
    }
    Ok((k, n))
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
