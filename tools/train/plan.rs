//! `cf-train --plan`: the peak memory a run will need, from config.json and the flags alone
//! (no weights, no data), in parts. The model follows what cf-train allocates:
//!
//! - weights: full fine-tuning keeps f32 master weights (and, with `--dtype bf16`, a bf16 copy
//!   rebuilt each step); LoRA keeps the frozen base in the compute dtype and f32 adapters;
//!   `--exact-kl` adds a frozen copy of the original in the compute dtype;
//! - gradients: f32, one per trainable weight (plus, for a bf16 forward, the bf16 gradients of
//!   the cast weights; LoRA's frozen base weights get none);
//! - optimizer: AdamW's two f32 moments per trainable weight;
//! - activations: what one decoder layer keeps for its backward pass (norms, projections,
//!   rotated queries and keys, repeated keys and values, the MLP; the fused norm, rotary and
//!   SiLU·mul kernels keep no temporaries, attention keeps no probabilities),
//!   for every layer, or with `--gradient-checkpointing` each layer's input plus one layer's
//!   graph; and what attention's backward pass holds while it runs (on the CPU its kernel's
//!   gradients, on CUDA blocks of scores);
//! - loss: one chunk of logits and their gradient, the output weight's f32 gradient.
//!
//! The per-layer count is the code's own, scaled by a factor measured on CPU (see the README's
//! memory table: predicted against measured peak anonymous memory).

use crate::Args;
use anyhow::Result;
use cf_common::model::vocab_loss::chunk_rows;
use cf_common::model::Config;
use serde_json::{json, Value};

/// Measured over the code's own count of what a layer keeps for its backward pass (its
/// projections, norms, rotary temporaries, repeated keys and values, MLP; the count leaves
/// out some reshapes made contiguous): fitted on CPU runs of the small benchmark model
/// (scripts/bench_train_memory.sh) and checked on other shapes there.
const LINEAR_FACTOR: f64 = 1.22;
/// The same for candle's composed operations (CUDA), measured on CPU before the fused kernels.
const COMPOSED_FACTOR: f64 = 1.28;
/// Attention keeps no probabilities (model::attention). On CUDA its passes hold a block of
/// queries' scores, probabilities and their gradients: four f32 copies of (heads × 256 × T).
const BLOCK_COPIES: f64 = 4.0;
const BLOCK: f64 = 256.0;
/// The CPU kernel's tasks (model::flash) hold two f32 blocks of 64 queries' scores each.
const CPU_BLOCK: f64 = 64.0;

pub struct Part {
    pub name: &'static str,
    pub bytes: f64,
    pub note: String,
}

fn targets_of(args: &Args) -> Vec<String> {
    if args.lora_targets.iter().any(|t| t == "all") {
        crate::params::ALL_TARGETS.map(String::from).to_vec()
    } else {
        args.lora_targets.clone()
    }
}

