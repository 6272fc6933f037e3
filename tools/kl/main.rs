//! cf-kl: estimate KL(original ‖ fine-tuned) from samples of the original model.

mod estimate;
mod score;

use anyhow::{bail, Result};
use cf_common::cli::{parse_dtype, LogArgs, ModelArgs};
use cf_common::model::{Mode, Model};
use cf_common::record::{Output, ReadOptions};
use clap::Parser;
use std::process::ExitCode;

/// Estimate KL(p0 ‖ pθ), how far a fine-tuned model pθ moved from the original p0, from samples
/// of p0 (cf-sample's output). It needs no benchmark data: only the samples.
///
/// Two estimators, both unbiased for samples drawn from p0 at temperature 1 without truncation:
///   kl_seq    mean over samples of log p0(x) − log pθ(x) (log p0 from the records' `logprob`
///             when --base is not given, else both models score);
///   kl_token  at every position of each sample, the exact KL between the two next-token
///             distributions over the whole vocabulary, summed over the sample (needs --base;
///             same expectation, lower variance).
/// One JSON object on stdout; --per-record writes every record with its own terms.
///
/// Examples:
///   cf-kl --base allenai/OLMo-1B-hf --model ft/ cfs.parquet | jq .kl_token
///   cf-kl --model ft/ cfs.jsonl                          # kl_seq only, log p0 from the records
///   cf-kl --base M0 --model ft/ cfs.parquet --max 0.05   # exit 1 when over budget (CI gate)
///   cf-kl --base M0 --model ft/ cfs.parquet --per-record terms.parquet
///   duckdb -c "select finish_reason, avg(kl_token) from 'terms.parquet' group by 1"
#[derive(Parser, Debug)]
#[command(
    name = "cf-kl",
    version,
    verbatim_doc_comment,
    allow_negative_numbers = true
)]
struct Args {
    /// The fine-tuned model pθ.
    #[command(flatten)]
    model: ModelArgs,

    /// The original model p0 the samples came from (folder or cached id). Without it, log p0 is
    /// read from each record's `logprob` and only kl_seq is estimated.
    #[arg(long, value_name = "DIR|ID")]
    base: Option<String>,

    /// Samples from p0 (cf-sample output), JSONL or Parquet; none or - for stdin.
    input: Option<String>,

    /// Write each record with logprob_base, logprob_model, kl_seq (and kl_token) to FILE
    /// (.jsonl or .parquet; - for stdout, the summary then goes to stderr).
    #[arg(long, value_name = "FILE")]
    per_record: Option<String>,

    /// Exit 1 when the estimate (kl_token with --base, else kl_seq) exceeds X.
    #[arg(long, value_name = "X")]
    max: Option<f64>,

    /// Sequences scored together (right-padded).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,

    /// Skip (and count) records that cannot be scored instead of failing.
    #[arg(long)]
    skip_bad: bool,

    #[command(flatten)]
    log: LogArgs,
}

fn main() -> ExitCode {
    cf_common::exit::run_main("cf-kl", || run(cf_common::exit::parse::<Args>()?))
}

fn run(args: Args) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if let Some(x) = args.max {
        if !x.is_finite() {
            bail!("--max must be a number, got {x}");
        }
    }
    let per_record = args
        .per_record
        .as_deref()
        .map(|p| Output::parse(Some(p)))
        .transpose()?;
    if let Some(dt) = &args.model.dtype {
        parse_dtype(dt)?;
    }
    let mut reader = cf_common::record::open(
        args.input.as_deref(),
        ReadOptions {
            skip_bad: args.skip_bad,
        },
    )?;
    // Without --base the records must carry the original model's log-probability: say so
    // before loading anything.
    if args.base.is_none() {
        if let Some(Ok((loc, rec))) = reader.peek() {
            if rec.get("logprob").is_none_or(|v| v.is_null()) {
                bail!("{loc}: no \"logprob\" field; give --base to score the original model");
            }
        }
    }
    if let Some(o) = per_record.as_ref().and_then(|o| o.path.as_ref()) {
        cf_common::temp::check_writable(&o.display().to_string(), "--per-record")?;
    }
    let device = args.model.device()?;
    let dtype = args.model.dtype(&device)?;
    let load_t0 = std::time::Instant::now();
    let model = args.model.load(dtype, &device, Mode::Infer)?;
    args.log.detail(
        "cf-kl",
        model.describe_loaded(dtype, &device, load_t0.elapsed().as_secs_f64()),
    );
    let base = args
        .base
        .as_deref()
        .map(|b| Model::load(b, dtype, &device, Mode::Infer))
        .transpose()?;
    if let Some(b) = &base {
        if b.cfg.vocab_size != model.cfg.vocab_size {
            bail!(
                "--base has a vocabulary of {} and --model of {}: KL needs the same tokenizer",
                b.cfg.vocab_size,
                model.cfg.vocab_size
            );
        }
    }
    let scorer = score::Scorer {
        model: &model,
        base: base.as_ref(),
        batch_size: args.batch_size,
    };
    let summary = estimate::run(&scorer, reader, per_record.as_ref(), &args)?;
    let to_stderr = per_record.as_ref().is_some_and(|o| o.path.is_none());
    let text = serde_json::to_string_pretty(&summary.json)?;
    if to_stderr {
        eprintln!("{text}");
    } else {
        use std::io::Write;
        let mut out = cf_common::exit::stdout()?.lock();
        writeln!(out, "{text}")?;
        out.flush()?;
    }
    if let Some(max) = args.max {
        if summary.primary > max {
            return Err(cf_common::exit::CheckFailed(format!(
                "{} = {:.6} exceeds --max {max}",
                summary.primary_name, summary.primary
            ))
            .into());
        }
    }
    Ok(())
}
