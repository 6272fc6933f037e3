//! cf-sample, through the real binary.

use crate::util::*;
use candle_core::{DType, Device, Tensor};
use cf_common::model::{Mode, Model};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn records(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Two runs drew the same samples: every field equal, except `logprob`, which agrees to float32
/// rounding (candle's matmul blocking depends on the batch shape, ~1e-8 relative observed).
fn assert_same_samples(a: &str, b: &str) {
    let (ra, rb) = (records(a), records(b));
    assert_eq!(ra.len(), rb.len());
    for (x, y) in ra.iter().zip(&rb) {
        let (mut x, mut y) = (x.clone(), y.clone());
        let (lx, ly) = (
            x["logprob"].as_f64().unwrap(),
            y["logprob"].as_f64().unwrap(),
        );
        assert!((lx - ly).abs() <= 1e-6 * lx.abs(), "logprob {lx} vs {ly}");
        x["logprob"] = Value::Null;
        y["logprob"] = Value::Null;
        assert_eq!(x, y);
    }
}

fn sample(model: &str, extra: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture(model);
    let mut args = vec!["--model", m.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = run("cf-sample", &args, dir.path(), None);
    assert_eq!(out.code, 0, "{out}");
    out
}

/// Upper 0.1% point of the chi-square distribution (Wilson–Hilferty; accurate to ~1% here).
fn chi2_crit_001(df: f64) -> f64 {
    let z = 3.090_232;
    df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3)
}

/// Pearson's statistic of observed first tokens against the model's softmax, cells with
/// expected count below 5 pooled.
fn chi2(counts: &[f64], probs: &[f64]) -> (f64, f64) {
    let n: f64 = counts.iter().sum();
    let (mut stat, mut df, mut pool_o, mut pool_e) = (0.0, 0.0, 0.0, 0.0);
    for (o, p) in counts.iter().zip(probs) {
        let e = n * p;
        if e >= 5.0 {
            stat += (o - e) * (o - e) / e;
            df += 1.0;
        } else {
            pool_o += o;
            pool_e += e;
        }
    }
    if pool_e > 0.0 {
        stat += (pool_o - pool_e) * (pool_o - pool_e) / pool_e;
        df += 1.0;
    }
    (stat, df - 1.0)
}

fn first_token_probs(model: &str) -> (u32, Vec<f64>) {
    let m = Model::load(
        fixture(model).to_str().unwrap(),
        DType::F64,
        &Device::Cpu,
        Mode::Infer,
    )
    .unwrap();
    let start = m.tok.document_start().unwrap();
    let logits = m
        .decoder
        .forward(&Tensor::new(&[[start]], &Device::Cpu).unwrap(), None)
        .unwrap();
    let p = candle_nn::ops::softmax(&logits.flatten_all().unwrap(), 0).unwrap();
    (start, p.to_vec1::<f64>().unwrap())
}

/// Pearson's chi-square (and its degrees of freedom) of the first tokens of 6000 olmo samples
/// drawn with `extra` flags, against the model's own next-token softmax after the start token.
fn first_token_chi2(extra: &[&str]) -> (f64, f64) {
    let (_, probs) = first_token_probs("olmo");
    let mut args = vec![
        "-n",
        "6000",
        "--max-tokens",
        "1",
        "--seed",
        "3",
        "--batch-size",
        "500",
        "-q",
    ];
    args.extend_from_slice(extra);
    let out = sample("olmo", &args);
    let mut counts = vec![0.0; probs.len()];
    for r in records(&out.stdout) {
        counts[r["token_ids"][0].as_u64().unwrap() as usize] += 1.0;
    }
    chi2(&counts, &probs)
}

#[test]
fn first_tokens_follow_the_model_softmax() {
    let (stat, df) = first_token_chi2(&[]);
    assert!(df > 20.0, "too few cells: {df}");
    assert!(
        stat < chi2_crit_001(df),
        "chi-square {stat:.1} on {df} df exceeds {:.1}",
        chi2_crit_001(df)
    );

    // The test has power: tempered samples (T = 0.8) fail it.
    let (stat, df) = first_token_chi2(&["--temperature", "0.8"]);
    assert!(
        stat > chi2_crit_001(df),
        "tempered samples passed: {stat:.1} on {df} df"
    );
}

#[test]
fn logprob_equals_the_scorer() {
    for fam in ["llama3", "qwen2"] {
        let out = sample(fam, &["-n", "6", "--max-tokens", "30", "--seed", "5"]);
        let m = Model::load(
            fixture(fam).to_str().unwrap(),
            DType::F32,
            &Device::Cpu,
            Mode::Infer,
        )
        .unwrap();
        for r in records(&out.stdout) {
            let seq: Vec<u32> = ids(&r["prefix_ids"])
                .into_iter()
                .chain(ids(&r["token_ids"]))
                .collect();
            let n_prefix = r["prefix_ids"].as_array().unwrap().len();
            let lp = m
                .decoder
                .sequence_logprobs(
                    &Tensor::new(seq.as_slice(), &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                )
                .unwrap();
            let lp: Vec<f32> = lp.squeeze(0).unwrap().to_vec1().unwrap();
            let scored: f64 = lp[n_prefix - 1..].iter().map(|&x| x as f64).sum();
            let got = r["logprob"].as_f64().unwrap();
            assert!(
                (got - scored).abs() < 1e-3,
                "{fam}: sample logprob {got} vs scorer {scored}"
            );
            assert_eq!(
                r["n_tokens"].as_u64().unwrap() as usize,
                r["token_ids"].as_array().unwrap().len()
            );
        }
    }
}

#[test]
fn temperature_zero_is_transformers_greedy() {
    for fam in FAMILIES {
        let r = reference(fam);
        let want = ids(&r["greedy"]["tokens"]);
        let out = sample(
            fam,
            &[
                "-n",
                "2",
                "--max-tokens",
                &want.len().to_string(),
                "--temperature",
                "0",
            ],
        );
        for rec in records(&out.stdout) {
            let got = ids(&rec["token_ids"]);
            // cf-sample stops at EOS; the reference does not.
            assert_eq!(got, want[..got.len()], "{fam}");
            assert_eq!(
                rec["prefix_ids"], r["greedy"]["prefix"],
                "{fam}: start token"
            );
        }
    }
}

#[test]
fn same_seed_same_bytes_whatever_the_batch_size() {
    let a = sample(
        "llama",
        &[
            "-n",
            "12",
            "--max-tokens",
            "20",
            "--seed",
            "9",
            "--batch-size",
            "1",
            "-q",
        ],
    );
    let b = sample(
        "llama",
        &[
            "-n",
            "12",
            "--max-tokens",
            "20",
            "--seed",
            "9",
            "--batch-size",
            "5",
            "-q",
        ],
    );
    let c = sample(
        "llama",
        &[
            "-n",
            "12",
            "--max-tokens",
            "20",
            "--seed",
            "9",
            "--batch-size",
            "64",
            "-q",
        ],
    );
    assert_same_samples(&a.stdout, &b.stdout);
    assert_same_samples(&a.stdout, &c.stdout);
    let again = sample(
        "llama",
        &[
            "-n",
            "12",
            "--max-tokens",
            "20",
            "--seed",
            "9",
            "--batch-size",
            "5",
            "-q",
        ],
    );
    assert_eq!(b.stdout, again.stdout, "same flags, same bytes");
    let d = sample(
        "llama",
        &["-n", "12", "--max-tokens", "20", "--seed", "10", "-q"],
    );
    assert_ne!(
        a.stdout, d.stdout,
        "a different seed must give different samples"
    );
    let idx: Vec<u64> = records(&a.stdout)
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, (0..12).collect::<Vec<_>>());
}

#[test]
fn shards_concatenate_to_the_unsharded_output() {
    let whole = sample(
        "olmo2",
        &["-n", "10", "--max-tokens", "16", "--seed", "2", "-q"],
    )
    .stdout;
    let parts: String = (1..=3)
        .map(|k| {
            sample(
                "olmo2",
                &[
                    "-n",
                    "10",
                    "--max-tokens",
                    "16",
                    "--seed",
                    "2",
                    "-q",
                    "--shard",
                    &format!("{k}/3"),
                    "--batch-size",
                    "2",
                ],
            )
            .stdout
        })
        .collect();
    assert_same_samples(&whole, &parts);
}

#[test]
fn jsonl_and_parquet_outputs_carry_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture("qwen2");
    let base = [
        "--model",
        m.to_str().unwrap(),
        "-n",
        "5",
        "--max-tokens",
        "12",
        "--seed",
        "4",
        "-q",
    ];
    for out in ["s.jsonl", "s.parquet"] {
        let mut a = base.to_vec();
        a.extend(["-o", out]);
        let r = run("cf-sample", &a, dir.path(), None);
        assert_eq!(r.code, 0, "{r}");
        assert!(r.stdout.is_empty(), "data went to stdout with -o");
    }
    let read = |f: &str| -> Vec<cf_common::record::Record> {
        cf_common::record::open(
            Some(dir.path().join(f).to_str().unwrap()),
            Default::default(),
        )
        .unwrap()
        .map(|x| x.unwrap().1)
        .collect()
    };
    let (j, p) = (read("s.jsonl"), read("s.parquet"));
    assert_eq!(j.len(), 5);
    for (a, b) in j.iter().zip(&p) {
        for k in [
            "text",
            "token_ids",
            "prefix_ids",
            "finish_reason",
            "index",
            "model",
            "top_p",
        ] {
            assert_eq!(a[k], b[k], "field {k}");
        }
        assert_eq!(a["logprob"].as_f64(), b["logprob"].as_f64());
    }
    // stdin sniffing: the Parquet file read from a pipe is recognised by its magic bytes.
    let bytes = std::fs::read(dir.path().join("s.parquet")).unwrap();
    assert_eq!(&bytes[..4], b"PAR1");
}

