//! Issue 16: a LoRA adapter is a model for every tool, cf-merge (adapters and WiSE-FT), and
//! --l2-init.

use crate::util::*;
use candle_core::DType;
use serde_json::Value;
use std::path::Path;

fn ok(r: Run) -> Run {
    assert_eq!(r.code, 0, "{r}");
    r
}

/// A LoRA adapter trained on the llama fixture, and its merged model.
fn adapter(dir: &Path) {
    text_data(dir, 6);
    let fx = fixture("llama");
    ok(run(
        "cf-train",
        &[
            "--model",
            fx.to_str().unwrap(),
            "d.jsonl",
            "-o",
            "lo",
            "--lora-rank",
            "4",
            "--lora-targets",
            "all",
            "--lr",
            "2e-2",
            "--max-steps",
            "5",
            "--merge",
            "-q",
        ],
        dir,
        None,
    ));
}

fn kl(dir: &Path, base: &[&str], model: &[&str]) -> Value {
    let fx = fixture("llama");
    let recs = "{\"prefix_ids\": [1], \"token_ids\": [292, 33, 290, 269, 228, 25, 294]}\n{\"prefix_ids\": [1], \"token_ids\": [299, 303, 270]}\n";
    std::fs::write(dir.join("r.jsonl"), recs).unwrap();
    let mut a = vec!["r.jsonl", "-q"];
    let b: Vec<&str> = base
        .iter()
        .map(|s| if *s == "FX" { fx.to_str().unwrap() } else { s })
        .collect();
    let m: Vec<&str> = model
        .iter()
        .map(|s| if *s == "FX" { fx.to_str().unwrap() } else { s })
        .collect();
    a.extend(b);
    a.extend(m);
    serde_json::from_str(&ok(run("cf-kl", &a, dir, None)).stdout).unwrap()
}

