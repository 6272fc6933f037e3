//! cf-kl, through the real binary.

use crate::util::*;
use candle_core::{DType, Device, Tensor, D};
use cf_common::model::{Mode, Model};
use serde_json::Value;

fn kl(args: &[&str], dir: &std::path::Path) -> Run {
    run("cf-kl", args, dir, None)
}

fn json(out: &Run) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn samples(model: &std::path::Path, dir: &std::path::Path, extra: &[&str]) -> std::path::PathBuf {
    let out = dir.join("cfs.parquet");
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "-q",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let r = run("cf-sample", &args, dir, None);
    assert_eq!(r.code, 0, "{r}");
    out
}

#[test]
fn kl_of_a_model_to_itself_is_exactly_zero() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture("llama3");
    let s = samples(&m, dir.path(), &["-n", "20", "--max-tokens", "12"]);
    let m = m.to_str().unwrap();
    let out = kl(
        &["--base", m, "--model", m, s.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{out}");
    let j = json(&out);
    for k in [
        "kl_seq",
        "kl_token",
        "kl_seq_stderr",
        "kl_token_stderr",
        "kl_per_token",
    ] {
        assert_eq!(j[k].as_f64(), Some(0.0), "{k}: {out}");
    }
    assert_eq!(j["n"], 20);
}

#[test]
fn per_record_logprobs_match_transformers_float64() {
    let dir = tempfile::tempdir().unwrap();
    for fam in FAMILIES {
        let r = reference(fam);
        let mut lines = String::new();
        for seq in r["sequences"].as_array().unwrap() {
            let s = ids(seq);
            lines += &serde_json::json!({"prefix_ids": [s[0]], "token_ids": &s[1..], "tag": fam})
                .to_string();
            lines.push('\n');
        }
        let m = fixture(fam);
        let m = m.to_str().unwrap();
        let out = run(
            "cf-kl",
            &["--base", m, "--model", m, "--per-record", "-", "-q"],
            dir.path(),
            Some(lines.as_bytes()),
        );
        assert_eq!(out.code, 0, "{out}");
        let recs: Vec<Value> = out
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(recs.len(), 3);
        for (rec, want) in recs.iter().zip(r["logprobs"].as_array().unwrap()) {
            let want: f64 = floats(want).iter().sum();
            let got = rec["logprob_model"].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-4,
                "{fam}: {got} vs transformers {want}"
            );
            assert_eq!(rec["tag"], fam, "fields pass through");
        }
        // The summary went to stderr, since the records took stdout.
        assert!(out.stderr.contains("\"kl_token\""), "{out}");
    }
}

/// The exact KL between the two models' distributions over sequences of at most two tokens
/// (a sequence ends early at EOS), by enumerating the first token: an independent reference.
fn exact_kl_two_tokens(base: &Model, model: &Model) -> f64 {
    let dev = Device::Cpu;
    let s = base.tok.document_start().unwrap();
    let lsm = |m: &Model, ids: &Tensor| -> Tensor {
        let l = m.decoder.forward(ids, None).unwrap();
        let t = l.dim(1).unwrap();
        candle_nn::ops::log_softmax(
            &l.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap(),
            D::Minus1,
        )
        .unwrap()
    };
    let first = Tensor::new(&[[s]], &dev).unwrap();
    let (p0, q0) = (
        lsm(base, &first).squeeze(0).unwrap(),
        lsm(model, &first).squeeze(0).unwrap(),
    );
    let v = p0.dim(0).unwrap();
    let two: Vec<u32> = (0..v as u32).flat_map(|x| [s, x]).collect();
    let two = Tensor::from_vec(two, (v, 2), &dev).unwrap();
    let (p1, q1) = (lsm(base, &two), lsm(model, &two));
    let step2 = (p1.exp().unwrap() * (&p1 - &q1).unwrap())
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let (p0, q0) = (p0.to_vec1::<f64>().unwrap(), q0.to_vec1::<f64>().unwrap());
    (0..v)
        .map(|x| {
            let later = if base.eos_ids.contains(&(x as u32)) {
                0.0
            } else {
                step2[x]
            };
            p0[x].exp() * (p0[x] - q0[x] + later)
        })
        .sum()
}