#[test]
fn a_closed_pipe_exits_quietly() {
    let m = fixture("llama");
    let mut child = Command::new(bin("cf-sample"))
        .args([
            "--model",
            m.to_str().unwrap(),
            "-n",
            "100000",
            "--max-tokens",
            "64",
            "-q",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // The reader is dropped here: what `| head -1` does.
    let out = child.wait_with_output().unwrap();
    assert!(line.starts_with("{\"text\""));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

#[test]
fn bad_flags_fail_fast_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture("llama");
    let m = m.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &["--model", m, "--top-p", "2"],
            "--top-p must be in (0, 1], got 2",
        ),
        (
            &["--model", m, "--shard", "3/2"],
            "--shard 3/2: expected K/N with 1 <= K <= N",
        ),
        (
            &["--model", m, "--prefix-ids", "1,99999"],
            "--prefix-ids: id 99999 is outside the vocabulary (0..336)",
        ),
        (
            &["--model", m, "--max-tokens", "500"],
            "a prefix of 1 tokens plus --max-tokens 500 exceeds the model's 128 positions",
        ),
        (
            &["--model", m, "-o", "x.txt"],
            "x.txt: cannot tell the format from the extension",
        ),
        (&["--model", m, "--chat"], "the model has no chat template"),
    ];
    for (args, msg) in cases {
        let r = run("cf-sample", args, dir.path(), None);
        assert_eq!(r.code, 2, "{r}");
        assert_eq!(r.stderr.lines().count(), 1, "{r}");
        assert!(
            r.stderr.starts_with("cf-sample: error: ") && r.stderr.contains(msg),
            "{r}"
        );
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "a failed run left files"
    );
}

