//! cf-sample: context-free generations from a model.

mod plan;

use anyhow::Result;
use cf_common::cli::{LogArgs, ModelArgs};
use cf_common::record::Output;
use clap::Parser;
use std::process::ExitCode;

/// Sample from a model starting from nothing but its document-start token.
///
/// Each sample starts from the model's BOS token (EOS where it has none, as
/// lm-evaluation-harness does), or from --prefix / --prefix-ids / --chat, and is drawn at
/// temperature 1 without truncation unless told otherwise: only such samples are draws from the
/// model, which is what cf-kl and cf-train need. One record per sample (see the schema in the
/// README); JSONL on stdout unless -o names a .jsonl or .parquet file.
///
/// Examples:
///   cf-sample --model allenai/OLMo-1B-hf -n 10000 --max-tokens 512 --seed 1 -o cfs.parquet
///   cf-sample --model M -n 8 --prefix $'<think>\n' | jq -r .text
///   cf-sample --model M -n 1000 --shard 2/4 -o part2.jsonl     # 4 jobs, concatenate in order
///   cf-sample --model M --prompts tasks.jsonl -n 4 -o contextual.jsonl
///   cf-sample --model M -n 500 | duckdb -c "select finish_reason, count(*) from read_json_auto('/dev/stdin') group by 1"
#[derive(Parser, Debug)]
#[command(
    name = "cf-sample",
    version,
    verbatim_doc_comment,
    allow_negative_numbers = true
)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,

    /// Samples to draw (per prompt with --prompts).
    #[arg(short = 'n', long = "num-samples", default_value_t = 1)]
    n: u64,

    /// Most tokens to generate per sample; a sample that reaches it ends with finish_reason "length".
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,

    /// Seed: sample i is a function of (seed, i) only, whatever --batch-size or --shard.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    #[command(flatten)]
    sampling: cf_common::cli::SamplingArgs,

    /// Start after this text instead (after the document-start token), e.g. $'<think>\n'.
    #[arg(long, conflicts_with_all = ["prefix_ids", "chat", "prompts"])]
    prefix: Option<String>,

    /// Start from exactly these token ids (comma-separated); nothing is added.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["chat", "prompts"])]
    prefix_ids: Option<Vec<u32>>,

    /// Start from the chat template's opening of an empty user turn (Magpie-style).
    #[arg(long, conflicts_with = "prompts")]
    chat: bool,

    /// Continue each record's prompt instead: a "prompt" field (text, or a list of messages)
    /// or a "messages" field, rendered with the chat template. Prompt fields pass through.
    #[arg(long, value_name = "FILE")]
    prompts: Option<String>,

    /// Keep generating past EOS until --max-tokens (for fixed-length benchmarks; vLLM's ignore_eos).
    #[arg(long)]
    ignore_eos: bool,

    /// Sequences decoded together.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,

    /// Produce only part K of N (1-based), e.g. 2/4: the parts, concatenated in order, are
    /// exactly the unsharded output. `auto`: K and N from a Slurm job array or a Kubernetes
    /// Indexed Job (JOB_COMPLETION_INDEX, with CF_SHARD_COUNT = the Job's completions).
    #[arg(long, value_name = "K/N|auto")]
    shard: Option<String>,

    /// Output file (.jsonl or .parquet), written atomically; JSONL on stdout by default.
    #[arg(short = 'o', long, value_name = "FILE")]
    output: Option<String>,

    #[command(flatten)]
    log: LogArgs,
}

fn main() -> ExitCode {
    cf_common::exit::run_main("cf-sample", || {
        let args = cf_common::exit::parse::<Args>()?;
        run(args)
    })
}

fn run(args: Args) -> Result<()> {
    // Everything that can be checked without the model is checked first.
    let params = args.sampling.params(1.0, args.max_tokens)?;
    if args.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let shard = args
        .shard
        .as_deref()
        .map(cf_common::cli::parse_shard)
        .transpose()?;
    let output = Output::parse(args.output.as_deref())?;
    if let Some(o) = &output.path {
        // A path that cannot be written fails now, not after the model is loaded.
        cf_common::temp::check_writable(&o.display().to_string(), "-o")?;
    }
    let prompts = match &args.prompts {
        Some(p) => {
            let ps = plan::read_prompts(p)?;
            if ps.is_empty() {
                anyhow::bail!("--prompts {p}: no records");
            }
            Some(ps)
        }
        None => None,
    };
    if !params.is_unbiased() {
        args.log.warn(
            "cf-sample",
            "tempered or truncated sampling: these are not draws from the model, so KL estimates from them are biased",
        );
    }
    let device = args.model.device()?;
    let dtype = args.model.dtype(&device)?;
    let load_t0 = std::time::Instant::now();
    let model = args
        .model
        .load(dtype, &device, cf_common::model::Mode::Infer)?;
    args.log.detail(
        "cf-sample",
        model.describe_loaded(dtype, &device, load_t0.elapsed().as_secs_f64()),
    );
    plan::note_generation_config(&model, &args.log);
    let start = match (&args.prefix, &args.prefix_ids, args.chat) {
        (Some(text), _, _) => plan::Start::Text(text.clone()),
        (_, Some(ids), _) => plan::Start::Ids(ids.clone()),
        (_, _, true) => plan::Start::Chat,
        _ => plan::Start::Document,
    };
    let jobs = plan::jobs(&model, &start, prompts.as_deref(), args.n, shard)?;
    let run = plan::Run {
        model: &model,
        model_name: &args.model.model,
        params: &params,
        seed: args.seed,
        batch_size: args.batch_size,
        ignore_eos: args.ignore_eos,
        log: &args.log,
    };
    run.execute(jobs, &output)
}
