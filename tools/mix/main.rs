//! cf-mix: build the fine-tuning mix.

mod plan;
mod source;

use anyhow::{bail, Context, Result};
use cf_common::cli::{name_values, LogArgs};
use cf_common::record::{Output, SchemaInfer, Writer};
use clap::{Parser, ValueEnum};
use serde_json::json;
use source::{parse_spec, Source};
use std::process::ExitCode;

/// Mix task data with context-free samples (or any other sources) at a stated ratio, shuffled
/// with a seed, and say exactly what was done.
///
/// Each source is [LABEL:]PATH[=RATIO] (PATH - is stdin; LABEL defaults to the file's stem and
/// becomes the records' `source` field). RATIO, in records or, with --by tokens, in tokens:
///   W        a share of the final mix; shares are normalised (a=1 b=1 is half and half).
///            The mix is as large as needed to use every record at least once: a source
///            smaller than its share is oversampled (with a warning). --cap instead sizes the
///            mix so that no record repeats; --total N fixes the size.
///   all      every record exactly once (the default)
///   n:N      exactly N (oversampled with a warning when the source is smaller; --cap limits
///            it to the source)
///   per:R    R for every one of the `all` and `n:` sources together ("all of A, and 0.5 of B per A")
/// Records keep all their fields (text, prompt/completion, messages, Alpaca, ShareGPT all pass
/// through) and gain `source`, and `weight` with --weight. A report goes to stderr (and JSON to
/// --report): per source, records and tokens in, records out, repeats.
///
/// Examples:
///   cf-mix sft.jsonl=1 cfs.parquet=1 --seed 7 -o mix.parquet
///   cf-mix sft.jsonl=all cfs.parquet=per:0.25 --weight cfs=0.5 -o mix.jsonl
///   cf-mix task:sft.jsonl=0.9 cf:cfs.parquet=0.1 --by tokens --tokenizer model/ --total 2000000 -o mix.parquet
///   cf-sample --model M -n 1000 | cf-mix sft.jsonl=1 -=1 --cap --report mix.json | jq -r .source | sort | uniq -c
#[derive(Parser, Debug)]
#[command(
    name = "cf-mix",
    version,
    verbatim_doc_comment,
    allow_negative_numbers = true
)]
struct Args {
    /// Sources: [LABEL:]PATH[=RATIO].
    #[arg(required = true, value_name = "SOURCE")]
    sources: Vec<String>,

    /// Seed of the selection and the shuffle: same seed, same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Unit of the ratios.
    #[arg(long, value_enum, default_value_t = By::Records)]
    by: By,

    /// Tokenizer (a folder with tokenizer.json) to count tokens of records without token_ids.
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<String>,

    /// Size of the mix for shares, in records (or tokens with --by tokens).
    #[arg(long, value_name = "N")]
    total: Option<f64>,

    /// Never repeat a record: size the mix (or clip n:/per:) to what the sources hold.
    #[arg(long)]
    cap: bool,

    /// Add `weight` = λ (a per-source loss weight cf-train honours) to the records of LABEL.
    #[arg(long, value_name = "LABEL=λ")]
    weight: Vec<String>,

    /// Rename a field in every record (e.g. --map question=prompt --map answer=completion).
    #[arg(long, value_name = "FROM=TO")]
    map: Vec<String>,

    /// Write the report as JSON to FILE too.
    #[arg(long, value_name = "FILE")]
    report: Option<String>,

    /// Skip (and count) bad records instead of failing.
    #[arg(long)]
    skip_bad: bool,

    /// Output (.jsonl or .parquet), written atomically; JSONL on stdout by default.
    #[arg(short = 'o', long, value_name = "FILE")]
    output: Option<String>,

