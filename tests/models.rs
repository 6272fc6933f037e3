//! Loading model folders: the Hugging Face cache, refusal of pickles, and bad files, each with a
//! one-line error that names the file.

use crate::util::*;
use candle_core::{DType, Device};
use cf_common::model::{Mode, Model};
use std::path::Path;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir.to_str().unwrap(), DType::F32, &Device::Cpu, Mode::Infer) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => cf_common::exit::one_line(&e),
    }
}

#[test]
fn truncated_safetensors_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    copy_dir(&fixture("llama"), &d);
    let w = d.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&d);
    assert!(
        e.starts_with(&format!("{}: not a valid safetensors file", w.display())),
        "{e}"
    );
}

#[test]
fn unknown_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    copy_dir(&fixture("llama"), &d);
    let c = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(d.join("config.json"), c).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("config.json: unknown architecture model_type=\"gpt_neox\""),
        "{e}"
    );
}

#[test]
fn shapes_that_disagree_with_the_config_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    copy_dir(&fixture("llama"), &d);
    let c = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 160", "\"intermediate_size\": 128");
    std::fs::write(d.join("config.json"), c).unwrap();
    let e = load_err(&d);
    assert!(e.contains("model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape [160, 64] but config.json implies [128, 64]"), "{e}");
}

#[test]
fn a_tokenizer_larger_than_the_embedding_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    copy_dir(&fixture("qwen2"), &d);
    let c = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"vocab_size\": 336", "\"vocab_size\": 300");
    std::fs::write(d.join("config.json"), c).unwrap();
    let e = load_err(&d);
    assert!(e.contains("tokenizer.json: the tokenizer's vocabulary (320 ids) does not fit the embedding (300 rows"), "{e}");
}

#[test]
fn pickles_are_never_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    copy_dir(&fixture("llama"), &d);
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("pytorch_model.bin"), b"not opened").unwrap();
    let e = load_err(&d);
    assert!(e.contains("cf never unpickles"), "{e}");
}

#[test]
fn missing_config_and_missing_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    copy_dir(&fixture("llama"), &d);
    std::fs::remove_file(d.join("config.json")).unwrap();
    assert!(load_err(&d).ends_with("no config.json in the model folder"));
    assert!(load_err(&tmp.path().join("nope")).ends_with("no such model folder"));
}

#[test]
fn sharded_weights_load_through_the_index() {
    // Split the llama fixture into two shards with an index, as transformers does for big models.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    copy_dir(&fixture("llama"), &d);
    let st = candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap();
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = st.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let sub: std::collections::HashMap<String, candle_core::Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), st[*n].clone()))
            .collect();
        candle_core::safetensors::save(&sub, d.join(file)).unwrap();
        for n in part.iter() {
            map.insert((*n).clone(), serde_json::Value::String(file.into()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let m = Model::load(d.to_str().unwrap(), DType::F32, &Device::Cpu, Mode::Infer).unwrap();
    assert_eq!(m.files.weights.len(), 2);
}

#[test]
fn a_model_id_resolves_from_the_hugging_face_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("hub").join("models--tiny-org--tiny-llama");
    let snap = repo.join("snapshots").join("abc123");
    copy_dir(&fixture("llama"), &snap);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "abc123").unwrap();
    let hub = tmp.path().join("hub");
    let args = [
        "--model",
        "tiny-org/tiny-llama",
        "-n",
        "1",
        "--max-tokens",
        "3",
        "--seed",
        "1",
    ];
    let out = run_env(
        "cf-sample",
        &args,
        tmp.path(),
        None,
        &[("HF_HUB_CACHE", hub.to_str().unwrap())],
    );
    assert_eq!(out.code, 0, "{out}");
    let rec: serde_json::Value = serde_json::from_str(out.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(rec["model"], "tiny-org/tiny-llama");
    let missing = run_env(
        "cf-sample",
        &["--model", "tiny-org/other", "-n", "1"],
        tmp.path(),
        None,
        &[("HF_HUB_CACHE", hub.to_str().unwrap())],
    );
    assert_eq!(missing.code, 2, "{missing}");
    assert!(
        missing.stderr.contains(
            "cf-sample: error: tiny-org/other: not a folder, and not in the Hugging Face cache"
        ),
        "{missing}"
    );
}

#[test]
fn a_diverged_model_is_an_error_not_a_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    copy_dir(&fixture("llama"), &d);
    let mut t = candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap();
    let w = &t["model.norm.weight"];
    let nan = candle_core::Tensor::full(f32::NAN, w.shape(), &Device::Cpu).unwrap();
    t.insert("model.norm.weight".into(), nan);
    cf_common::model::save::save_safetensors(&t, &d.join("model.safetensors")).unwrap();
    let m = d.to_str().unwrap();
    let r = run(
        "cf-sample",
        &["--model", m, "-n", "2", "--max-tokens", "3"],
        tmp.path(),
        None,
    );
    assert_eq!(r.code, 2, "{r}");
    assert!(r.stderr.contains("non-finite logits"), "{r}");
    let r = run(
        "cf-kl",
        &[
            "--base",
            fixture("llama").to_str().unwrap(),
            "--model",
            m,
            "-q",
        ],
        tmp.path(),
        Some(b"{\"token_ids\": [5, 6]}\n"),
    );
    assert_eq!(r.code, 2, "{r}");
    assert!(
        r.stderr
            .contains("<stdin>:1: a model gave a non-finite log-probability"),
        "{r}"
    );
    // cf-eval: multiple choice, perplexity and generation all refuse it, naming the model
    // (an accuracy of 0.5 from NaN scores would be a silent wrong answer).
    let mc = root().join("fixtures/eval/mc.jsonl");
    std::fs::write(
        tmp.path().join("p.jsonl"),
        "{\"text\": \"The cat sees the moon.\"}\n",
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("g.jsonl"),
        "{\"question\": \"2+2?\", \"answer\": \"#### 4\"}\n",
    )
    .unwrap();
    for task in [mc.to_str().unwrap(), "p.jsonl", "gsm8k:g.jsonl"] {
        let r = run(
            "cf-eval",
            &[
                "--model",
                m,
                "--task",
                task,
                "--max-tokens",
                "4",
                "-o",
                "rep.json",
            ],
            tmp.path(),
            None,
        );
        assert_eq!(r.code, 2, "{task}: {r}");
        assert!(r.stderr.contains("non-finite"), "{task}: {r}");
        assert!(r.stderr.contains(m), "{task}: the model is not named: {r}");
        assert_eq!(r.stderr.lines().count(), 1, "{r}");
        assert!(!tmp.path().join("rep.json").exists());
    }
}

