//! cf-eval: measure what was kept and what was learned.

mod extract;
mod lmeval;
mod run;
mod score;
mod tasks;

use anyhow::Result;
use cf_common::cli::{LogArgs, ModelArgs};
use clap::Parser;
use std::process::ExitCode;

/// Evaluate a model the way lm-evaluation-harness does (zero-shot), on task files you have.
///
/// Follows lm-evaluation-harness 0.4.13 (HF backend): multiple choice by log-likelihood
/// (acc, acc_norm by character length, their standard errors; lm-eval's context/continuation
/// split, " " target delimiter, BOS as --add-bos-token says, inputs longer than the model cut
/// from the left), Winogrande-style partial scoring, perplexity in lm-eval's rolling windows
/// (word and byte perplexity, bits per byte), and generative tasks (greedy or sampled; prompts
/// cut to the model's length less --max-tokens; lm-eval's gsm8k filters strict-match and
/// flexible-extract with its exact_match, and cf's own cf-extract: \boxed{}, else #### n, else
/// the last number, compared by value, which pass@k and maj@k use). The math500 preset is
/// cf's own (the problem as the prompt, cf-extract), not lm-eval's minerva_math500. A task file is JSONL or Parquet: {"context", "choices", "gold"} by default (see the
/// --*-field flags), {"contexts", "continuation", "gold"}, {"text"}, or {"prompt", "answer"};
/// --preset maps the published layouts of arc_easy, arc_challenge, hellaswag, piqa, sciq,
/// openbookqa, boolq, copa, winogrande, gsm8k, math500 and wikitext. The report (JSON, shaped
/// in lm-eval's layout: "acc,none", "acc_stderr,none", "exact_match,strict-match", n-samples,
/// higher_is_better, configs, versions) goes to stdout or -o.
///
/// Examples:
///   cf-eval --model M --task arc_easy:ARC-Easy-test.parquet --task piqa:valid.parquet -o before.json
///   cf-eval --model ft/ --task arc_easy:ARC-Easy-test.parquet --compare before.json
///   cf-eval --model R1 --task gsm8k:test.parquet --chat --sampling r1 -n 8 --max-tokens 4096
///   cf-eval --model M --task mc.jsonl --log-samples s.jsonl | jq .results
#[derive(Parser, Debug)]
#[command(
    name = "cf-eval",
    version,
    verbatim_doc_comment,
    allow_negative_numbers = true
)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// A task: [PRESET:]FILE, or FILE with --preset. Repeat for several (they share the model).
    #[arg(long = "task", required = true, value_name = "[PRESET:]FILE")]
    pub tasks: Vec<String>,

    /// Preset for tasks given without one.
    #[arg(long)]
    pub preset: Option<String>,

    /// Field holding the context, for multiple-choice records without a preset.
    #[arg(long, default_value = "context")]
    pub context_field: String,

    /// Field holding the list of choices.
    #[arg(long, default_value = "choices")]
    pub choices_field: String,

    /// Field holding the gold choice (an index, or the choice's text).
    #[arg(long, default_value = "gold")]
    pub gold_field: String,

    /// Put between the context and each choice (lm-eval's target_delimiter).
    #[arg(long, default_value = " ")]
    pub target_delimiter: String,

    /// lm-eval's add_bos_token. Unset (the default since lm-eval 0.4.10): the tokenizer
    /// decides (tokenizer.json's post-processor; Llama-3 adds BOS, OLMo and Qwen do not).
    /// `--add-bos-token` (=true): BOS before every context, prompt and document, where the
    /// tokenizer has one. `--add-bos-token=false`: never. A text that already starts with the
    /// BOS text gets no second one; an empty context is the BOS (else EOS) token. Perplexity
    /// scores the document as the tokenizer encodes it after lm-eval's prefix token, so with a
    /// BOS-adding tokenizer the first window is [BOS, BOS, …] and log p(BOS | BOS) counts, as
    /// in lm-eval.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub add_bos_token: Option<bool>,

    /// Few-shot examples per document for generative tasks, chosen and laid out as lm-eval
    /// does (its sampler seeded 1234; "Q A\n\n" before the question; with --chat as earlier
    /// turns). lm-eval's gsm8k is 5-shot from its train split: --num-fewshot 5
    /// --fewshot-file train.parquet.
    #[arg(long, default_value_t = 0)]
    pub num_fewshot: usize,

    /// The task's few-shot split (same layout and preset as the task).
    #[arg(long, value_name = "FILE")]
    pub fewshot_file: Option<String>,

    /// Evaluate only the first N documents of each task.
    #[arg(long)]
    pub limit: Option<usize>,

    /// Score up to N (context, choice) rows in one forward pass, across questions (lm-eval's
    /// --batch_size; the fastest N depends on the model and device). 1: one question at a time,
    /// its context computed once for all its choices. Generative tasks decode up to max(N, -n)
    /// answers together, across questions; a finished answer's place goes to the next one.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,

    /// Generative tasks: answers per problem (pass@1 is their mean; pass@k and maj@k use them).
    #[arg(short = 'n', long = "num-samples", default_value_t = 1)]
    pub n: usize,

    /// Generative tasks: sampling (greedy by default, as lm-eval).
    #[command(flatten)]
    pub sampling: cf_common::cli::SamplingArgs,

    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,

    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Generative tasks: prompt through the chat template as a user turn.
    #[arg(long)]
    pub chat: bool,

    /// Generative tasks: text put after the prompt (e.g. $'<think>\n' for a thinking model).
    #[arg(long)]
    pub prefix: Option<String>,

    /// Generative tasks: cut answers at this text (repeatable; gsm8k's preset stops at "Question:").
    #[arg(long)]
    pub stop: Vec<String>,

    /// Write every document's requests, scores and answers to FILE (.jsonl or .parquet).
    #[arg(long, value_name = "FILE")]
    pub log_samples: Option<String>,

    /// A report from before fine-tuning: print and record the before/after table.
    #[arg(long, value_name = "FILE")]
    pub compare: Option<String>,

    /// Write the report here instead of stdout.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<String>,

    #[command(flatten)]
    pub log: LogArgs,
}

fn main() -> ExitCode {
    cf_common::exit::run_main("cf-eval", || -> Result<()> {
        run::run(&cf_common::exit::parse::<Args>()?)
    })
}
