//! cf-train, through the real binary.

use crate::util::*;
use candle_core::{DType, Device, Tensor};
use cf_common::model::{Mode, Model};
use serde_json::{json, Value};
use std::path::Path;

fn train(dir: &Path, args: &[&str]) -> Run {
    let m = fixture("llama");
    let mut a = vec!["--model", m.to_str().unwrap()];
    a.extend_from_slice(args);
    run("cf-train", &a, dir, None)
}

fn ok(r: Run) -> Run {
    assert_eq!(r.code, 0, "{r}");
    r
}

fn metrics(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn two_adamw_steps_match_pytorch() {
    let d = tempfile::tempdir().unwrap();
    let data = root().join("fixtures/train/tiny.jsonl");
    let mut args = vec![
        data.to_str().unwrap(),
        "-o",
        "out",
        "--metrics",
        "m.jsonl",
        "-q",
    ];
    args.extend(ADAMW_REFERENCE_FLAGS);
    ok(train(d.path(), &args));
    let got = weights(&d.path().join("out/model.safetensors"));
    let want = weights(&root().join("fixtures/train/adamw_reference.safetensors"));
    assert_eq!(got.len(), want.len());
    for (k, w) in &want {
        let diff = tensor_max_diff(&got[k], w);
        assert!(
            diff < 1e-5,
            "{k}: max |Δ| = {diff} against torch.optim.AdamW"
        );
    }
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/train/adamw_reference.json")).unwrap(),
    )
    .unwrap();
    for (m, r) in metrics(&d.path().join("m.jsonl"))
        .iter()
        .zip(reference["steps"].as_array().unwrap())
    {
        for k in ["loss", "grad_norm"] {
            let (a, b) = (m[k].as_f64().unwrap(), r[k].as_f64().unwrap());
            assert!((a - b).abs() < 1e-5 * b.abs(), "{k}: {a} vs torch {b}");
        }
    }
}

#[test]
fn loss_masking_matches_a_hand_computed_example() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("pc.jsonl"),
        json!({"prompt": "Question: what is 2 plus 2?", "completion": " Answer: 4."}).to_string()
            + "\n",
    )
    .unwrap();
    // --inspect shows the labels: -100 on BOS and the prompt, the ids on the completion and EOS.
    // It writes nothing, so it needs no output folder, and creates none.
    let r = ok(train(d.path(), &["pc.jsonl", "--inspect", "1"]));
    assert_eq!(
        r.stdout,
        ok(train(
            d.path(),
            &["pc.jsonl", "-o", "out", "--inspect", "1"]
        ))
        .stdout
    );
    assert!(!d.path().join("out").exists());
    let m = Model::load(
        fixture("llama").to_str().unwrap(),
        DType::F64,
        &Device::Cpu,
        Mode::Infer,
    )
    .unwrap();
    let p = m.tok.encode("Question: what is 2 plus 2?", false).unwrap();
    let c = m.tok.encode(" Answer: 4.", false).unwrap();
    let ids: Vec<u32> = [vec![1], p.clone(), c.clone(), vec![2]].concat();
    let labels: Vec<i64> = r
        .stdout
        .lines()
        .skip(2)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().nth(2).unwrap().parse().unwrap())
        .collect();
    let want: Vec<i64> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i <= p.len() { -100 } else { t as i64 })
        .collect();
    assert_eq!(labels, want, "{r}");
    // The first step's loss is the mean NLL over exactly those positions, before any update.
    ok(train(
        d.path(),
        &[
            "pc.jsonl",
            "-o",
            "out",
            "--max-steps",
            "1",
            "--metrics",
            "m.jsonl",
            "-q",
        ],
    ));
    let lp = m
        .decoder
        .sequence_logprobs(
            &Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap();
    let lp: Vec<f64> = lp.squeeze(0).unwrap().to_vec1().unwrap();
    let hand = -lp[p.len()..].iter().sum::<f64>() / (c.len() + 1) as f64;
    let got = metrics(&d.path().join("m.jsonl"))[0]["loss"]
        .as_f64()
        .unwrap();
    assert!(
        (got - hand).abs() < 1e-4,
        "loss {got} vs hand-computed {hand}"
    );
}