pub fn plan(args: &Args, cfg: &Config) -> Result<Vec<Part>> {
    // The CPU runs the fused kernels; CUDA composes candle's operations (model::decoder).
    let cuda = args.model.device.starts_with("cuda");
    let dt = match args.model.dtype.as_deref() {
        Some(d) => cf_common::cli::parse_dtype(d)?.size_in_bytes() as f64,
        None if cuda => 2.0,
        None => 4.0,
    };
    let (h, i, v, l) = (
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.vocab_size as f64,
        cfg.num_layers as f64,
    );
    let (heads, q, kv) = (
        cfg.num_heads as f64,
        (cfg.num_heads * cfg.head_dim) as f64,
        (cfg.num_kv_heads * cfg.head_dim) as f64,
    );
    let t = args.max_length as f64;
    let b = match args.batch_tokens {
        Some(bt) => (bt as f64 / t).floor().max(1.0),
        None => args.batch_size as f64,
    };
    let n = b * t;
    let p = cfg.num_params() as f64;
    let embed = v * h * if cfg.tie_word_embeddings { 1.0 } else { 2.0 };
    let layer_params = (p - embed) / l.max(1.0);
    let ckpt = args.gradient_checkpointing;
    let mut parts = Vec::new();
    let mut part =
        |name: &'static str, bytes: f64, note: String| parts.push(Part { name, bytes, note });
    // Trainable parameters.
    let (trainable, lora_act) = match args.lora_rank {
        None => (p, 0.0),
        Some(r) => {
            let r = r as f64;
            let dims = |m: &str| match m {
                "q_proj" => (h, q),
                "k_proj" | "v_proj" => (h, kv),
                "o_proj" => (q, h),
                "gate_proj" | "up_proj" => (h, i),
                _ => (i, h),
            };
            let (mut params, mut act) = (0.0, 0.0);
            for m in targets_of(args) {
                let (inp, out) = dims(&m);
                params += r * (inp + out);
                // x·Aᵀ (n·r) and, with dropout, the mask and the dropped input (n·in each).
                act += n * r * 4.0
                    + if args.lora_dropout > 0.0 {
                        2.0 * n * inp * dt
                    } else {
                        0.0
                    };
            }
            (params * l, act)
        }
    };
    match args.lora_rank {
        None => {
            part("weights", 4.0 * p, format!("{p:.0} f32 master weights"));
            if dt < 4.0 {
                part("weights (compute copy)", dt * p, "cast every step".into());
            }
        }
        Some(_) => {
            part("weights", dt * p, format!("{p:.0} frozen base weights"));
            part(
                "weights (adapters)",
                4.0 * trainable,
                format!("{trainable:.0} LoRA parameters"),
            );
        }
    }
    if args.l2_init.is_some() && args.lora_rank.is_none() {
        part("weights (original, --l2-init)", 4.0 * p, "f32 copy".into());
    }
    if !args.exact_kl.is_empty() {
        part(
            "weights (original, --exact-kl)",
            dt * p,
            "frozen copy".into(),
        );
    }
    let mut grads = 4.0 * trainable;
    let mut gnote = "f32, one per trainable weight".to_string();
    if args.lora_rank.is_none() && dt < 4.0 {
        grads += dt * if ckpt { layer_params } else { p };
        gnote.push_str(", and of the compute copy");
    }
    // LoRA: the frozen base weights get no gradient (model::decoder's LoraLinear computes the
    // input's and the adapter's only; candle's matmul backward would compute and keep one for
    // every weight).
    part("gradients", grads, gnote);
    part("optimizer", 8.0 * trainable, "AdamW moments, f32".into());
    // One layer's saved tensors (the code's count; see decoder.rs and model::fused): the
    // residual stream, both norms' outputs, the attention and MLP outputs (6 n·h); q as
    // projected, made contiguous, rotated, the attention output and its contiguous copy (5 n·q);
    // k likewise and v projected and made contiguous (5 n·kv); gate, up and silu(gate)·up
    // (3 n·i). Attention keeps no probabilities on either device (model::attention).
    let (linear, factor, backward) = if cuda {
        // candle's composed norm, rotary and SiLU keep their temporaries (the count before the
        // fused kernels, with its CPU-measured factor); the attention op's GPU path also copies
        // q, k and v, casts them to f32 and repeats grouped keys per query head while it runs,
        // and holds blocks of scores, probabilities and their gradients.
        let linear = 9.0 * n * h + 8.0 * n * (q + 2.0 * kv) + 5.0 * n * q + 4.0 * n * i;
        let blocks = BLOCK_COPIES * b * heads * BLOCK.min(t) * t * 4.0;
        (linear, COMPOSED_FACTOR, blocks + (3.0 * dt + 12.0) * n * q)
    } else {
        let linear = 6.0 * n * h + 5.0 * n * q + 5.0 * n * kv + 3.0 * n * i;
        // The kernel's backward pass: dq and each query head's dk and dv (f32), the keys' and
        // values' gradients summed per group, and f32 working copies of its five inputs when
        // they are bf16/f16; its tasks' score blocks, per thread.
        let grads = 3.0 * n * q * 4.0 + 2.0 * n * kv * 4.0;
        let copies = if dt < 4.0 {
            (3.0 * n * q + 2.0 * n * kv) * 4.0
        } else {
            0.0
        };
        let threads = rayon::current_num_threads() as f64;
        let scratch = threads * 2.0 * CPU_BLOCK.min(t) * t * 4.0;
        (linear, LINEAR_FACTOR, grads + copies + scratch)
    };
    // Going back through the MLP, the gradients of silu(gate)·up and of gate and up (3 n·i)
    // live beside the layer's saved tensors: at long sequences on wide MLPs the largest
    // transient (measured: the Llama-3-8B shape at 8192 tokens was 17% over without it).
    // candle's backward pass sums each gradient into a fresh zero tensor (backprop.rs's
    // or_insert, then add), so while one of them is summed, a zero tensor and the sum of its
    // size exist beside it: 2 n·i more (heaptrack, the small model at 8192 positions: its heap
    // peak was 95 MB, about 2 n·i, over the prediction without this term).
    let backward = backward + 3.0 * n * i * dt + 2.0 * n * i * dt;
    let one_layer = factor * linear * dt + lora_act;
    let (acts, anote) = if ckpt {
        (
            l * n * h * dt + one_layer + backward,
            format!(
                "{l:.0} layer inputs + one layer's graph ({:.2} GB) and attention's backward pass ({:.2} GB)",
                one_layer / 1e9,
                backward / 1e9
            ),
        )
    } else {
        (
            l * one_layer + backward,
            format!(
                "{l:.0} layers × {:.2} GB, and attention's backward pass ({:.2} GB)",
                one_layer / 1e9,
                backward / 1e9
            ),
        )
    };
    part("activations", acts, anote);
    let rows = chunk_rows(cfg.vocab_size);
    let chunk = (rows as f64).min(n);
    let head_trainable = args.lora_rank.is_none();
    // A trainable output weight: besides its accumulated gradient (counted above), the loss's
    // f32 gradient of it, the backward pass's copy, and (embedding) the scattered gradient of
    // the token lookup and their sum live at once: measured ~4.5 (tied) or ~3.5 (untied)
    // vocab × hidden f32 tensors on OLMo-1B's shape.
    let head_copies = match (head_trainable, cfg.tie_word_embeddings) {
        (false, _) => 0.0,
        (true, true) => 4.5,
        (true, false) => 3.5,
    };
    // A chunk's vocabulary-sized f32 buffers: on the CPU, the next-token kernel's logits and
    // gradient (fused::nll_grad); elsewhere, and for the exact KL, candle's composition: logits,
    // log-probabilities, probabilities, the one-hot (or the frozen model's), their difference
    // and its scaled copy.
    let buffers = if !cuda && args.exact_kl.is_empty() {
        2.0
    } else {
        6.0
    };
    let loss = buffers * chunk * v * 4.0 + 2.0 * n * h * 4.0 + head_copies * v * h * 4.0;
    part(
        "loss",
        loss,
        format!(
            "{rows} rows of {v:.0} logits at a time ({buffers:.0} buffers), and the output weight's gradients"
        ),
    );
    Ok(parts)
}