#[test]
fn f16_weights_load_and_score_close_to_the_f32_model() {
    // The llama fixture stored in float16: loading converts exactly (f16 → f32 is lossless), and
    // the rounding of the weights to f16 (11-bit mantissa, relative 2^-11 ≈ 5e-4) moves the
    // log-probabilities by well under 0.02 nats.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    copy_dir(&fixture("llama"), &d);
    let t = candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap();
    let half: std::collections::HashMap<String, candle_core::Tensor> = t
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).unwrap()))
        .collect();
    cf_common::model::save::save_safetensors(&half, &d.join("model.safetensors")).unwrap();
    let w =
        cf_common::model::Weights::open(&[d.join("model.safetensors")], DType::F32, &Device::Cpu)
            .unwrap();
    assert_eq!(
        w.stored_dtype("model.embed_tokens.weight"),
        Some(DType::F16)
    );
    use cf_common::model::Source;
    let got = w.get("model.embed_tokens.weight", &[336, 64]).unwrap();
    let want = half["model.embed_tokens.weight"]
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(
        (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let m = Model::load(d.to_str().unwrap(), DType::F32, &Device::Cpu, Mode::Infer).unwrap();
    let r = reference("llama");
    let seq = ids(&r["sequences"][2]);
    let lp = m
        .decoder
        .sequence_logprobs(
            &candle_core::Tensor::new(seq.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap();
    let lp: Vec<f64> = lp
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let d = max_abs_diff(&lp, &floats(&r["logprobs"][2]));
    assert!(d < 0.02, "f16 weights: max |Δ logprob| {d}");
}

#[test]
fn the_chat_template_may_live_in_chat_template_jinja() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    copy_dir(&fixture("qwen2"), &d);
    let tc_path = d.join("tokenizer_config.json");
    let mut tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tc_path).unwrap()).unwrap();
    let template = tc.as_object_mut().unwrap().remove("chat_template").unwrap();
    std::fs::write(&tc_path, tc.to_string()).unwrap();
    let m = Model::load(d.to_str().unwrap(), DType::F32, &Device::Cpu, Mode::Infer).unwrap();
    assert!(m.tok.chat_template.is_none());
    std::fs::write(d.join("chat_template.jinja"), template.as_str().unwrap()).unwrap();
    let m = Model::load(d.to_str().unwrap(), DType::F32, &Device::Cpu, Mode::Infer).unwrap();
    assert_eq!(m.tok.chat_template.as_deref(), template.as_str());
}