#[test]
fn chat_messages_train_only_assistant_turns() {
    let d = tempfile::tempdir().unwrap();
    let rec = json!({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]});
    std::fs::write(d.path().join("c.jsonl"), rec.to_string() + "\n").unwrap();
    let q = fixture("qwen2");
    let r = ok(run(
        "cf-train",
        &[
            "--model",
            q.to_str().unwrap(),
            "c.jsonl",
            "-o",
            "o",
            "--inspect",
            "1",
        ],
        d.path(),
        None,
    ));
    let m = Model::load(q.to_str().unwrap(), DType::F32, &Device::Cpu, Mode::Infer).unwrap();
    // Rebuild the trained text from the ids instead of parsing printed tokens: the assistant
    // parts of the ChatML rendering.
    let ids: Vec<(u32, bool)> = r
        .stdout
        .lines()
        .skip(2)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[1].parse().unwrap(), f[2] != "-100")
        })
        .collect();
    let text_of = |keep: bool| {
        m.tok
            .decode(
                &ids.iter()
                    .filter(|x| x.1 == keep)
                    .map(|x| x.0)
                    .collect::<Vec<_>>(),
                false,
            )
            .unwrap()
    };
    assert_eq!(text_of(true), "hello<|im_end|>\n4<|im_end|>\n");
    assert_eq!(text_of(false), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n");
}

#[test]
fn training_drives_the_loss_down() {
    let d = tempfile::tempdir().unwrap();
    text_data(d.path(), 16);
    ok(train(
        d.path(),
        &[
            "d.jsonl",
            "-o",
            "out",
            "--lr",
            "3e-3",
            "--max-steps",
            "30",
            "--metrics",
            "m.jsonl",
            "-q",
        ],
    ));
    let m = metrics(&d.path().join("m.jsonl"));
    let (first, last) = (
        m[0]["loss"].as_f64().unwrap(),
        m[29]["loss"].as_f64().unwrap(),
    );
    assert!(last < first / 3.0, "loss {first} → {last}");
    // The output is a model folder the other tools load: it scores the training text better.
    let fx = fixture("llama");
    let score = |model: &str| -> f64 {
        let r = run(
            "cf-kl",
            &[
                "--base",
                model,
                "--model",
                model,
                "--per-record",
                "-",
                "-q",
                "d.jsonl",
            ],
            d.path(),
            None,
        );
        r.stdout
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["logprob_model"]
                    .as_f64()
                    .unwrap()
            })
            .sum()
    };
    assert!(score("out") > score(fx.to_str().unwrap()));
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    for lora in [false, true] {
        let d = tempfile::tempdir().unwrap();
        text_data(d.path(), 10);
        let mut common = vec![
            "d.jsonl",
            "--lr",
            "2e-3",
            "--max-steps",
            "6",
            "--batch-size",
            "3",
            "--grad-accum",
            "2",
            "--warmup",
            "2",
            "--schedule",
            "cosine",
            "--save-every",
            "2",
            "-q",
        ];
        if lora {
            common.extend([
                "--lora-rank",
                "4",
                "--lora-dropout",
                "0.2",
                "--lora-targets",
                "all",
            ]);
        }
        fn joined<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<&'a str> {
            a.iter().chain(b).cloned().collect()
        }
        let with = |extra: &[&'static str]| joined(&common, extra);
        ok(train(d.path(), &with(&["-o", "a"])));
        // A run stopped after step 4 is the state in a/checkpoint-4: continue it elsewhere.
        ok(train(
            d.path(),
            &with(&["-o", "b", "--resume-from", "a/checkpoint-4"]),
        ));
        let file = if lora {
            "adapter_model.safetensors"
        } else {
            "model.safetensors"
        };
        let (wa, wb) = (
            weights(&d.path().join("a").join(file)),
            weights(&d.path().join("b").join(file)),
        );
        for (k, t) in &wa {
            assert_eq!(
                tensor_max_diff(t, &wb[k]),
                0.0,
                "lora={lora}: {k} differs after resuming"
            );
        }
        // --resume picks the newest checkpoint of the output folder itself.
        ok(train(d.path(), &with(&["-o", "a", "--resume"])));
        // Resuming on other data is refused.
        text_data(d.path(), 11);
        let r = train(
            d.path(),
            &with(&["-o", "c", "--resume-from", "a/checkpoint-4"]),
        );
        assert_eq!(r.code, 2);
        assert!(r.stderr.contains("made with other data"), "{r}");
    }
}