pub fn report(args: &Args, cfg: &Config, parts: &[Part]) -> Value {
    let peak: f64 = parts.iter().map(|p| p.bytes).sum();
    let mut table = serde_json::Map::new();
    for p in parts {
        let e = table
            .entry(p.name.split(' ').next().unwrap_or(p.name).to_string())
            .or_insert(json!(0.0));
        *e = json!(e.as_f64().unwrap_or(0.0) + p.bytes);
    }
    json!({
        "peak_bytes": peak.round() as u64,
        "parts": table.into_iter().map(|(k, v)| (k, json!(v.as_f64().unwrap_or(0.0).round() as u64))).collect::<serde_json::Map<_, _>>(),
        "model": args.model.model,
        "parameters": cfg.num_params(),
        "layers": cfg.num_layers,
        "tokens_per_micro_batch": args.max_length * args.batch_tokens.map_or(args.batch_size, |bt| (bt / args.max_length).max(1)),
        "lora_rank": args.lora_rank,
        "gradient_checkpointing": args.gradient_checkpointing,
        "dtype": args.model.dtype.clone().unwrap_or(
            if args.model.device.starts_with("cuda") { "bf16" } else { "f32" }.into()
        ),
        "device": args.model.device,
    })
}

pub fn print_table(parts: &[Part]) {
    let peak: f64 = parts.iter().map(|p| p.bytes).sum();
    for p in parts {
        eprintln!(
            "cf-train: {:<32} {:>9.2} GB  {}",
            p.name,
            p.bytes / 1e9,
            p.note
        );
    }
    eprintln!("cf-train: {:<32} {:>9.2} GB", "peak", peak / 1e9);
}