#[test]
fn tempered_sampling_warns() {
    let r = sample("llama", &["-n", "1", "--max-tokens", "2", "--top-k", "5"]);
    assert!(
        r.stderr.contains("warning: tempered or truncated sampling"),
        "{r}"
    );
    let r = sample("llama", &["-n", "1", "--max-tokens", "2"]);
    assert!(!r.stderr.contains("warning"), "{r}");
}

#[test]
fn prefixes_chat_and_prompts() {
    let m = Model::load(
        fixture("qwen2").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
        Mode::Infer,
    )
    .unwrap();
    // --prefix: after the document-start token (EOS for this model, which has no BOS).
    let r = records(
        &sample(
            "qwen2",
            &["-n", "1", "--max-tokens", "3", "--prefix", "Question:"],
        )
        .stdout,
    );
    let want: Vec<u32> = std::iter::once(m.tok.eos_id.unwrap())
        .chain(m.tok.encode("Question:", false).unwrap())
        .collect();
    assert_eq!(ids(&r[0]["prefix_ids"]), want);
    assert_eq!(r[0]["prefix"], "text");
    // --chat: the ChatML opening of a user turn.
    let r = records(&sample("qwen2", &["-n", "1", "--max-tokens", "3", "--chat"]).stdout);
    assert_eq!(
        ids(&r[0]["prefix_ids"]),
        m.tok.encode("<|im_start|>user\n", false).unwrap()
    );
    // --prompts: text and messages; prompt fields pass through; n samples per prompt.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.jsonl"),
        "{\"prompt\": \"Fact 3:\", \"id\": \"a\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"id\": \"b\"}\n",
    )
    .unwrap();
    let fx = fixture("qwen2");
    let out = run(
        "cf-sample",
        &[
            "--model",
            fx.to_str().unwrap(),
            "--prompts",
            "p.jsonl",
            "-n",
            "2",
            "--max-tokens",
            "4",
            "-q",
        ],
        dir.path(),
        None,
    );
    assert_eq!(out.code, 0, "{out}");
    let r = records(&out.stdout);
    assert_eq!(r.len(), 4);
    assert_eq!(
        r.iter()
            .map(|x| x["id"].as_str().unwrap())
            .collect::<String>(),
        "aabb"
    );
    let chat = m
        .tok
        .encode(
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
            false,
        )
        .unwrap();
    assert_eq!(ids(&r[2]["prefix_ids"]), chat);
    assert_eq!(r[2]["prefix"], "prompt");
    // A prompt record without a prompt is named by file and line.
    std::fs::write(
        dir.path().join("bad.jsonl"),
        "{\"prompt\": \"x\"}\n{\"question\": \"y\"}\n",
    )
    .unwrap();
    let out = run(
        "cf-sample",
        &["--model", fx.to_str().unwrap(), "--prompts", "bad.jsonl"],
        dir.path(),
        None,
    );
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("bad.jsonl:2: no prompt"), "{out}");
}