    #[command(flatten)]
    log: LogArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum By {
    Records,
    Tokens,
}

fn main() -> ExitCode {
    cf_common::exit::run_main("cf-mix", || {
        cf_common::exit::on_sigbus_for_mapped_inputs("cf-mix");
        // `-=RATIO` (stdin with a ratio) looks like a short flag to clap: spell it
        // `stdin:-=RATIO`, the label `-` gets anyway.
        let argv = std::env::args_os().map(|a| match a.to_str() {
            Some(s) if s.starts_with("-=") => format!("stdin:{s}").into(),
            _ => a,
        });
        run(cf_common::exit::parse_from::<Args, _, _>(argv)?)
    })
}

fn run(args: Args) -> Result<()> {
    let specs = args
        .sources
        .iter()
        .map(|s| parse_spec(s))
        .collect::<Result<Vec<_>>>()?;
    let mut labels: Vec<&str> = specs.iter().map(|s| s.label.as_str()).collect();
    labels.sort_unstable();
    if let Some(w) = labels.windows(2).find(|w| w[0] == w[1]) {
        bail!(
            "two sources are labelled {:?}: name them with LABEL:PATH",
            w[0]
        );
    }
    if specs.iter().filter(|s| s.path == "-").count() > 1 {
        bail!("stdin (-) can be only one source");
    }
    let weights = cf_common::cli::loss_weights(&args.weight)?;
    for (l, _) in &weights {
        if !specs.iter().any(|s| s.label == *l) {
            bail!("--weight {l}: no source is labelled {l:?}");
        }
    }
    let maps = name_values(&args.map, "--map", "expected NAME=VALUE")?;
    if let Some(t) = args.total {
        if !(t > 0.0 && t.is_finite()) {
            bail!("--total must be positive");
        }
    }
    let output = Output::parse(args.output.as_deref())?;
    // Both outputs are opened (as temporary files beside them) before any input is read, so a
    // bad path fails at once; they are renamed into place together at the end.
    let mut writer = Writer::create(&output)?;
    let report_tmp = args
        .report
        .as_deref()
        .map(|p| cf_common::temp::file_beside(std::path::Path::new(p)))
        .transpose()?;
    let by_tokens = args.by == By::Tokens;
    let tok = args
        .tokenizer
        .as_deref()
        .map(|t| cf_common::tokenizer::Tok::load(&cf_common::model::ModelFiles::tokenizer_only(t)?))
        .transpose()?;
    let need_tokens = by_tokens || tok.is_some();
    let sources = specs
        .into_iter()
        .map(|s| Source::index(s, tok.as_ref(), need_tokens, args.skip_bad))
        .collect::<Result<Vec<_>>>()?;
    for s in &sources {
        args.log.detail(
            "cf-mix",
            format!(
                "{}: {} records from {}{}",
                s.spec.label,
                s.len(),
                s.spec.path,
                s.total_tokens()
                    .map_or(String::new(), |t| format!(", {t} tokens"))
            ),
        );
    }
    let targets = plan::targets(&sources, by_tokens, args.total, args.cap)?;
    let whole = (!by_tokens).then(|| plan::apportion(&targets));
    let takes = sources
        .iter()
        .enumerate()
        .map(|(i, s)| plan::take(s, i, targets[i], whole.as_ref().map(|w| w[i]), args.seed))
        .collect::<Result<Vec<_>>>()?;
    let order = plan::order(&takes, args.seed);

    let shape = |si: usize, ri: u32| -> Result<cf_common::record::Record> {
        let src = &sources[si];
        let mut rec = src.record(ri as usize)?;
        for (from, to) in &maps {
            if let Some(v) = rec.remove(from) {
                rec.insert(to.clone(), v);
            }
        }
        rec.insert("source".into(), json!(src.spec.label));
        if let Some((_, w)) = weights.iter().find(|(l, _)| *l == src.spec.label) {
            rec.insert("weight".into(), json!(w));
        }
        Ok(rec)
    };
    if output.format == cf_common::record::Format::Parquet {
        // A first pass over the distinct records learns the schema, so the file streams.
        let mut infer = SchemaInfer::default();
        for (si, t) in takes.iter().enumerate() {
            let mut seen = vec![false; sources[si].len()];
            for &ri in &t.picks {
                if !std::mem::replace(&mut seen[ri as usize], true) {
                    infer.push(&shape(si, ri)?);
                }
            }
        }
        writer = writer.with_schema(infer.schema());
    }
    let progress = cf_common::progress::Progress::new(
        "cf-mix",
        "records",
        Some(order.len() as u64),
        &args.log,
    );
    for &(si, ri) in &order {
        writer.write(&shape(si as usize, ri)?)?;
        progress.inc(1);
    }
    progress.finish();
    let rep = report(&args, &sources, &takes, by_tokens)?;
    let report_tmp = match report_tmp {
        Some(mut t) => {
            use std::io::Write;
            t.write_all(serde_json::to_string_pretty(&rep)?.as_bytes())
                .context("--report: cannot write")?;
            Some(t)
        }
        None => None,
    };
    writer.finish()?;
    if let (Some(t), Some(p)) = (report_tmp, &args.report) {
        cf_common::temp::persist(t, std::path::Path::new(p))?;
    }
    Ok(())
}

/// The report: printed as a table on stderr, returned as JSON for --report.
fn report(
    args: &Args,
    sources: &[Source],
    takes: &[plan::Take],
    by_tokens: bool,
) -> Result<serde_json::Value> {
    let tool = "cf-mix";
    let mut rows = Vec::new();
    let (mut total_records, mut total_tokens) = (0usize, Some(0u64));
    for (s, t) in sources.iter().zip(takes) {
        let mut counts = vec![0u32; s.len()];
        for &i in &t.picks {
            counts[i as usize] += 1;
        }
        let max_repeats = counts.iter().copied().max().unwrap_or(0);
        let used = counts.iter().filter(|&&c| c > 0).count();
        let tokens_out = s
            .tokens
            .as_ref()
            .map(|tk| t.picks.iter().map(|&i| tk[i as usize] as u64).sum::<u64>());
        total_records += t.picks.len();
        total_tokens = total_tokens.zip(tokens_out).map(|(a, b)| a + b);
        if t.picks.len() > s.len() {
            args.log.warn(tool, format!(
                "{}: {} records oversampled to {} (each used up to {max_repeats} times); --cap uses each at most once",
                s.spec.label, s.len(), t.picks.len()
            ));
        } else if used < s.len() {
            args.log.info(
                tool,
                format!("{}: {used} of {} records used", s.spec.label, s.len()),
            );
        }
        if s.skipped > 0 {
            args.log.warn(
                tool,
                format!("{}: skipped {} bad records", s.spec.label, s.skipped),
            );
        }
        rows.push(json!({
            "source": s.spec.label,
            "path": s.spec.path,
            "ratio": s.spec.ratio.describe(),
            "target": t.target,
            "records_in": s.len(),
            "tokens_in": s.total_tokens(),
            "records_out": t.picks.len(),
            "tokens_out": tokens_out,
            "distinct_records_out": used,
            "max_repeats": max_repeats,
            "skipped": s.skipped,
        }));
    }
    let report = json!({
        "seed": args.seed,
        "by": if by_tokens { "tokens" } else { "records" },
        "records_out": total_records,
        "tokens_out": total_tokens,
        "sources": rows,
    });
    if !args.log.quiet {
        eprintln!(
            "{tool}: {:<12} {:>10} {:>12} {:>11} {:>12} {:>8}",
            "source", "records in", "tokens in", "records out", "tokens out", "repeats"
        );
        for r in report["sources"].as_array().unwrap() {
            let n = |k: &str| r[k].as_u64().map_or("-".to_string(), |x| x.to_string());
            eprintln!(
                "{tool}: {:<12} {:>10} {:>12} {:>11} {:>12} {:>8}",
                r["source"].as_str().unwrap(),
                n("records_in"),
                n("tokens_in"),
                n("records_out"),
                n("tokens_out"),
                n("max_repeats")
            );
        }
    }
    Ok(report)
}
