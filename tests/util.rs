//! Helpers shared by the test modules.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const FAMILIES: [&str; 5] = ["llama", "llama3", "olmo", "olmo2", "qwen2"];

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("fixtures").join("models").join(name)
}

pub fn reference(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// cf-train flags for the settings of scripts/make_train_reference.py (two AdamW steps on
/// fixtures/train/tiny.jsonl as one batch), whose result is fixtures/train/adamw_reference.*.
pub const ADAMW_REFERENCE_FLAGS: [&str; 18] = [
    "--lr",
    "1e-3",
    "--adam-beta1",
    "0.9",
    "--adam-beta2",
    "0.95",
    "--adam-eps",
    "1e-6",
    "--weight-decay",
    "0.1",
    "--max-grad-norm",
    "1",
    "--max-steps",
    "2",
    "--batch-size",
    "3",
    "--schedule",
    "constant",
];

/// Path of one of the cf binaries built for this test run.
pub fn bin(name: &str) -> PathBuf {
    let mut p = PathBuf::from(env!("CARGO_BIN_EXE_cf-sample"));
    p.set_file_name(name);
    p
}

/// The result of running a tool.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Run `tool args` in `dir` with `stdin`, and collect everything.
pub fn run(tool: &str, args: &[&str], dir: &Path, stdin: Option<&[u8]>) -> Run {
    run_env(tool, args, dir, stdin, &[])
}

/// [`run`] with extra environment variables.
pub fn run_env(
    tool: &str,
    args: &[&str],
    dir: &Path,
    stdin: Option<&[u8]>,
    env: &[(&str, &str)],
) -> Run {
    let mut child = Command::new(bin(tool))
        .envs(env.iter().cloned())
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        let mut s = child.stdin.take().unwrap();
        s.write_all(input).unwrap();
    }
    let out: Output = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// A copy of fixture `name` in `dir` with every weight moved by uniform noise of standard
/// deviation `std` (a stand-in for a fine-tuned model).
pub fn perturbed_model(name: &str, dir: &Path, std: f32, seed: u64) -> PathBuf {
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    let out = dir.join(format!("{name}-perturbed"));
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), out.join(e.file_name())).unwrap();
    }
    let dev = candle_core::Device::Cpu;
    let mut t = candle_core::safetensors::load(out.join("model.safetensors"), &dev).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut names: Vec<String> = t.keys().cloned().collect();
    names.sort();
    for n in names {
        let w = &t[&n];
        let noise: Vec<f32> = (0..w.elem_count())
            .map(|_| ((rng.next_u32() as f32 / u32::MAX as f32) - 0.5) * std * 12f32.sqrt())
            .collect();
        let noise = candle_core::Tensor::from_vec(noise, w.shape(), &dev).unwrap();
        let moved = (w + noise).unwrap();
        t.insert(n, moved);
    }
    cf_common::model::save::save_safetensors(&t, &out.join("model.safetensors")).unwrap();
    out
}

/// The largest |x| of a tensor, in f64.
pub fn tensor_max_abs(t: &candle_core::Tensor) -> f64 {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The largest |a − b| over two tensors of one shape, in f64.
pub fn tensor_max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    use candle_core::DType;
    tensor_max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
}

/// A safetensors file's tensors, on the CPU.
pub fn weights(p: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap()
}

/// `n` short question/answer texts as d.jsonl in `dir` (cf-train's `text` layout).
pub fn text_data(dir: &Path, n: usize) {
    let lines: String = (0..n)
        .map(|i| {
            serde_json::json!({"text": format!("Question: what is {i} plus {i}? Answer: {}.", 2 * i)})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.join("d.jsonl"), lines).unwrap();
}

/// Sampling at temperature `t`, no truncation, one token.
pub fn sampling(t: f64) -> cf_common::generate::SamplingParams {
    cf_common::generate::SamplingParams {
        temperature: t,
        top_k: None,
        top_p: None,
        min_p: None,
        max_tokens: 1,
    }
}

/// One draw per row of `logits` (rows × vocab, row-major; `t` is the same values on the
/// device under test) with the device sampler and with the host sampler, row r from stream r
/// of `seed`: asserts the same tokens, log-probs within `tol` and the streams advanced alike.
/// Returns the tokens.
pub fn device_draws_match_host(
    t: &candle_core::Tensor,
    logits: &[f32],
    p: &cf_common::generate::SamplingParams,
    seed: u64,
    tol: f64,
) -> Vec<u32> {
    use cf_common::generate::{choose, draw_on_device, sample_rng};
    use rand_chacha::rand_core::RngCore;
    let (rows, vocab) = t.dims2().unwrap();
    let mut host: Vec<_> = (0..rows as u64).map(|i| sample_rng(seed, i)).collect();
    let mut dev = host.clone();
    let got = draw_on_device(t, dev.iter_mut().collect(), p).unwrap();
    for (r, rng) in host.iter_mut().enumerate() {
        let (tok, lp) = choose(&logits[r * vocab..(r + 1) * vocab], p, rng);
        assert_eq!(got[r].0, tok, "vocab {vocab} {p:?} row {r} seed {seed}");
        assert!(
            (got[r].1 - lp).abs() < tol,
            "{p:?} row {r}: log-prob {} vs {lp}",
            got[r].1
        );
    }
    // One uniform per draw, none when greedy.
    assert_eq!(host[rows - 1].next_u64(), dev[rows - 1].next_u64());
    got.into_iter().map(|g| g.0).collect()
}