#[test]
fn shard_auto_takes_the_part_from_the_scheduler() {
    // A Slurm job array (ids 3..=6, so task 5 is part 3 of 4) and a Kubernetes Indexed Job
    // (index 2 of 4 completions) give the same bytes as --shard 3/4; with no scheduler it is a
    // one-line error.
    let d = tempfile::tempdir().unwrap();
    let fx = fixture("llama");
    let base = [
        "--model",
        fx.to_str().unwrap(),
        "-n",
        "8",
        "--max-tokens",
        "4",
        "--seed",
        "5",
        "-q",
    ];
    let with = |shard: &str, env: &[(&str, &str)]| {
        let mut a = base.to_vec();
        a.extend(["--shard", shard]);
        run_env("cf-sample", &a, d.path(), None, env)
    };
    let want = with("3/4", &[]);
    assert_eq!(want.code, 0, "{want}");
    assert_eq!(want.stdout.lines().count(), 2);
    let slurm = with(
        "auto",
        &[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ],
    );
    assert_eq!(slurm.stdout, want.stdout, "{slurm}");
    let k8s = with(
        "auto",
        &[("JOB_COMPLETION_INDEX", "2"), ("CF_SHARD_COUNT", "4")],
    );
    assert_eq!(k8s.stdout, want.stdout, "{k8s}");
    let none = with("auto", &[]);
    assert_eq!(none.code, 2);
    assert!(none.stderr.contains("--shard auto: no scheduler"), "{none}");
    let half = with("auto", &[("JOB_COMPLETION_INDEX", "2")]);
    assert!(half.stderr.contains("CF_SHARD_COUNT"), "{half}");
    // The sampling preset is shared with cf-eval and checked before loading.
    let r = run(
        "cf-sample",
        &[
            "--model",
            "no-such-model",
            "--sampling",
            "r1",
            "--top-p",
            "2",
        ],
        d.path(),
        None,
    );
    assert!(r.stderr.contains("--top-p"), "{r}");
}

