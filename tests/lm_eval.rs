//! cf-eval against lm-evaluation-harness 0.4.13's own outputs (fixtures/eval/, made by
//! scripts/make_eval_reference.py with the releases in scripts/requirements.txt).
//!
//! Tolerances: lm-eval runs the fixtures in float32 and cf-eval in f32 with other kernels; a
//! per-token log-probability differs by ~1e-6 (tests/decoder.rs), so a choice of a few tokens
//! stays within 1e-4. A document scored over up to 257 tokens sums ~1,000 nats, which
//! lm-eval adds up in float32 per window (relative rounding ~6e-8 per addition): 1e-5 relative
//! covers both. Accuracies and their standard errors are equal (1e-9) when every prediction is.

use crate::util::*;
use serde_json::{json, Value};

fn reference(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/eval").join(name)).unwrap())
        .unwrap()
}

fn fx_eval(name: &str) -> String {
    root()
        .join("fixtures/eval")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

use crate::eval::eval;

fn close(a: f64, b: f64, tol: f64, what: &str) {
    assert!((a - b).abs() <= tol, "{what}: cf-eval {a} vs lm-eval {b}");
}

fn rel(a: f64, b: f64, what: &str) {
    close(a, b, 1e-5 * b.abs().max(1.0), what);
}

#[test]
fn bos_settings_match_lm_eval() {
    // add_bos_token unset (the tokenizer decides: llama's adds BOS, qwen2's does not), true
    // and false; olmo2's tokenizer adds nothing but has a BOS (= EOS) token that true adds.
    let d = tempfile::tempdir().unwrap();
    let (mc, wino) = (fx_eval("mc.jsonl"), fx_eval("wino.jsonl"));
    for (model, flag, file) in [
        ("llama", None, "reference-llama.json"),
        ("qwen2", None, "reference-qwen2.json"),
        (
            "llama",
            Some("--add-bos-token"),
            "reference-llama-bos-true.json",
        ),
        (
            "llama",
            Some("--add-bos-token=false"),
            "reference-llama-bos-false.json",
        ),
        (
            "olmo2",
            Some("--add-bos-token"),
            "reference-olmo2-bos-true.json",
        ),
    ] {
        let reference = reference(file);
        // One question at a time, and (--batch-size 5) rows of several questions per forward.
        for batch in ["1", "5"] {
            let mut a = vec![
                "--task",
                mc.as_str(),
                "--task",
                wino.as_str(),
                "--batch-size",
                batch,
            ];
            a.extend(flag);
            let (report, samples) = eval(d.path(), model, &a);
            for (task, ours) in [("cf_mc", "mc"), ("cf_wino", "wino")] {
                let want = &reference["tasks"][task];
                let got = &report["results"][ours];
                for k in ["acc", "acc_stderr", "acc_norm", "acc_norm_stderr"] {
                    if want.get(k).is_none() || task == "cf_wino" && k.starts_with("acc_norm") {
                        continue;
                    }
                    let key = format!("{k},none");
                    close(
                        got[&key].as_f64().unwrap(),
                        want[k].as_f64().unwrap(),
                        1e-9,
                        &format!("{file} {task} {key}"),
                    );
                }
                let lls: Vec<&Value> = samples
                    .iter()
                    .filter(|s| s["task"] == ours)
                    .map(|s| &s["loglikelihoods"])
                    .collect();
                assert_eq!(lls.len(), want["loglikelihoods"].as_array().unwrap().len());
                for (doc, (g, w)) in lls
                    .iter()
                    .zip(want["loglikelihoods"].as_array().unwrap())
                    .enumerate()
                {
                    let diff = max_abs_diff(&floats(g), &floats(w));
                    assert!(
                        diff < 1e-4,
                        "{file} {task} doc {doc} (batch {batch}): |Δ| = {diff}"
                    );
                }
            }
        }
    }
}

#[test]
fn inputs_longer_than_the_model_match_lm_eval() {
    // Multiple choice of max−1, max, max+1, max+2, 1.4×max and 2×max+1 tokens (context +
    // continuation; max = 128): lm-eval keeps the last max+1 tokens. Rolling perplexity of
    // documents of the same lengths, with BOS (the tokenizer's default) and without.
    let d = tempfile::tempdir().unwrap();
    let r = reference("reference-long.json");
    for batch in ["1", "4"] {
        let (report, samples) = eval(
            d.path(),
            "llama",
            &["--task", &fx_eval("long_mc.jsonl"), "--batch-size", batch],
        );
        let want = &r["long_mc"]["bos-default"];
        for (doc, (s, w)) in samples
            .iter()
            .zip(want["loglikelihoods"].as_array().unwrap())
            .enumerate()
        {
            let diff = max_abs_diff(&floats(&s["loglikelihoods"]), &floats(w));
            assert!(diff < 1e-4, "long_mc doc {doc}: |Δ| = {diff}");
        }
        close(
            report["results"]["long_mc"]["acc,none"].as_f64().unwrap(),
            want["acc"].as_f64().unwrap(),
            1e-9,
            "long_mc acc",
        );
    }
    // The perplexity documents, as cf-eval's {"text"} layout.
    let pages: String = std::fs::read_to_string(fx_eval("long_ppl.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            json!({"text": v["page"]}).to_string() + "\n"
        })
        .collect();
    std::fs::write(d.path().join("ppl.jsonl"), pages).unwrap();
    for (flag, key, counts) in [
        (None, "bos-default", "default"),
        (Some("--add-bos-token=false"), "bos-false", "false"),
    ] {
        let mut a = vec!["--task", "ppl.jsonl"];
        a.extend(flag);
        let (report, samples) = eval(d.path(), "llama", &a);
        let want = &r["long_ppl"][key];
        for (doc, (s, w)) in samples
            .iter()
            .zip(want["loglikelihoods"].as_array().unwrap())
            .enumerate()
        {
            rel(
                s["loglikelihood"].as_f64().unwrap(),
                w.as_f64().unwrap(),
                &format!("long_ppl {key} doc {doc}"),
            );
            assert_eq!(
                s["tokens"], r["long_ppl"]["token_counts"][counts][doc],
                "tokens of doc {doc} ({key})"
            );
        }
        for m in ["word_perplexity", "byte_perplexity", "bits_per_byte"] {
            let got = report["results"]["ppl"][format!("{m},none")]
                .as_f64()
                .unwrap();
            close(got, want[m].as_f64().unwrap(), 1e-4 * got.abs(), m);
        }
    }
}

#[test]
fn wikitext_matches_lm_eval() {
    // The detokenized page is scored; words and bytes are counted on the original page.
    let d = tempfile::tempdir().unwrap();
    let r = reference("reference-wikitext.json");
    let (report, samples) = eval(
        d.path(),
        "llama",
        &["--task", &format!("wikitext:{}", fx_eval("wikitext.jsonl"))],
    );
    for (i, (s, w)) in samples
        .iter()
        .zip(r["docs"].as_array().unwrap())
        .enumerate()
    {
        rel(
            s["loglikelihood"].as_f64().unwrap(),
            w["loglikelihood"].as_f64().unwrap(),
            &format!("wikitext doc {i}"),
        );
        assert_eq!(s["words"], w["words"], "words of doc {i}");
        assert_eq!(s["bytes"], w["bytes"], "bytes of doc {i}");
        assert_eq!(s["tokens"], w["rolling_tokens"], "tokens of doc {i}");
    }
    let got = &report["results"]["wikitext"];
    for m in ["word_perplexity", "byte_perplexity", "bits_per_byte"] {
        let g = got[format!("{m},none")].as_f64().unwrap();
        close(g, r[m].as_f64().unwrap(), 1e-4 * g.abs(), m);
    }
}

#[test]
fn gsm8k_matches_lm_eval_zero_and_few_shot() {
    // Prompts (few-shot examples drawn by lm-eval's seeded sampler, left-truncated to
    // max_length − max_gen_toks), greedy answers cut at the stop strings, both filters and
    // exact_match, per document and in the task's metrics.
    let d = tempfile::tempdir().unwrap();
    let r = reference("reference-gsm8k.json");
    let (test, train) = (fx_eval("gsm8k_test.jsonl"), fx_eval("gsm8k_train.jsonl"));
    for shots in ["0", "3", "5"] {
        let run_ref = &r["runs"][shots];
        let task = format!("gsm8k:{test}");
        let mut a = vec!["--task", task.as_str(), "--max-tokens", "16"];
        if shots != "0" {
            a.extend(["--num-fewshot", shots, "--fewshot-file", train.as_str()]);
        }
        let (report, samples) = eval(d.path(), "llama", &a);
        for (s, w) in samples.iter().zip(run_ref["docs"].as_array().unwrap()) {
            let doc = &w["doc_id"];
            assert_eq!(s["prompt"], w["prompt"], "{shots}-shot doc {doc}: prompt");
            assert_eq!(s["resps"][0], w["resps"], "{shots}-shot doc {doc}: answer");
            for f in ["strict-match", "flexible-extract"] {
                assert_eq!(
                    s[f][0], w["filtered_resps"][f],
                    "{shots}-shot doc {doc}: {f}"
                );
            }
            assert_eq!(
                s["correct_strict"].as_f64().unwrap(),
                w["exact_match"]["strict-match"].as_f64().unwrap()
            );
            assert_eq!(
                s["correct_flexible"].as_f64().unwrap(),
                w["exact_match"]["flexible-extract"].as_f64().unwrap()
            );
        }
        for (k, v) in run_ref["metrics"].as_object().unwrap() {
            close(
                report["results"]["gsm8k"][k].as_f64().unwrap(),
                v.as_f64().unwrap(),
                1e-12,
                &format!("{shots}-shot {k}"),
            );
        }
        assert_eq!(report["n-shot"]["gsm8k"], shots.parse::<u64>().unwrap());
    }
}

#[test]
fn hellaswag_documents_match_lm_eval() {
    // lm-eval's process_docs (Python's str.capitalize, brackets, [title]) on crafted documents,
    // seen in the requests cf-eval scores.
    let d = tempfile::tempdir().unwrap();
    let r = reference("hellaswag.json");
    let cases: Vec<&Value> = r["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["choices"].as_array().unwrap().iter().all(|x| x != ""))
        .collect();
    let docs: String = cases.iter().map(|c| c["doc"].to_string() + "\n").collect();
    std::fs::write(d.path().join("hs.jsonl"), docs).unwrap();
    let (_, samples) = eval(d.path(), "llama", &["--task", "hellaswag:hs.jsonl"]);
    assert_eq!(samples.len(), cases.len());
    for (s, c) in samples.iter().zip(&cases) {
        let want: Vec<Value> = c["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| json!([c["query"], format!(" {}", x.as_str().unwrap())]))
            .collect();
        assert_eq!(s["requests"], json!(want), "{}", c["doc"]);
        assert_eq!(s["gold"], c["gold"]);
    }
}

#[test]
fn compare_reads_lm_evals_own_results_file() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("cf_mc.jsonl"),
        std::fs::read(fx_eval("mc.jsonl")).unwrap(),
    )
    .unwrap();
    let fx = fixture("llama");
    let before = fx_eval("lm_eval_results.json");
    let r = run(
        "cf-eval",
        &[
            "--model",
            fx.to_str().unwrap(),
            "--task",
            "cf_mc.jsonl",
            "--compare",
            &before,
        ],
        d.path(),
        None,
    );
    assert_eq!(r.code, 0, "{r}");
    let rep: Value = serde_json::from_str(&r.stdout).unwrap();
    let row = rep["compare"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["metric"] == "acc,none")
        .unwrap_or_else(|| panic!("{r}"))
        .clone();
    // The same model and data as lm-eval's run: no change.
    assert_eq!(row["delta"].as_f64(), Some(0.0), "{row}");
    assert!(row["delta_stderr"].as_f64().is_some());
    // No task in common: said, not an empty table.
    let r = run(
        "cf-eval",
        &[
            "--model",
            fx.to_str().unwrap(),
            "--task",
            &fx_eval("mc.jsonl"),
            "--compare",
            &before,
        ],
        d.path(),
        None,
    );
    assert_eq!(r.code, 0, "{r}");
    assert!(r.stderr.contains("no task and metric in common"), "{r}");
}

#[test]
fn report_has_lm_evals_layout_and_keeps_tasks_of_one_name() {
    let d = tempfile::tempdir().unwrap();
    let mc = fx_eval("mc.jsonl");
    let fx = fixture("llama");
    let r = run(
        "cf-eval",
        &[
            "--model",
            fx.to_str().unwrap(),
            "--task",
            &mc,
            "--task",
            &mc,
            "--limit",
            "1",
        ],
        d.path(),
        None,
    );
    assert_eq!(r.code, 0, "{r}");
    let rep: Value = serde_json::from_str(&r.stdout).unwrap();
    for k in [
        "results",
        "configs",
        "versions",
        "n-shot",
        "higher_is_better",
        "n-samples",
    ] {
        assert!(rep.get(k).is_some(), "no {k}");
    }
    let names: Vec<&String> = rep["results"].as_object().unwrap().keys().collect();
    assert_eq!(names, ["mc", "mc_2"]);
    assert!(r.stderr.contains("two tasks are named \"mc\""), "{r}");
    // One document: lm-eval writes "N/A" for a standard error it cannot estimate.
    assert_eq!(rep["results"]["mc"]["acc_stderr,none"], "N/A");
    assert_eq!(rep["higher_is_better"]["mc"]["acc"], true);
    assert_eq!(rep["n-samples"]["mc"]["effective"], 1);
}
