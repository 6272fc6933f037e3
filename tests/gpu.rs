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

/// The `token_ids` of each cf-sample record on stdout.
fn token_ids(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["token_ids"].clone())
        .collect()
}

/// cf-sample on the llama3 fixture in f32 with the same flags on the CPU and on the GPU: the
/// token ids of each.
fn sample_on_both(flags: &[&str]) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let d = tempfile::tempdir().unwrap();
    let m = fixture("llama3");
    let on = |dev: &str| {
        let mut a = vec![
            "--model",
            m.to_str().unwrap(),
            "--device",
            dev,
            "--dtype",
            "f32",
            "-q",
        ];
        a.extend_from_slice(flags);
        let r = run("cf-sample", &a, d.path(), None);
        assert_eq!(r.code, 0, "{dev}: {r}");
        token_ids(&r.stdout)
    };
    (on("cpu"), on("cuda"))
}

#[test]
fn gpu_sampling_matches_the_cpu() {
    if gpu().is_none() {
        return;
    }
    let (cpu, gpu) = sample_on_both(&["-n", "8", "--max-tokens", "20", "--temperature", "0"]);
    assert_eq!(cpu, gpu);
    let d = tempfile::tempdir().unwrap();
    let m = fixture("llama3");
    let m = m.to_str().unwrap();
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
    use cf_common::generate::{sample_rng, SamplingParams};
    use rand_chacha::rand_core::RngCore;
    let Some(dev) = gpu() else { return };
    let modes = [
        sampling(1.0),
        sampling(0.0),
        SamplingParams {
            top_k: Some(20),
            top_p: Some(0.8),
            min_p: Some(0.05),
            ..sampling(0.7)
        },
    ];
    let (rows, vocab) = (64usize, 50_304usize);
    let mut g = sample_rng(5, 0);
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|_| (g.next_u32() as f32 / u32::MAX as f32 - 0.5) * 16.0)
        .collect();
    let t = Tensor::from_slice(&logits, (rows, vocab), &dev).unwrap();
    for p in &modes {
        device_draws_match_host(&t, &logits, p, 9, 1e-9);
    }
    let (c, g) = sample_on_both(&[
        "-n",
        "24",
        "--max-tokens",
        "16",
        "--seed",
        "6",
        "--batch-size",
        "5",
    ]);
    assert_eq!(c, g);
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