#[test]
fn checkpoints_reload_bit_exactly_and_score_identically() {
    let d = tempfile::tempdir().unwrap();
    text_data(d.path(), 8);
    ok(train(
        d.path(),
        &[
            "d.jsonl",
            "-o",
            "long",
            "--max-steps",
            "4",
            "--save-every",
            "2",
            "--lr",
            "1e-3",
            "--schedule",
            "constant",
            "-q",
        ],
    ));
    ok(train(
        d.path(),
        &[
            "d.jsonl",
            "-o",
            "short",
            "--max-steps",
            "2",
            "--lr",
            "1e-3",
            "--schedule",
            "constant",
            "-q",
        ],
    ));
    let (a, b) = (
        weights(&d.path().join("long/checkpoint-2/model.safetensors")),
        weights(&d.path().join("short/model.safetensors")),
    );
    for (k, t) in &a {
        assert_eq!(tensor_max_diff(t, &b[k]), 0.0, "{k}");
    }
    let r = ok(run(
        "cf-kl",
        &[
            "--base",
            "short",
            "--model",
            "long/checkpoint-2",
            "d.jsonl",
            "-q",
        ],
        d.path(),
        None,
    ));
    let j: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["kl_token"].as_f64(), Some(0.0));
    assert_eq!(j["kl_seq"].as_f64(), Some(0.0));
    // The saved files carry transformers' metadata.
    let bytes = std::fs::read(d.path().join("short/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt");
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(d.path().join("short").join(f).is_file(), "{f} missing");
    }
}

#[test]
fn lora_changes_only_adapter_tensors() {
    let d = tempfile::tempdir().unwrap();
    text_data(d.path(), 8);
    let before = std::fs::read(fixture("llama").join("model.safetensors")).unwrap();
    ok(train(
        d.path(),
        &[
            "d.jsonl",
            "-o",
            "lo",
            "--max-steps",
            "5",
            "--lr",
            "1e-2",
            "--lora-rank",
            "4",
            "--merge",
            "-q",
        ],
    ));
    assert_eq!(
        std::fs::read(fixture("llama").join("model.safetensors")).unwrap(),
        before,
        "the base model file changed"
    );
    let ad = weights(&d.path().join("lo/adapter_model.safetensors"));
    assert_eq!(
        ad.len(),
        2 * 2 * 2,
        "q_proj and v_proj of 2 layers, A and B"
    );
    assert!(ad
        .keys()
        .all(|k| k.starts_with("base_model.model.model.layers.")
            && (k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))));
    assert!(
        ad.iter()
            .filter(|(k, _)| k.contains("lora_B"))
            .all(|(_, b)| b
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0),
        "B stayed zero"
    );
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("lo/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (cfg["peft_type"].as_str(), cfg["r"].as_u64()),
        (Some("LORA"), Some(4))
    );
    let base = weights(&fixture("llama").join("model.safetensors"));
    let merged = weights(&d.path().join("lo/merged/model.safetensors"));
    for (k, t) in &base {
        let moved = tensor_max_diff(t, &merged[k]) > 0.0;
        let targeted = k.contains("q_proj") || k.contains("v_proj");
        assert_eq!(moved, targeted, "{k}: moved={moved}");
    }
    // The adapter folder is a model (its base + the adapter), and so is the merged one.
    ok(run(
        "cf-sample",
        &["--model", "lo", "-n", "1", "--max-tokens", "3"],
        d.path(),
        None,
    ));
    ok(run(
        "cf-sample",
        &["--model", "lo/merged", "-n", "1", "--max-tokens", "3"],
        d.path(),
        None,
    ));
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    text_data(d.path(), 4);
    let r = train(
        d.path(),
        &[
            "d.jsonl",
            "-o",
            "out",
            "--lr",
            "1e30",
            "--max-grad-norm",
            "0",
            "--schedule",
            "constant",
            "--max-steps",
            "5",
            "--save-every",
            "1",
            "--batch-size",
            "4",
        ],
    );
    assert_eq!(r.code, 2, "{r}");
    let err = r.stderr.lines().last().unwrap();
    assert!(
        err.contains("the loss is") && err.contains("last good checkpoint: out/checkpoint-"),
        "{r}"
    );
    let ckpt = err
        .rsplit("checkpoint: ")
        .next()
        .unwrap()
        .trim_end_matches(')');
    let w = weights(&d.path().join(ckpt).join("model.safetensors"));
    assert!(
        w.values().all(|t| t
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|x| x.is_finite())),
        "checkpoint has non-finite weights"
    );
    assert!(
        !d.path().join("out/model.safetensors").exists(),
        "no final model after a failed run"
    );
}