#[test]
fn an_adapter_is_a_model_for_every_tool() {
    let d = tempfile::tempdir().unwrap();
    adapter(d.path());
    // The adapter folder scores as its merged model (f32 rounding: W + s·B·A formed once, or
    // x·Aᵀ·Bᵀ·s added per token), and --model BASE --adapter DIR is the same model.
    let k = kl(d.path(), &["--base", "lo/merged"], &["--model", "lo"]);
    assert!(k["kl_token"].as_f64().unwrap().abs() < 1e-5, "{k}");
    let k = kl(
        d.path(),
        &["--base", "lo"],
        &["--model", "FX", "--adapter", "lo"],
    );
    assert_eq!(k["kl_token"].as_f64(), Some(0.0), "{k}");
    // ... and it is not the base.
    let k = kl(d.path(), &["--base", "FX"], &["--model", "lo"]);
    assert!(k["kl_token"].as_f64().unwrap() > 1e-3, "{k}");
    // cf-sample and cf-eval take it too.
    let s = ok(run(
        "cf-sample",
        &["--model", "lo", "-n", "2", "--max-tokens", "4", "-q"],
        d.path(),
        None,
    ));
    assert_eq!(s.stdout.lines().count(), 2);
    let mc = root().join("fixtures/eval/mc.jsonl");
    let acc = |m: &str| -> Value {
        let r = ok(run(
            "cf-eval",
            &["--model", m, "--task", mc.to_str().unwrap(), "-q"],
            d.path(),
            None,
        ));
        serde_json::from_str::<Value>(&r.stdout).unwrap()["results"]["mc"]["acc,none"].clone()
    };
    assert_eq!(acc("lo"), acc("lo/merged"));
    // cf-train continues an adapter: with a vanishing learning rate it comes back unchanged.
    ok(run(
        "cf-train",
        &[
            "--model",
            "lo",
            "d.jsonl",
            "-o",
            "lo2",
            "--lr",
            "1e-30",
            "--max-steps",
            "1",
            "-q",
        ],
        d.path(),
        None,
    ));
    let (a, b) = (
        weights(&d.path().join("lo/adapter_model.safetensors")),
        weights(&d.path().join("lo2/adapter_model.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert!(tensor_max_diff(t, &b[k]) < 1e-6, "{k}");
    }
    let r = run(
        "cf-train",
        &[
            "--model",
            "lo",
            "d.jsonl",
            "-o",
            "lo3",
            "--lora-rank",
            "8",
            "-q",
        ],
        d.path(),
        None,
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("has rank 4"), "{r}");
}

#[test]
fn adapter_config_names_a_cached_base_as_peft_does() {
    // A model in a Hugging Face cache, used as org/name@revision: the adapter records
    // base_model_name_or_path "org/name" and revision "<sha>" (peft's layout, which
    // AutoPeftModelForCausalLM loads), and the tools find the base from it.
    let d = tempfile::tempdir().unwrap();
    text_data(d.path(), 6);
    let snap = d.path().join("hub/models--tiny-org--tiny/snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(fixture("llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
    }
    let env = [(
        "HF_HUB_CACHE",
        d.path().join("hub").to_str().unwrap().to_string(),
    )];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    ok(run_env(
        "cf-train",
        &[
            "--model",
            "tiny-org/tiny@abc123",
            "d.jsonl",
            "-o",
            "lo",
            "--lora-rank",
            "2",
            "--max-steps",
            "1",
            "-q",
        ],
        d.path(),
        None,
        &env,
    ));
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("lo/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["base_model_name_or_path"], "tiny-org/tiny");
    assert_eq!(cfg["revision"], "abc123");
    ok(run_env(
        "cf-sample",
        &["--model", "lo", "-n", "1", "--max-tokens", "2", "-q"],
        d.path(),
        None,
        &env,
    ));
}

#[test]
fn cf_merge_merges_adapters_and_interpolates_models() {
    let d = tempfile::tempdir().unwrap();
    adapter(d.path());
    let fx = fixture("llama");
    let fx = fx.to_str().unwrap();
    // An adapter merged by cf-merge is cf-train --merge's model, bit for bit.
    ok(run(
        "cf-merge",
        &["--model", "lo", "-o", "m", "-q"],
        d.path(),
        None,
    ));
    let (a, b) = (
        weights(&d.path().join("m/model.safetensors")),
        weights(&d.path().join("lo/merged/model.safetensors")),
    );
    for (k, t) in &b {
        assert_eq!(tensor_max_diff(t, &a[k]), 0.0, "{k}");
    }
    // WiSE-FT: α = 0 is the original, 1 the fine-tuned model, 0.5 the midpoint.
    let base = weights(&fixture("llama").join("model.safetensors"));
    for (alpha, out) in [("0", "w0"), ("1", "w1"), ("0.5", "wh")] {
        ok(run(
            "cf-merge",
            &[
                "--base",
                fx,
                "--model",
                "lo/merged",
                "--alpha",
                alpha,
                "-o",
                out,
                "-q",
            ],
            d.path(),
            None,
        ));
    }
    let (w0, w1, wh) = (
        weights(&d.path().join("w0/model.safetensors")),
        weights(&d.path().join("w1/model.safetensors")),
        weights(&d.path().join("wh/model.safetensors")),
    );
    for (k, t) in &base {
        assert_eq!(tensor_max_diff(t, &w0[k]), 0.0, "{k}");
        assert_eq!(tensor_max_diff(&b[k], &w1[k]), 0.0, "{k}");
        let mid = ((t.to_dtype(DType::F64).unwrap() + b[k].to_dtype(DType::F64).unwrap()).unwrap()
            * 0.5)
            .unwrap();
        assert!(tensor_max_diff(&mid, &wh[k]) < 1e-6, "{k}");
    }
    // The adapter folder itself can be the fine-tuned side, and the result is a model.
    ok(run(
        "cf-merge",
        &[
            "--base", fx, "--model", "lo", "--alpha", "0.5", "-o", "wa", "-q",
        ],
        d.path(),
        None,
    ));
    ok(run(
        "cf-sample",
        &["--model", "wa", "-n", "1", "--max-tokens", "2", "-q"],
        d.path(),
        None,
    ));
    for (args, msg) in [
        (vec!["--model", "lo", "-o", "m"], "exists"),
        (vec!["--model", fx, "-o", "x"], "not an adapter folder"),
        (vec!["--base", fx, "--model", "lo", "-o", "y"], "--alpha"),
    ] {
        let r = run("cf-merge", &args, d.path(), None);
        assert_eq!(r.code, 2, "{r}");
        assert!(
            r.stderr.contains(msg) && r.stderr.lines().count() == 1,
            "{r}"
        );
    }
}

#[test]
fn l2_init_adds_its_penalty_and_pulls_toward_the_original() {
    // Full fine-tuning: at step 1 θ = θ₀ (penalty 0); at step 2 the penalty is λ/2·‖θ₁ − θ₀‖²
    // of the weights checkpoint-1 holds. A large λ keeps the weights closer to the original.
    let d = tempfile::tempdir().unwrap();
    text_data(d.path(), 6);
    let fx = fixture("llama");
    let train = |out: &str, extra: &[&str]| {
        let mut a = vec![
            "--model",
            fx.to_str().unwrap(),
            "d.jsonl",
            "-o",
            out,
            "--max-steps",
            "3",
            "--save-every",
            "1",
            "--lr",
            "1e-2",
            "--metrics",
        ];
        let m = format!("{out}.jsonl");
        a.push(&m);
        a.push("-q");
        a.extend_from_slice(extra);
        ok(run("cf-train", &a, d.path(), None));
        std::fs::read_to_string(d.path().join(&m))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let m = train("l2", &["--l2-init", "3.0"]);
    assert_eq!(m[0]["l2_init"].as_f64(), Some(0.0));
    let base = weights(&fx.join("model.safetensors"));
    let c1 = weights(&d.path().join("l2/checkpoint-1/model.safetensors"));
    let want: f64 = base
        .iter()
        .map(|(k, t)| {
            let dd =
                (c1[k].to_dtype(DType::F64).unwrap() - t.to_dtype(DType::F64).unwrap()).unwrap();
            dd.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        })
        .sum::<f64>()
        * 3.0
        / 2.0;
    let got = m[1]["l2_init"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-4 * want, "penalty {got} vs {want}");
    train("plain", &[]);
    let dist = |out: &str| -> f64 {
        let w = weights(&d.path().join(out).join("model.safetensors"));
        base.iter()
            .map(|(k, t)| tensor_max_diff(t, &w[k]))
            .fold(0.0, f64::max)
    };
    let strong = train("strong", &["--l2-init", "1000"]);
    assert!(strong.len() == 3);
    assert!(
        dist("strong") < dist("plain"),
        "{} vs {}",
        dist("strong"),
        dist("plain")
    );
    // LoRA: the penalty is λ/2·Σ‖s·B·A‖² of the adapters checkpoint-1 holds.
    let m = train(
        "lora",
        &[
            "--l2-init",
            "2.0",
            "--lora-rank",
            "4",
            "--lora-targets",
            "all",
        ],
    );
    let ad = weights(&d.path().join("lora/checkpoint-1/adapter_model.safetensors"));
    let mut want = 0.0;
    for (k, a) in &ad {
        if let Some(stem) = k.strip_suffix(".lora_A.weight") {
            let b = &ad[&format!("{stem}.lora_B.weight")];
            let ba = b
                .to_dtype(DType::F64)
                .unwrap()
                .matmul(&a.to_dtype(DType::F64).unwrap())
                .unwrap();
            want += ba
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
        }
    }
    want *= 2.0 / 2.0; // λ/2 with λ = 2, and s = α/r = 1
    let got = m[1]["l2_init"].as_f64().unwrap();
    assert!(
        got > 0.0 && (got - want).abs() < 1e-3 * want,
        "LoRA penalty {got} vs {want}"
    );
}