/// The device sampler (what runs on a GPU) draws the host sampler's token from the same
/// stream, and gives the same untempered log-probability, for every sampling mode, vocabulary
/// sizes on and off its 256-id blocks, flat and peaked rows, tied maxima and rows full of ties
/// at the top-k/top-p cuts (both keep every tied token there). Run here on CPU
/// tensors: the same candle operations run on CUDA. Tolerance: both compute in f64 from the
/// same f32 logits, so log-probs agree to 1e-12 and a token could differ only for a uniform
/// within rounding of a CDF boundary (never seen in these 12,000 draws).
#[test]
fn the_device_sampler_draws_what_the_host_sampler_draws() {
    use cf_common::generate::{draw_on_device, sample_rng, SamplingParams};
    use rand_chacha::rand_core::RngCore;
    let base = sampling(1.0);
    let modes = [
        base.clone(),
        sampling(0.0),
        sampling(0.7),
        SamplingParams {
            top_k: Some(5),
            ..base.clone()
        },
        SamplingParams {
            top_p: Some(0.5),
            ..base.clone()
        },
        SamplingParams {
            min_p: Some(0.1),
            ..base.clone()
        },
        SamplingParams {
            temperature: 1.3,
            top_k: Some(50),
            top_p: Some(0.9),
            min_p: Some(0.02),
            ..base.clone()
        },
        SamplingParams {
            top_k: Some(1),
            ..sampling(0.5)
        },
    ];
    let mut draws = 0;
    for (vocab, scale) in [(100usize, 1.0f32), (1000, 4.0), (4096, 12.0)] {
        let rows = 32;
        let mut g = sample_rng(11, vocab as u64);
        let mut logits: Vec<f32> = (0..rows * vocab)
            .map(|_| (g.next_u32() as f32 / u32::MAX as f32 - 0.5) * scale)
            .collect();
        // Row 0: a tied maximum at ids 3 and 7 (greedy takes the first). Rows 1–4: logits on a
        // grid of 0.25, as bf16 logits near 20 are on one of 0.125: many ties at every cut.
        logits[3] = 50.0;
        logits[7] = 50.0;
        for x in &mut logits[vocab..5 * vocab] {
            *x = (*x * 4.0).round() / 4.0;
        }
        let t = Tensor::from_slice(&logits, (rows, vocab), &Device::Cpu).unwrap();
        for p in &modes {
            for round in 0..((12_000 / 3 / modes.len()) / rows) as u64 {
                let got = device_draws_match_host(&t, &logits, p, round, 1e-12);
                if p.temperature == 0.0 {
                    assert_eq!(got[0], 3, "greedy takes the first of tied maxima");
                }
                draws += rows;
            }
        }
    }
    assert!(draws >= 10_000);
    let bad = Tensor::new(&[[0.0f32, f32::NAN], [0.0, 1.0]], &Device::Cpu).unwrap();
    for p in [base, sampling(0.0)] {
        let mut r = [sample_rng(0, 0), sample_rng(0, 1)];
        let e = draw_on_device(&bad, r.iter_mut().collect(), &p).unwrap_err();
        assert!(e.to_string().contains("non-finite"), "{e}");
    }
}
