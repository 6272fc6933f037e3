//! GPU checks, run by `just test-gpu` (`cargo test --release --features cuda gpu::`). Compiled
//! only with the `cuda` feature; each test returns early, saying so, where no CUDA device is
//! visible. Tolerances: f32 on the GPU as f32 on the CPU (1e-4 against float64 transformers:
//! cuBLAS sums in another order, and candle does not enable TF32 for f32 by default); bf16 as
//! the CPU bf16 bound (mean 0.05, worst 0.25 nats).

use crate::util::*;
use candle_core::{DType, Device, Tensor};
use cf_common::model::{Mode, Model};

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("gpu: no CUDA device ({e}); skipping");
            None
        }
    }
}

fn logprobs(m: &Model, seq: &[u32], dev: &Device) -> Vec<f64> {
    let ids = Tensor::new(seq, dev).unwrap().unsqueeze(0).unwrap();
    m.decoder
        .sequence_logprobs(&ids)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn gpu_logprobs_match_the_reference_in_f32_and_bf16() {
    let Some(dev) = gpu() else { return };
    for fam in FAMILIES {
        let r = reference(fam);
        let f32m = Model::load(
            fixture(fam).to_str().unwrap(),
            DType::F32,
            &dev,
            Mode::Infer,
        )
        .unwrap();
        let bf16m = Model::load(
            fixture(fam).to_str().unwrap(),
            DType::BF16,
            &dev,
            Mode::Infer,
        )
        .unwrap();
        let mut errs = Vec::new();
        for (seq, want) in r["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .zip(r["logprobs"].as_array().unwrap())
        {
            let (s, w) = (ids(seq), floats(want));
            let d = max_abs_diff(&logprobs(&f32m, &s, &dev), &w);
            assert!(d < 1e-4, "{fam}: GPU f32 max |Δ| = {d}");
            errs.extend(
                logprobs(&bf16m, &s, &dev)
                    .iter()
                    .zip(&w)
                    .map(|(a, b)| (a - b).abs()),
            );
        }
        let mean = errs.iter().sum::<f64>() / errs.len() as f64;
        let max = errs.iter().cloned().fold(0.0, f64::max);
        assert!(
            mean < 0.05 && max < 0.25,
            "{fam}: GPU bf16 mean |Δ| {mean}, max {max}"
        );
    }
}

#[test]
fn gpu_sampling_matches_the_cpu() {
    if gpu().is_none() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let m = fixture("llama3");
    let m = m.to_str().unwrap();
    let args = |dev: &'static str| {
        vec![
            "--model",
            m,
            "-n",
            "8",
            "--max-tokens",
            "20",
            "--temperature",
            "0",
            "--device",
            dev,
            "--dtype",
            "f32",
            "-q",
        ]
    };
    let (cpu, gpu) = (
        run("cf-sample", &args("cpu"), d.path(), None),
        run("cf-sample", &args("cuda"), d.path(), None),
    );
    assert_eq!(gpu.code, 0, "{gpu}");
    let toks = |out: &str| {
        out.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["token_ids"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(toks(&cpu.stdout), toks(&gpu.stdout));
    // Sampling at temperature 1 runs and is reproducible on the GPU.
    let a = run(
        "cf-sample",
        &[
            "--model",
            m,
            "-n",
            "16",
            "--max-tokens",
            "12",
            "--device",
            "cuda",
            "--seed",
            "4",
            "-q",
        ],
        d.path(),
        None,
    );
    let b = run(
        "cf-sample",
        &[
            "--model",
            m,
            "-n",
            "16",
            "--max-tokens",
            "12",
            "--device",
            "cuda",
            "--seed",
            "4",
            "-q",
        ],
        d.path(),
        None,
    );
    assert_eq!(a.code, 0, "{a}");
    assert_eq!(a.stdout, b.stdout);
}

/// The device sampler on CUDA tensors draws the host sampler's tokens (see
/// sample::the_device_sampler_draws_what_the_host_sampler_draws, its CPU twin), and at f32
/// cf-sample with --temperature 1 on the GPU draws what the CPU draws.
#[test]
fn gpu_device_sampler_draws_what_the_host_draws() {
    use cf_common::generate::{choose, draw_on_device, sample_rng, SamplingParams};
    use rand_chacha::rand_core::RngCore;
    let Some(dev) = gpu() else { return };
    let base = SamplingParams {
        temperature: 1.0,
        top_k: None,
        top_p: None,
        min_p: None,
        max_tokens: 1,
    };
    let modes = [
        base.clone(),
        SamplingParams {
            temperature: 0.0,
            ..base.clone()
        },
        SamplingParams {
            temperature: 0.7,
            top_k: Some(20),
            top_p: Some(0.8),
            min_p: Some(0.05),
            ..base.clone()
        },
    ];
    let (rows, vocab) = (64usize, 50_304usize);
    let mut g = sample_rng(5, 0);
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|_| (g.next_u32() as f32 / u32::MAX as f32 - 0.5) * 16.0)
        .collect();
    let t = Tensor::from_slice(&logits, (rows, vocab), &dev).unwrap();
    for p in &modes {
        let mut host: Vec<_> = (0..rows as u64).map(|i| sample_rng(9, i)).collect();
        let mut on_dev = host.clone();
        let got = draw_on_device(&t, on_dev.iter_mut().collect(), p).unwrap();
        for (r, rng) in host.iter_mut().enumerate() {
            let (tok, lp) = choose(&logits[r * vocab..(r + 1) * vocab], p, rng);
            assert_eq!(got[r].0, tok, "{p:?} row {r}");
            assert!(
                (got[r].1 - lp).abs() < 1e-9,
                "{p:?} row {r}: {} vs {lp}",
                got[r].1
            );
        }
    }
    let d = tempfile::tempdir().unwrap();
    let m = fixture("llama3");
    let args = |dev: &'static str| {
        vec![
            "--model",
            m.to_str().unwrap(),
            "-n",
            "24",
            "--max-tokens",
            "16",
            "--seed",
            "6",
            "--batch-size",
            "5",
            "--device",
            dev,
            "--dtype",
            "f32",
            "-q",
        ]
    };
    let (c, g) = (
        run("cf-sample", &args("cpu"), d.path(), None),
        run("cf-sample", &args("cuda"), d.path(), None),
    );
    assert_eq!(g.code, 0, "{g}");
    let toks = |out: &str| {
        out.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["token_ids"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(toks(&c.stdout), toks(&g.stdout));
}

#[test]
fn gpu_training_step_matches_pytorch_and_lora_trains() {
    if gpu().is_none() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let data = root().join("fixtures/train/tiny.jsonl");
    let m = fixture("llama");
    let mut args = vec![
        "--model",
        m.to_str().unwrap(),
        data.to_str().unwrap(),
        "-o",
        "out",
        "--device",
        "cuda",
        "--dtype",
        "f32",
        "-q",
    ];
    args.extend(ADAMW_REFERENCE_FLAGS);
    let r = run("cf-train", &args, d.path(), None);
    assert_eq!(r.code, 0, "{r}");
    let got = candle_core::safetensors::load(d.path().join("out/model.safetensors"), &Device::Cpu)
        .unwrap();
    let want = candle_core::safetensors::load(
        root().join("fixtures/train/adamw_reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (k, w) in &want {
        let diff = (&got[k] - w)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{k}: GPU AdamW max |Δ| {diff}");
    }
    let r = run(
        "cf-train",
        &[
            "--model",
            m.to_str().unwrap(),
            data.to_str().unwrap(),
            "-o",
            "lora",
            "--device",
            "cuda",
            "--dtype",
            "bf16",
            "--lora-rank",
            "4",
            "--lr",
            "1e-2",
            "--max-steps",
            "10",
            "--metrics",
            "m.jsonl",
            "-q",
        ],
        d.path(),
        None,
    );
    assert_eq!(r.code, 0, "{r}");
    let m: Vec<serde_json::Value> = std::fs::read_to_string(d.path().join("m.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(m[9]["loss"].as_f64().unwrap() < m[0]["loss"].as_f64().unwrap());
}