#[test]
fn per_source_weights_exact_kl_and_config_file() {
    let d = tempfile::tempdir().unwrap();
    let fx = fixture("llama");
    // Context-free samples from the model itself, mixed with task text.
    let s = ok(run(
        "cf-sample",
        &[
            "--model",
            fx.to_str().unwrap(),
            "-n",
            "4",
            "--max-tokens",
            "8",
            "-q",
        ],
        d.path(),
        None,
    ));
    std::fs::write(d.path().join("cfs.jsonl"), s.stdout).unwrap();
    text_data(d.path(), 4);
    ok(run(
        "cf-mix",
        &["task:d.jsonl", "cf:cfs.jsonl", "-o", "mix.jsonl", "-q"],
        d.path(),
        None,
    ));
    std::fs::write(d.path().join("train.toml"), "max_steps = 1\nbatch_size = 8\nweight = [\"cf=0.5\"]\nexact_kl = [\"cf\"]\nmetrics = \"m.jsonl\"\nquiet = true\n").unwrap();
    ok(train(
        d.path(),
        &["mix.jsonl", "-o", "out", "--config", "train.toml"],
    ));
    let m = &metrics(&d.path().join("m.jsonl"))[0];
    // Before the first update the model is the original: the exact KL term is zero (to the
    // rounding between the fused inference kernels of the frozen copy and the training ops).
    assert!(
        m["loss_by_source"]["cf (exact KL)"].as_f64().unwrap().abs() < 1e-6,
        "{m}"
    );
    assert!(m["loss_by_source"]["task"].as_f64().unwrap() > 1.0, "{m}");
    // Flags override the file; unknown keys are named.
    ok(train(
        d.path(),
        &[
            "mix.jsonl",
            "-o",
            "out2",
            "--config",
            "train.toml",
            "--max-steps",
            "2",
        ],
    ));
    // The metrics file describes one run: the second run started it afresh.
    assert_eq!(metrics(&d.path().join("m.jsonl")).len(), 2);
    std::fs::write(d.path().join("bad.toml"), "learning_rate = 1\n").unwrap();
    let r = train(d.path(), &["mix.jsonl", "-o", "o3", "--config", "bad.toml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("bad.toml: unknown key \"learning_rate\""),
        "{r}"
    );
}

#[test]
fn bad_records_and_flags() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("b.jsonl"),
        "{\"text\": \"ok\"}\n{\"question\": \"?\"}\n",
    )
    .unwrap();
    let r = train(d.path(), &["b.jsonl", "-o", "o"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("b.jsonl:2: nothing to train on"), "{r}");
    assert!(
        !d.path().join("o").exists(),
        "bad data must fail before anything is written"
    );
    let r = train(d.path(), &["b.jsonl", "-o", "o", "--lr", "0"]);
    assert!(r.stderr.contains("--lr must be > 0"), "{r}");
    let r = train(d.path(), &["b.jsonl", "-o", "o", "--merge"]);
    assert!(r.stderr.contains("--merge needs --lora-rank"), "{r}");
}

#[test]
fn bf16_compute_trains_full_and_lora() {
    // f32 master weights (and LoRA adapters) with a bf16 forward: the loss still falls, and the
    // saved weights are f32.
    let d = tempfile::tempdir().unwrap();
    text_data(d.path(), 8);
    for (out, extra) in [
        ("full", vec![]),
        ("lora", vec!["--lora-rank", "8", "--lora-targets", "all"]),
    ] {
        let m = format!("{out}.jsonl");
        let mut a = vec![
            "d.jsonl",
            "-o",
            out,
            "--dtype",
            "bf16",
            "--lr",
            "3e-3",
            "--max-steps",
            "12",
            "--metrics",
            m.as_str(),
            "-q",
        ];
        a.extend(extra);
        ok(train(d.path(), &a));
    }
    let (full, lora) = (
        metrics(&d.path().join("full.jsonl")),
        metrics(&d.path().join("lora.jsonl")),
    );
    for run in [&full[..], &lora[..]] {
        let (first, last) = (
            run[0]["loss"].as_f64().unwrap(),
            run[11]["loss"].as_f64().unwrap(),
        );
        assert!(last < first * 0.8, "bf16 loss {first} → {last}");
    }
    let w = weights(&d.path().join("full/model.safetensors"));
    assert!(w.values().all(|t| t.dtype() == DType::F32));
}