#[test]
fn both_estimators_agree_with_the_exact_kl() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("olmo");
    let ft = perturbed_model("olmo", dir.path(), 0.02, 7);
    let s = samples(
        &base,
        dir.path(),
        &[
            "-n",
            "3000",
            "--max-tokens",
            "2",
            "--seed",
            "11",
            "--batch-size",
            "500",
        ],
    );
    let out = kl(
        &[
            "--base",
            base.to_str().unwrap(),
            "--model",
            ft.to_str().unwrap(),
            s.to_str().unwrap(),
            "--batch-size",
            "256",
        ],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{out}");
    let j = json(&out);
    let b = Model::load(
        base.to_str().unwrap(),
        DType::F64,
        &Device::Cpu,
        Mode::Infer,
    )
    .unwrap();
    let m = Model::load(ft.to_str().unwrap(), DType::F64, &Device::Cpu, Mode::Infer).unwrap();
    let exact = exact_kl_two_tokens(&b, &m);
    let (ks, ss) = (
        j["kl_seq"].as_f64().unwrap(),
        j["kl_seq_stderr"].as_f64().unwrap(),
    );
    let (kt, st) = (
        j["kl_token"].as_f64().unwrap(),
        j["kl_token_stderr"].as_f64().unwrap(),
    );
    eprintln!(
        "kl estimators: exact {exact:.5}, kl_seq {ks:.5} ± {ss:.5}, kl_token {kt:.5} ± {st:.5}"
    );
    assert!(
        exact > 0.05,
        "the perturbation is too small to test anything: KL = {exact}"
    );
    assert!(
        (ks - exact).abs() < 4.0 * ss,
        "kl_seq {ks} ± {ss} vs exact {exact}"
    );
    assert!(
        (kt - exact).abs() < 4.0 * st,
        "kl_token {kt} ± {st} vs exact {exact}"
    );
    assert!(
        (ks - kt).abs() < 4.0 * (ss * ss + st * st).sqrt(),
        "estimators disagree: {ks} vs {kt}"
    );
    assert!(
        st < ss,
        "the token-level estimator should have the lower variance: {st} vs {ss}"
    );

    // Without --base, log p0 comes from the samples' own logprob: the same kl_seq to f32 rounding.
    let only = json(&kl(
        &["--model", ft.to_str().unwrap(), s.to_str().unwrap(), "-q"],
        dir.path(),
    ));
    assert!(
        (only["kl_seq"].as_f64().unwrap() - ks).abs() < 1e-4,
        "{only}"
    );
    assert!(only.get("kl_token").is_none());

    // --max: a forgetting budget.
    let gate = |max: &str| {
        let (b, f, s) = (
            base.to_str().unwrap(),
            ft.to_str().unwrap(),
            s.to_str().unwrap(),
        );
        kl(
            &["--base", b, "--model", f, s, "--max", max, "-q"],
            dir.path(),
        )
    };
    let over = gate("0.001");
    assert_eq!(over.code, 1, "{over}");
    assert!(
        over.stderr.contains("kl_token =") && over.stderr.contains("exceeds --max 0.001"),
        "{over}"
    );
    let under = gate("100");
    assert_eq!(under.code, 0, "{under}");
}

#[test]
fn per_record_output_as_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture("qwen2");
    let s = samples(&m, dir.path(), &["-n", "7", "--max-tokens", "5"]);
    let m = m.to_str().unwrap();
    let out = kl(
        &[
            "--base",
            m,
            "--model",
            m,
            s.to_str().unwrap(),
            "--per-record",
            "terms.parquet",
            "-q",
        ],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{out}");
    json(&out);
    let recs: Vec<_> = cf_common::record::open(
        Some(dir.path().join("terms.parquet").to_str().unwrap()),
        Default::default(),
    )
    .unwrap()
    .map(|r| r.unwrap().1)
    .collect();
    assert_eq!(recs.len(), 7);
    for r in recs {
        assert_eq!(r["kl_seq"].as_f64(), Some(0.0));
        assert_eq!(r["logprob_base"], r["logprob_model"]);
        assert!(r["token_ids"].is_array() && r["kl_token"].is_number());
    }
}

#[test]
fn warnings_for_biased_or_cut_samples() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture("llama");
    let s = samples(
        &m,
        dir.path(),
        &["-n", "5", "--max-tokens", "3", "--temperature", "0.7"],
    );
    let m = m.to_str().unwrap();
    let out = kl(
        &["--base", m, "--model", m, s.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{out}");
    assert!(
        out.stderr.contains("were drawn tempered or truncated"),
        "{out}"
    );
    assert!(out.stderr.contains("were cut at the length limit"), "{out}");
}

#[test]
fn bad_records_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture("llama");
    let m = m.to_str().unwrap();
    std::fs::write(
        dir.path().join("bad.jsonl"),
        "{\"token_ids\": [5, 6], \"logprob\": -3}\n{\"token_ids\": [5, 999]}\n{\"other\": 1}\n",
    )
    .unwrap();
    let out = kl(&["--base", m, "--model", m, "bad.jsonl"], dir.path());
    assert_eq!(out.code, 2, "{out}");
    assert_eq!(
        out.stderr.trim(),
        "cf-kl: error: bad.jsonl:2: token_ids[1] = 999 is outside the vocabulary (0..336)"
    );
    let out = kl(
        &["--base", m, "--model", m, "bad.jsonl", "--skip-bad"],
        dir.path(),
    );
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(json(&out)["skipped"], 2);
    assert!(out.stderr.contains("skipped 2 bad records"), "{out}");
    std::fs::write(dir.path().join("none.jsonl"), "{\"other\": 1}\n").unwrap();
    let out = kl(&["--base", m, "--model", m, "none.jsonl"], dir.path());
    assert!(
        out.stderr
            .contains("none.jsonl:1: neither \"token_ids\" nor \"text\""),
        "{out}"
    );
    // Without --base the records must carry logprob.
    std::fs::write(dir.path().join("nolp.jsonl"), "{\"token_ids\": [5, 6]}\n").unwrap();
    let out = kl(&["--model", m, "nolp.jsonl"], dir.path());
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("nolp.jsonl:1: no \"logprob\" field; give --base"),
        "{out}"
    );
    // Text records are tokenised; stdin works as input.
    let out = run(
        "cf-kl",
        &["--base", m, "--model", m, "-q"],
        dir.path(),
        Some(b"{\"text\": \"Question: what is 2 plus 2?\"}\n"),
    );
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(json(&out)["n"], 1);
}
