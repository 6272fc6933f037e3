//! cf-eval, through the real binary.

use crate::util::*;
use serde_json::{json, Value};
use std::path::Path;

/// Run cf-eval on a fixture model with --log-samples: the report and the samples.
pub fn eval(dir: &Path, model: &str, args: &[&str]) -> (Value, Vec<Value>) {
    let m = fixture(model);
    let mut a = vec![
        "--model",
        m.to_str().unwrap(),
        "--log-samples",
        "samples.jsonl",
        "-q",
    ];
    a.extend_from_slice(args);
    let r = run("cf-eval", &a, dir, None);
    assert_eq!(r.code, 0, "{r}");
    let samples = std::fs::read_to_string(dir.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (serde_json::from_str(&r.stdout).unwrap(), samples)
}

#[test]
fn perplexity_is_the_rolling_loglikelihood() {
    let d = tempfile::tempdir().unwrap();
    let texts = [
        "The cat sees the moon.",
        "Question: what is 2 plus 2? Answer: 4.\n\nFact 3: the sea  is old.",
    ];
    std::fs::write(
        d.path().join("wiki.jsonl"),
        texts
            .iter()
            .map(|t| json!({"text": t}).to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let (report, samples) = eval(d.path(), "olmo", &["--task", "wiki.jsonl"]);
    let r = &report["results"]["wiki"];
    // The same sums from cf-kl: each text's tokens after the document-start token.
    let m = cf_common::model::Model::load(
        fixture("olmo").to_str().unwrap(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        cf_common::model::Mode::Infer,
    )
    .unwrap();
    let recs: String = texts.iter().map(|t| json!({"prefix_ids": [m.tok.document_start().unwrap()], "token_ids": m.tok.encode(t, false).unwrap()}).to_string() + "\n").collect();
    let fx = fixture("olmo");
    let k = run(
        "cf-kl",
        &[
            "--base",
            fx.to_str().unwrap(),
            "--model",
            fx.to_str().unwrap(),
            "--per-record",
            "-",
            "-q",
        ],
        d.path(),
        Some(recs.as_bytes()),
    );
    let want: Vec<f64> = k
        .stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["logprob_model"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let got: Vec<f64> = samples
        .iter()
        .map(|s| s["loglikelihood"].as_f64().unwrap())
        .collect();
    assert!(max_abs_diff(&got, &want) < 1e-4);
    let ll: f64 = want.iter().sum();
    let bytes: usize = texts.iter().map(|t| t.len()).sum();
    // Words as Python's len(re.split(r"\s+", t)): 5 and 14.
    let words = 5 + 14;
    let close = |k: &str, v: f64| {
        assert!(
            (r[k].as_f64().unwrap() - v).abs() < 1e-6 * v.abs().max(1.0),
            "{k}: {} vs {v}",
            r[k]
        )
    };
    close(
        "bits_per_byte,none",
        -ll / (bytes as f64 * std::f64::consts::LN_2),
    );
    close("word_perplexity,none", (-ll / words as f64).exp());
    close("byte_perplexity,none", (-ll / bytes as f64).exp());
    assert_eq!(r["word_perplexity_stderr,none"], "N/A");
}

#[test]
fn presets_build_lm_eval_prompts() {
    let d = tempfile::tempdir().unwrap();
    let write =
        |name: &str, v: Value| std::fs::write(d.path().join(name), v.to_string() + "\n").unwrap();
    write(
        "arc.jsonl",
        json!({"question": "Which is a fruit?", "choices": {"text": ["apple", "rock"], "label": ["A", "B"]}, "answerKey": "A"}),
    );
    write(
        "hs.jsonl",
        json!({"activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he [header] then", "endings": ["cries [title] a lot", "sings a [b] c [unclosed d"], "label": "0"}),
    );
    write(
        "copa.jsonl",
        json!({"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He sang.", "question": "cause", "label": 0}),
    );
    write(
        "wg.jsonl",
        json!({"sentence": "The cat chased the dog because _ was fast.", "option1": "the cat", "option2": "the dog", "answer": "2"}),
    );
    write(
        "boolq.jsonl",
        json!({"passage": "Cats are mammals.", "question": "are cats mammals", "label": true}),
    );
    write(
        "sciq.jsonl",
        json!({"support": "  Water boils at 100 C.", "question": "When does water boil?", "distractor1": "0 C", "distractor2": "50 C", "distractor3": "10 C", "correct_answer": "100 C"}),
    );
    let (_, s) = eval(
        d.path(),
        "llama",
        &[
            "--task",
            "arc_easy:arc.jsonl",
            "--task",
            "hellaswag:hs.jsonl",
            "--task",
            "copa:copa.jsonl",
            "--task",
            "winogrande:wg.jsonl",
            "--task",
            "boolq:boolq.jsonl",
            "--task",
            "sciq:sciq.jsonl",
        ],
    );
    let req =
        |task: &str| -> Value { s.iter().find(|x| x["task"] == task).unwrap()["requests"].clone() };
    assert_eq!(
        req("arc_easy"),
        json!([
            ["Question: Which is a fruit?\nAnswer:", " apple"],
            ["Question: Which is a fruit?\nAnswer:", " rock"]
        ])
    );
    assert_eq!(
        req("hellaswag"),
        json!([
            ["Cooking: A man cuts onions. He then", " cries. a lot"],
            [
                "Cooking: A man cuts onions. He then",
                " sings a c [unclosed d"
            ]
        ])
    );
    assert_eq!(
        req("copa"),
        json!([
            ["The man fell because", "  he slipped."],
            ["The man fell because", "  he sang."]
        ])
    );
    assert_eq!(
        req("winogrande"),
        json!([
            ["The cat chased the dog because the cat", " was fast."],
            ["The cat chased the dog because the dog", " was fast."]
        ])
    );
    assert_eq!(
        req("boolq")[1],
        json!([
            "Cats are mammals.\nQuestion: are cats mammals?\nAnswer:",
            " yes"
        ])
    );
    assert_eq!(
        req("sciq")[3],
        json!([
            "Water boils at 100 C.\nQuestion: When does water boil?\nAnswer:",
            " 100 C"
        ])
    );
    assert_eq!(
        s.iter().find(|x| x["task"] == "winogrande").unwrap()["gold"],
        1
    );
    assert_eq!(s.iter().find(|x| x["task"] == "boolq").unwrap()["gold"], 1);
}

#[test]
fn generative_scores_follow_their_samples() {
    let d = tempfile::tempdir().unwrap();
    let rows = [
        ("What is 2 plus 2?", "4"),
        ("What is 3 plus 4?", "7"),
        ("Fact 3:", "3"),
    ];
    std::fs::write(
        d.path().join("g.jsonl"),
        rows.iter()
            .map(|(q, a)| json!({"question": q, "answer": format!("#### {a}")}).to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let flags = [
        "--task",
        "gsm8k:g.jsonl",
        "-n",
        "4",
        "--temperature",
        "1",
        "--max-tokens",
        "12",
        "--seed",
        "3",
    ];
    let (report, samples) = eval(d.path(), "olmo", &flags);
    // Answers decoded 7 at a time across documents (continuous batching) are the same answers.
    let (report7, samples7) = eval(
        d.path(),
        "olmo",
        &[&flags[..], &["--batch-size", "7"]].concat(),
    );
    assert_eq!(samples.len(), samples7.len());
    for (a, b) in samples.iter().zip(&samples7) {
        assert_eq!(a["resps"], b["resps"], "--batch-size 7 changed an answer");
    }
    assert_eq!(report["results"], report7["results"]);
    let r = &report["results"]["gsm8k"];
    let n = 4usize;
    let count = |k: &str| -> Vec<usize> {
        samples
            .iter()
            .map(|s| s[k].as_u64().unwrap() as usize)
            .collect()
    };
    let cs = count("correct_cf");
    let mean = |cs: &[usize], f: &dyn Fn(usize) -> f64| {
        cs.iter().map(|&c| f(c)).sum::<f64>() / cs.len() as f64
    };
    for (metric, k) in [
        ("exact_match,flexible-extract", "correct_flexible"),
        ("exact_match,strict-match", "correct_strict"),
        ("exact_match,cf-extract", "correct_cf"),
    ] {
        let want = mean(&count(k), &|c| c as f64 / n as f64);
        assert!(
            (r[metric].as_f64().unwrap() - want).abs() < 1e-12,
            "{metric}"
        );
    }
    for k in [1usize, 2, 4] {
        let want = mean(&cs, &|c| {
            if n - c < k {
                1.0
            } else {
                1.0 - ((n - c + 1)..=n)
                    .map(|i| 1.0 - k as f64 / i as f64)
                    .product::<f64>()
            }
        });
        assert!(
            (r[format!("pass@{k},cf-extract")].as_f64().unwrap() - want).abs() < 1e-12,
            "pass@{k}"
        );
    }
    // The prompt is lm-eval's gsm8k zero-shot format; the target is the whole answer.
    assert_eq!(samples[0]["prompt"], "Question: What is 2 plus 2?\nAnswer:");
    assert_eq!(samples[1]["target"], "#### 7");
    assert_eq!(samples[0]["resps"].as_array().unwrap().len(), 4);
    // Greedy answers are cf-sample's greedy continuations of the same prompt.
    let (_, g) = eval(
        d.path(),
        "olmo",
        &[
            "--task",
            "gsm8k:g.jsonl",
            "--max-tokens",
            "6",
            "--stop",
            "\u{1}",
        ],
    );
    let fx = fixture("olmo");
    let m = cf_common::model::Model::load(
        fx.to_str().unwrap(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        cf_common::model::Mode::Infer,
    )
    .unwrap();
    let prompt = m
        .tok
        .encode("Question: What is 2 plus 2?\nAnswer:", false)
        .unwrap();
    let ids_s = prompt
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let s = run(
        "cf-sample",
        &[
            "--model",
            fx.to_str().unwrap(),
            "--prefix-ids",
            &ids_s,
            "--temperature",
            "0",
            "--max-tokens",
            "6",
            "-q",
        ],
        d.path(),
        None,
    );
    let rec: Value = serde_json::from_str(s.stdout.lines().next().unwrap()).unwrap();
    let toks: Vec<u32> = ids(&rec["token_ids"])
        .into_iter()
        .filter(|t| !m.eos_ids.contains(t))
        .collect();
    assert_eq!(
        g[0]["resps"][0].as_str().unwrap(),
        m.tok.decode(&toks, true).unwrap()
    );
}

#[test]
fn compare_reports_the_change() {
    let d = tempfile::tempdir().unwrap();
    let mc = root().join("fixtures/eval/mc.jsonl");
    let fx = fixture("llama");
    let ft = perturbed_model("llama", d.path(), 0.05, 1);
    let r = run(
        "cf-eval",
        &[
            "--model",
            fx.to_str().unwrap(),
            "--task",
            mc.to_str().unwrap(),
            "-o",
            "before.json",
            "-q",
        ],
        d.path(),
        None,
    );
    assert_eq!(r.code, 0, "{r}");
    let r = run(
        "cf-eval",
        &[
            "--model",
            ft.to_str().unwrap(),
            "--task",
            mc.to_str().unwrap(),
            "--compare",
            "before.json",
        ],
        d.path(),
        None,
    );
    assert_eq!(r.code, 0, "{r}");
    let rep: Value = serde_json::from_str(&r.stdout).unwrap();
    let before: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("before.json")).unwrap())
            .unwrap();
    let row = rep["compare"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["metric"] == "acc,none")
        .unwrap()
        .clone();
    assert_eq!(row["before"], before["results"]["mc"]["acc,none"]);
    assert_eq!(row["after"], rep["results"]["mc"]["acc,none"]);
    assert!(
        (row["delta"].as_f64().unwrap()
            - (row["after"].as_f64().unwrap() - row["before"].as_f64().unwrap()))
        .abs()
            < 1e-12
    );
    assert!(
        r.stderr
            .contains("mean change in acc over 1 multiple-choice tasks"),
        "{r}"
    );
}

#[test]
fn bad_task_files_are_named() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("bad.jsonl"), "{\"context\": \"a\", \"choices\": [\"x\", \"y\"], \"gold\": 0}\n{\"context\": \"b\", \"choices\": [\"x\"], \"gold\": 3}\n").unwrap();
    let fx = fixture("llama");
    let r = run(
        "cf-eval",
        &["--model", fx.to_str().unwrap(), "--task", "bad.jsonl"],
        d.path(),
        None,
    );
    assert_eq!(r.code, 2);
    assert_eq!(
        r.stderr.trim(),
        "cf-eval: error: bad.jsonl:2: gold 3 is not among the 1 choices"
    );
    let r = run(
        "cf-eval",
        &[
            "--model",
            fx.to_str().unwrap(),
            "--task",
            "bad.jsonl",
            "--preset",
            "mmlu",
        ],
        d.path(),
        None,
    );
    assert!(r.stderr.contains("--preset mmlu: unknown"), "{r}");
    std::fs::write(d.path().join("q.jsonl"), "{\"foo\": 1}\n").unwrap();
    let r = run(
        "cf-eval",
        &["--model", fx.to_str().unwrap(), "--task", "q.jsonl"],
        d.path(),
        None,
    );
    assert!(r.stderr.contains("q.jsonl:1: cannot tell the task"), "{r}");
}

#[test]
fn copa_premises_ending_in_multibyte_characters() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("c.jsonl"), json!({"premise": "L'homme est tombé…", "choice1": "Il a glissé.", "choice2": "Il a chanté.", "question": "cause", "label": 0}).to_string() + "\n").unwrap();
    let (_, s) = eval(d.path(), "llama", &["--task", "copa:c.jsonl"]);
    assert_eq!(
        s[0]["requests"][0],
        json!(["L'homme est tombé because", "  il a glissé."])
    );
}