fn config_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
}

#[test]
fn saved_model_keeps_the_base_dtype_and_says_so() {
    // A bf16 base fine-tuned by cf: the final model is stored in bf16 (as save_pretrained keeps
    // a model's dtype) with `dtype` and `torch_dtype` both "bfloat16"; checkpoints hold the f32
    // master weights and say float32; --save-dtype f32 keeps f32 and says so.
    let d = tempfile::tempdir().unwrap();
    text_data(d.path(), 4);
    let m = fixture("llama-bf16");
    let base = |extra: &[&str], out: &str| {
        let mut a = vec![
            "--model",
            m.to_str().unwrap(),
            "d.jsonl",
            "-o",
            out,
            "--max-steps",
            "2",
            "--save-every",
            "1",
            "--lr",
            "1e-2",
            "-q",
        ];
        a.extend_from_slice(extra);
        ok(run("cf-train", &a, d.path(), None));
        d.path().join(out)
    };
    let auto = base(&[], "auto");
    let c = config_json(&auto);
    assert_eq!(
        (c["dtype"].as_str(), c["torch_dtype"].as_str()),
        (Some("bfloat16"), Some("bfloat16"))
    );
    let w = weights(&auto.join("model.safetensors"));
    assert!(w.values().all(|t| t.dtype() == DType::BF16));
    let ck = auto.join("checkpoint-1");
    let c = config_json(&ck);
    assert_eq!(
        (c["dtype"].as_str(), c["torch_dtype"].as_str()),
        (Some("float32"), Some("float32"))
    );
    assert!(weights(&ck.join("model.safetensors"))
        .values()
        .all(|t| t.dtype() == DType::F32));
    let f32_out = base(&["--save-dtype", "f32"], "f32");
    let c = config_json(&f32_out);
    assert_eq!(
        (c["dtype"].as_str(), c["torch_dtype"].as_str()),
        (Some("float32"), Some("float32"))
    );
    let wf = weights(&f32_out.join("model.safetensors"));
    // The bf16 file is the f32 result rounded, tensor by tensor.
    for (k, t) in &wf {
        assert_eq!(t.dtype(), DType::F32);
        let rounded = t
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(
            tensor_max_diff(&rounded, &w[k].to_dtype(DType::F32).unwrap()),
            0.0,
            "{k}"
        );
    }
}

