//! Decoder throughput on CPU for a ~25M-parameter Llama config: full-sequence forward tokens/s
//! and KV-cache decode tokens/s at a few batch sizes. Writes the random model it measures to
//! `OUT/model` (so transformers can be measured on the very same weights, see
//! scripts/bench_transformers.py) and the numbers to `OUT/rust.json`.
//!
//!     cargo run --release --example bench_decoder -- OUT

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use cf_common::model::{save::save_safetensors, Config, Decoder, KvCache, Mode, Model};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

const CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8192,
"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 6, "num_attention_heads": 8,
"num_key_value_heads": 4, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
"tie_word_embeddings": false, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}"#;

fn make_model(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), CONFIG)?;
    let cfg = Config::parse(CONFIG)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut tensors = HashMap::new();
    for (name, shape) in Decoder::parameter_shapes(&cfg) {
        let n: usize = shape.iter().product();
        let std = if name.ends_with("norm.weight") {
            0.0
        } else {
            0.5 / (*shape.last().unwrap() as f32).sqrt()
        };
        // Uniform with the given standard deviation; norms at 1.
        let v: Vec<f32> = (0..n)
            .map(|_| {
                if std == 0.0 {
                    1.0
                } else {
                    ((rng.next_u32() as f32 / u32::MAX as f32) - 0.5) * std * 12f32.sqrt()
                }
            })
            .collect();
        tensors.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?);
    }
    save_safetensors(&tensors, &dir.join("model.safetensors"))?;
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/llama");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fx.join(f), dir.join(f))?;
    }
    Ok(())
}

/// Run `f` until at least `min_secs` have passed (and at least twice), after one warm-up;
/// return seconds per call.
fn time(min_secs: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let (t0, mut n) = (Instant::now(), 0);
    while n < 2 || t0.elapsed().as_secs_f64() < min_secs {
        f()?;
        n += 1;
    }
    Ok(t0.elapsed().as_secs_f64() / n as f64)
}

fn main() -> Result<()> {
    // The tools' allocator settings (cf_common::exit), so the numbers are theirs.
    cf_common::exit::threads_from_env();
    cf_common::exit::allocator_reuse();
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "out/bench".into());
    let out = Path::new(&out);
    let dir = out.join("model");
    make_model(&dir)?;
    let dev = Device::Cpu;
    let m = Model::load(dir.to_str().unwrap(), DType::F32, &dev, Mode::Infer)?;
    let d = &m.decoder;
    eprintln!(
        "bench: {} parameters, {} threads",
        m.cfg.num_params(),
        candle_core::utils::get_num_threads()
    );
    let mut rows = Vec::new();
    let t = 128;
    for b in [1usize, 4, 16] {
        let ids = Tensor::from_vec(
            (0..b * t)
                .map(|i| (i * 7919 % 8000) as u32)
                .collect::<Vec<_>>(),
            (b, t),
            &dev,
        )?;
        let s = time(2.0, || {
            d.forward_hidden(&ids, None)?
                .sum_all()?
                .to_scalar::<f32>()?;
            Ok(())
        })?;
        let tps = (b * t) as f64 / s;
        eprintln!("bench: forward  batch {b:>2} x {t}: {tps:>9.0} tokens/s");
        rows.push(
            serde_json::json!({"what": "forward", "batch": b, "seq": t, "tokens_per_s": tps}),
        );
    }
    let steps = 64;
    for b in [1usize, 8, 32] {
        let s = time(2.0, || {
            let mut cache = KvCache::new(m.cfg.num_layers, steps + 1);
            let mut ids = Tensor::from_vec(vec![1u32; b], (b, 1), &dev)?;
            for _ in 0..steps {
                let h = d.forward_hidden(&ids, Some(&mut cache))?;
                ids = d.logits(&h.squeeze(1)?)?.argmax(1)?.unsqueeze(1)?;
            }
            ids.to_vec2::<u32>()?;
            Ok(())
        })?;
        let tps = (b * steps) as f64 / s;
        eprintln!("bench: decode   batch {b:>2} x {steps} steps: {tps:>9.0} tokens/s");
        rows.push(
            serde_json::json!({"what": "decode", "batch": b, "steps": steps, "tokens_per_s": tps}),
        );
    }
    std::fs::write(out.join("rust.json"), serde_json::to_string_pretty(&rows)?)?;
    Ok(())
}