/// Records of two sources, a and b, in one micro-batch.
fn two_sources(dir: &Path) {
    let lines: String = (0..6)
        .map(|i| {
            let src = if i % 2 == 0 { "a" } else { "b" };
            json!({"text": format!("Fact {i}: the {src} robot likes {} apples.", i * 3), "source": src})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.join("ab.jsonl"), &lines).unwrap();
    let only_a: String = lines.lines().step_by(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join("a.jsonl"), only_a).unwrap();
}

#[test]
fn loss_weight_scales_its_source_exactly() {
    // The paper's mechanism: a source's weight λ multiplies its tokens' loss and gradient, the
    // denominator (all trained tokens) unchanged. loss(λ) = (S_a + λ·S_b)/N is linear in λ, and
    // with λ = 0 the gradient is a's alone: ‖g(0)‖·N = ‖g_a-only‖·N_a.
    let d = tempfile::tempdir().unwrap();
    two_sources(d.path());
    let step = |data: &str, w: Option<&str>, out: &str| -> Value {
        let mut a = vec![
            data,
            "-o",
            out,
            "--max-steps",
            "1",
            "--batch-size",
            "6",
            "--max-grad-norm",
            "0",
            "--metrics",
            "m.jsonl",
            "-q",
        ];
        let flag;
        if let Some(w) = w {
            flag = format!("b={w}");
            a.extend(["--weight", flag.as_str()]);
        }
        ok(train(d.path(), &a));
        let m = metrics(&d.path().join("m.jsonl"));
        m.last().unwrap().clone()
    };
    let (m1, mh, m0) = (
        step("ab.jsonl", Some("1"), "w1"),
        step("ab.jsonl", Some("0.5"), "wh"),
        step("ab.jsonl", Some("0"), "w0"),
    );
    let l = |m: &Value| m["loss"].as_f64().unwrap();
    assert!(
        l(&m1) - l(&m0) > 0.5,
        "b's share of the loss is not small: {m1} {m0}"
    );
    let lin = ((l(&m1) - l(&mh)) - (l(&mh) - l(&m0))).abs();
    assert!(
        lin < 1e-5 * l(&m1),
        "loss is not linear in the weight: {m1} {mh} {m0}"
    );
    // The per-source losses (unweighted means) are the same model's, whatever the weight.
    assert_eq!(m1["loss_by_source"], m0["loss_by_source"]);
    let n = |m: &Value| m["trained_tokens"].as_f64().unwrap();
    let ma = step("a.jsonl", None, "a");
    let g = |m: &Value| m["grad_norm"].as_f64().unwrap();
    let (lhs, rhs) = (g(&m0) * n(&m0), g(&ma) * n(&ma));
    assert!(
        (lhs - rhs).abs() < 1e-4 * rhs,
        "weight 0 still moves the gradient: {lhs} vs {rhs}"
    );
    assert!((l(&m0) * n(&m0) - l(&ma) * n(&ma)).abs() < 1e-4 * l(&ma) * n(&ma));
}

#[test]
fn weights_are_parsed_one_way_in_cf_mix_and_cf_train() {
    let d = tempfile::tempdir().unwrap();
    two_sources(d.path());
    for (w, msg) in [
        ("b=nan", "--weight b=nan: must be a finite number >= 0"),
        ("b=-1", "--weight b=-1: must be a finite number >= 0"),
        ("b=inf", "--weight b=inf: must be a finite number >= 0"),
        ("b=x", "--weight b=x: not a number"),
        ("c=1", "--weight c: no"),
    ] {
        let r = train(d.path(), &["ab.jsonl", "-o", "o", "--weight", w]);
        assert_eq!(r.code, 2, "{r}");
        assert!(
            r.stderr.contains(msg) && r.stderr.lines().count() == 1,
            "{w}: {r}"
        );
        let r = run(
            "cf-mix",
            &["b:ab.jsonl", "--weight", w, "-q"],
            d.path(),
            None,
        );
        assert_eq!(r.code, 2, "{r}");
        assert!(
            r.stderr.contains(msg) && r.stderr.lines().count() == 1,
            "{w}: {r}"
        );
        assert!(r.stdout.is_empty());
    }
}

#[test]
fn config_file_is_a_layer_under_the_command_line() {
    // The command line wins for every flag, lists are not merged, and a negative number in the
    // file is a value (checked like the flag's), not a flag.
    let d = tempfile::tempdir().unwrap();
    two_sources(d.path());
    let show = |toml: &str, extra: &[&str]| -> Run {
        std::fs::write(d.path().join("c.toml"), toml).unwrap();
        let mut a = vec![
            "ab.jsonl",
            "-o",
            "o",
            "--config",
            "c.toml",
            "--inspect",
            "2",
        ];
        a.extend_from_slice(extra);
        train(d.path(), &a)
    };
    let r = ok(show("weight = [\"b=0\"]\n", &[]));
    assert!(r.stdout.contains("source b, weight 0,"), "{r}");
    let r = ok(show("weight = [\"b=0\"]\n", &["--weight", "b=1"]));
    assert!(r.stdout.contains("source b, weight 1,"), "{r}");
    assert!(!r.stdout.contains("weight 0,"), "{r}");
    let r = show("adam_beta1 = -0.5\n", &[]);
    assert_eq!(r.code, 2, "{r}");
    assert!(r.stderr.contains("--adam-beta1 must be in [0, 1)"), "{r}");
    let r = ok(show("adam_beta1 = -0.5\n", &["--adam-beta1", "0.8"]));
    assert!(r.stdout.contains("example 0"), "{r}");
    let r = show("lr = \"fast\"\n", &[]);
    assert_eq!(r.code, 2, "{r}");
    assert!(
        r.stderr.contains("c.toml") && r.stderr.contains("fast"),
        "{r}"
    );
    let r = show("merge = 1\n", &[]);
    assert!(
        r.stderr.contains("c.toml: merge: expected true or false"),
        "{r}"
    );
}

/// cf-train's examples for a record, as `--inspect-format jsonl` prints them.
fn inspect_jsonl(dir: &Path, model: &str, template: Option<&str>, rec: &Value) -> Run {
    std::fs::write(dir.join("r.jsonl"), format!("{rec}\n")).unwrap();
    let m = fixture(model);
    let t = template.map(|t| root().join("fixtures/train/templates").join(t));
    let mut a = vec![
        "--model",
        m.to_str().unwrap(),
        "r.jsonl",
        "-o",
        "o",
        "--inspect",
        "1",
        "--inspect-format",
        "jsonl",
    ];
    if let Some(t) = &t {
        a.extend(["--chat-template", t.to_str().unwrap()]);
    }
    run("cf-train", &a, dir, None)
}

#[test]
fn tokens_and_labels_match_trl() {
    // fixtures/train/trl_reference.json: TRL 1.16's SFTTrainer dataset (input_ids, labels) for
    // text, prompt/completion (one split inside a token), EOS already present, and the thinking
    // templates of DeepSeek-R1-Distill and Qwen3, as shipped and as TRL's training variants
    // with {% generation %} blocks (scripts/make_trl_reference.py). Position 0 is never
    // predicted, so its label is not compared (TRL labels BOS there, cf -100).
    let d = tempfile::tempdir().unwrap();
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/train/trl_reference.json")).unwrap(),
    )
    .unwrap();
    let mut compared = 0;
    for c in &cases {
        let name = c["case"].as_str().unwrap();
        let r = inspect_jsonl(
            d.path(),
            c["model"].as_str().unwrap(),
            c["template"].as_str(),
            &c["record"],
        );
        let stderr = r.stderr.clone();
        let warned = |w: &str| stderr.contains(w);
        match name {
            // No {% generation %} blocks and a template that renders the first assistant turn
            // differently once a later one follows: cf refuses rather than train user turns
            // (TRL trains every token here).
            "qwen3_messages" => {
                assert_eq!(r.code, 2, "{name}: {r}");
                assert!(warned("renders assistant message 1 differently"), "{r}");
                continue;
            }
            // TRL trains every token of a conversation without markers; cf trains the
            // assistant turns (as the template renders them: DeepSeek's drops the reasoning,
            // and cf says so).
            "deepseek_messages" => {
                assert_eq!(r.code, 0, "{r}");
                let got: Value = serde_json::from_str(r.stdout.trim()).unwrap();
                assert_eq!(got["input_ids"], c["input_ids"], "{name}");
                let text = got["trained_text"].as_str().unwrap();
                assert!(
                    text.contains("It is 4.") && text.contains("It is 6."),
                    "{text:?}"
                );
                assert!(
                    !text.contains("What is") && !text.contains("User"),
                    "{text:?}"
                );
                assert!(warned("drops the reasoning"), "{r}");
                continue;
            }
            _ => {}
        }
        assert_eq!(r.code, 0, "{r}");
        let got: Value = serde_json::from_str(r.stdout.trim()).unwrap();
        assert_eq!(got["input_ids"], c["input_ids"], "{name}: input_ids");
        let (gl, wl) = (
            got["labels"].as_array().unwrap(),
            c["labels"].as_array().unwrap(),
        );
        assert_eq!(gl[1..], wl[1..], "{name}: labels");
        let trl_warned = c["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("not a prefix"));
        assert_eq!(
            warned("not a prefix") || warned("falls inside a token"),
            trl_warned,
            "{name}: warning differs from TRL's: {r}"
        );
        compared += 1;
    }
    assert_eq!(compared, cases.len() - 2);
}

#[test]
fn gradient_checkpointing_keeps_every_reference() {
    // With --gradient-checkpointing: the AdamW steps still match PyTorch; full and LoRA (with
    // dropout, whose masks the recomputation must redraw identically) runs equal the plain
    // runs to f32 rounding; a resumed checkpointed run equals the uninterrupted one exactly.
    let d = tempfile::tempdir().unwrap();
    let data = root().join("fixtures/train/tiny.jsonl");
    let mut args = vec![
        data.to_str().unwrap(),
        "-o",
        "ref",
        "--gradient-checkpointing",
        "-q",
    ];
    args.extend(ADAMW_REFERENCE_FLAGS);
    ok(train(d.path(), &args));
    let got = weights(&d.path().join("ref/model.safetensors"));
    for (k, w) in &weights(&root().join("fixtures/train/adamw_reference.safetensors")) {
        let diff = tensor_max_diff(&got[k], w);
        assert!(
            diff < 1e-5,
            "{k}: max |Δ| = {diff} against torch.optim.AdamW"
        );
    }
    text_data(d.path(), 10);
    for lora in [false, true] {
        let mut common = vec![
            "d.jsonl",
            "--lr",
            "2e-3",
            "--max-steps",
            "4",
            "--batch-size",
            "3",
            "--grad-accum",
            "2",
            "--save-every",
            "2",
            "-q",
        ];
        if lora {
            common.extend([
                "--lora-rank",
                "4",
                "--lora-dropout",
                "0.2",
                "--lora-targets",
                "all",
            ]);
        }
        let run_with = |out: &str, extra: &[&str]| {
            let mut a = common.clone();
            a.extend(["-o", out]);
            a.extend_from_slice(extra);
            ok(train(d.path(), &a));
        };
        let (p, c, r) = (
            format!("plain{lora}"),
            format!("ckpt{lora}"),
            format!("res{lora}"),
        );
        run_with(&p, &[]);
        run_with(&c, &["--gradient-checkpointing"]);
        let from = format!("{c}/checkpoint-2");
        run_with(&r, &["--gradient-checkpointing", "--resume-from", &from]);
        let file = if lora {
            "adapter_model.safetensors"
        } else {
            "model.safetensors"
        };
        let (wp, wc, wr) = (
            weights(&d.path().join(&p).join(file)),
            weights(&d.path().join(&c).join(file)),
            weights(&d.path().join(&r).join(file)),
        );
        for (k, t) in &wp {
            let diff = tensor_max_diff(t, &wc[k]);
            assert!(
                diff < 1e-5,
                "lora={lora} {k}: checkpointed differs by {diff}"
            );
            assert_eq!(
                tensor_max_diff(&wc[k], &wr[k]),
                0.0,
                "lora={lora} {k}: resume differs"
            );
        }
    }
}

#[test]
fn plan_predicts_from_the_config_alone() {
    // A folder with only config.json (an 8B model not downloaded): --plan reads nothing else,
    // prints the parts as JSON on stdout and a table on stderr; checkpointing lowers the
    // activations and nothing else; the parts add up to peak_bytes.
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("m")).unwrap();
    std::fs::write(
        d.path().join("m/config.json"),
        json!({"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "max_position_embeddings": 8192, "tie_word_embeddings": false}).to_string(),
    )
    .unwrap();
    let plan = |extra: &[&str]| -> (Value, String) {
        let mut a = vec![
            "--model",
            "m",
            "x.jsonl",
            "-o",
            "o",
            "--plan",
            "--dtype",
            "bf16",
            "--max-length",
            "2048",
            "--batch-size",
            "1",
            "--lora-rank",
            "16",
            "--lora-targets",
            "all",
        ];
        a.extend_from_slice(extra);
        let r = run("cf-train", &a, d.path(), None);
        assert_eq!(r.code, 0, "{r}");
        (serde_json::from_str(&r.stdout).unwrap(), r.stderr)
    };
    let (p, table) = plan(&[]);
    let (c, _) = plan(&["--gradient-checkpointing"]);
    assert!(
        table.contains("activations") && table.contains("peak"),
        "{table}"
    );
    let sum: u64 = p["parts"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(
        (sum as i64 - p["peak_bytes"].as_i64().unwrap()).abs() <= 8,
        "{p}"
    );
    let part = |v: &Value, k: &str| v["parts"][k].as_u64().unwrap();
    assert!(part(&c, "activations") * 4 < part(&p, "activations"));
    // LoRA: the adapters' f32 gradients only (the frozen base gets none), with or without
    // checkpointing: r16 on all projections of the 8B shape is 41.9M parameters.
    assert_eq!(part(&c, "gradients"), part(&p, "gradients"));
    assert!(
        (part(&p, "gradients") as f64 / (4.0 * 41.9e6) - 1.0).abs() < 0.01,
        "{p}"
    );
    assert_eq!(part(&c, "weights"), part(&p, "weights"));
    assert_eq!(part(&c, "optimizer"), part(&p, "optimizer"));
    // The 8B model's bf16 base weights alone: 2 bytes × 8.03e9.
    assert!(
        (part(&p, "weights") as f64 / 16.06e9 - 1.0).abs() < 0.02,
        "{p}"
    );
    assert!(!d.path().join("o").exists(), "--plan writes nothing");
}
