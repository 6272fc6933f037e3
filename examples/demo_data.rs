//! Data for the forgetting demo (examples/forgetting): a procedural world the base model learns,
//! and a new task it cannot do. Everything is generated from a fixed seed; nothing is
//! downloaded.
//!
//!     cargo run --release --example demo_data -- OUT
//!
//! Writes to OUT:
//!   corpus.jsonl       the base model's training text: capitals of made-up countries, sums of
//!                      small numbers, and short stories in a few styles
//!   base-init/         a randomly initialised Llama-style model (~0.8M parameters) with the
//!                      project's test tokenizer, for cf-train to pretrain
//!   old_capitals.jsonl, old_sums.jsonl
//!                      zero-shot multiple-choice suites on what the base knows (cf-eval's format);
//!                      the sums are held out from the corpus
//!   new_train.jsonl    the new task, prompt/completion: the jobs of made-up people
//!   new_eval.jsonl     the new task as multiple choice
//!   new_prompts.jsonl  the new task's prompts alone (for contextual synthetic data)
//!   replay.jsonl       a slice of the base's own corpus (the replay baseline)

use anyhow::Result;
use candle_core::{Device, Tensor};
use cf_common::model::{save::save_safetensors, Config, Decoder};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

const CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 336,
"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
"num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
"tie_word_embeddings": true, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}"#;

struct Rng(ChaCha8Rng);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    fn uniform(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn name(r: &mut Rng, syllables: usize) -> String {
    const S: [&str; 16] = [
        "ka", "lo", "mi", "ra", "ven", "dor", "sa", "tu", "pel", "zor", "ni", "qua", "bri", "fen",
        "go", "lis",
    ];
    let mut s: String = (0..syllables).map(|_| *r.pick(&S)).collect();
    s[..1].make_ascii_uppercase();
    s
}

fn distinct(r: &mut Rng, n: usize, syllables: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    while out.len() < n {
        let x = name(r, syllables);
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

fn write(path: &Path, rows: &[serde_json::Value]) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in rows {
        writeln!(f, "{r}")?;
    }
    Ok(())
}

/// Three choices: the answer and two others from `pool`, shuffled.
fn mc(r: &mut Rng, context: String, answer: &str, pool: &[String]) -> serde_json::Value {
    let mut choices = vec![answer.to_string()];
    while choices.len() < 3 {
        let c = r.pick(pool).clone();
        if !choices.contains(&c) {
            choices.push(c);
        }
    }
    for i in (1..choices.len()).rev() {
        let j = r.below(i + 1);
        choices.swap(i, j);
    }
    let gold = choices.iter().position(|c| c == answer).unwrap();
    json!({"context": context, "choices": choices, "gold": gold})
}

fn main() -> Result<()> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "out/demo".into());
    let out = Path::new(&out);
    std::fs::create_dir_all(out)?;
    let mut r = Rng(ChaCha8Rng::seed_from_u64(2026));

    let countries = distinct(&mut r, 24, 2);
    let cities: Vec<String> = distinct(&mut r, 48, 2)
        .into_iter()
        .filter(|c| !countries.contains(c))
        .take(24)
        .collect();
    let styles = [
        (
            "Once upon a time",
            ["a fox", "a small bird", "an old king", "a robot"],
            [
                "found a key",
                "lost its way",
                "sang a song",
                "built a house",
            ],
        ),
        (
            "In the morning",
            ["the baker", "my friend", "the teacher", "a farmer"],
            [
                "opened the door",
                "walked to town",
                "read a book",
                "fed the cows",
            ],
        ),
    ];
    // Sums a + b with a, b < 10; every fourth pair is held out for the evaluation.
    let pairs: Vec<(usize, usize)> = (0..10).flat_map(|a| (0..10).map(move |b| (a, b))).collect();
    let (held, seen): (Vec<_>, Vec<_>) = pairs.iter().enumerate().partition(|(i, _)| i % 4 == 0);

    let mut corpus = Vec::new();
    for _ in 0..6 {
        for (c, city) in countries.iter().zip(&cities) {
            corpus.push(format!("The capital of {c} is {city}."));
        }
    }
    for _ in 0..3 {
        for (_, (a, b)) in &seen {
            corpus.push(format!("{a} plus {b} is {}.", a + b));
        }
    }
    for _ in 0..120 {
        let (opening, who, did) = r.pick(&styles);
        corpus.push(format!("{opening}, {} {}.", r.pick(who), r.pick(did)));
    }
    // Shuffle the lines so an epoch mixes the three kinds.
    for i in (1..corpus.len()).rev() {
        let j = r.below(i + 1);
        corpus.swap(i, j);
    }
    write(
        &out.join("corpus.jsonl"),
        &corpus
            .iter()
            .map(|t| json!({"text": t}))
            .collect::<Vec<_>>(),
    )?;
    let replay: Vec<_> = corpus
        .iter()
        .step_by(4)
        .map(|t| json!({"text": t}))
        .collect();
    write(&out.join("replay.jsonl"), &replay)?;

    let capitals: Vec<_> = countries
        .iter()
        .zip(&cities)
        .map(|(c, city)| mc(&mut r, format!("The capital of {c} is"), city, &cities))
        .collect();
    write(&out.join("old_capitals.jsonl"), &capitals)?;
    let numbers: Vec<String> = (0..19).map(|n| n.to_string()).collect();
    let sums: Vec<_> = held
        .iter()
        .map(|(_, (a, b))| {
            mc(
                &mut r,
                format!("{a} plus {b} is"),
                &(a + b).to_string(),
                &numbers,
            )
        })
        .collect();
    write(&out.join("old_sums.jsonl"), &sums)?;

    // The new task: people and their jobs, a kind of fact the base has never seen.
    let people = distinct(&mut r, 30, 3);
    let jobs: Vec<String> = ["painter", "sailor", "doctor", "farmer", "baker", "pilot"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let assigned: Vec<String> = people.iter().map(|_| r.pick(&jobs).clone()).collect();
    let train: Vec<_> = people
        .iter()
        .zip(&assigned)
        .map(|(p, j)| json!({"prompt": format!("{p} works as a"), "completion": format!(" {j}.")}))
        .collect();
    write(&out.join("new_train.jsonl"), &train)?;
    let eval: Vec<_> = people
        .iter()
        .zip(&assigned)
        .map(|(p, j)| mc(&mut r, format!("{p} works as a"), j, &jobs))
        .collect();
    write(&out.join("new_eval.jsonl"), &eval)?;
    write(
        &out.join("new_prompts.jsonl"),
        &people
            .iter()
            .map(|p| json!({"prompt": format!("{p} works as a")}))
            .collect::<Vec<_>>(),
    )?;

    // The base model before pretraining: small random weights, unit norms.
    let init = out.join("base-init");
    std::fs::create_dir_all(&init)?;
    std::fs::write(init.join("config.json"), CONFIG)?;
    let cfg = Config::parse(CONFIG)?;
    let mut tensors = HashMap::new();
    for (n, shape) in Decoder::parameter_shapes(&cfg) {
        let count: usize = shape.iter().product();
        let v: Vec<f32> = if n.ends_with("norm.weight") {
            vec![1.0; count]
        } else {
            (0..count)
                .map(|_| ((r.uniform() * 2.0 - 1.0) * 0.02 * 3f64.sqrt()) as f32)
                .collect()
        };
        tensors.insert(n, Tensor::from_vec(v, shape, &Device::Cpu)?);
    }
    save_safetensors(&tensors, &init.join("model.safetensors"))?;
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/llama");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(fx.join(f), init.join(f))?;
    }
    eprintln!(
        "demo_data: {} corpus lines, {} capitals, {} held-out sums, {} new-task facts in {}",
        corpus.len(),
        capitals.len(),
        sums.len(),
        train.len(),
        out.display()
    );
    Ok(())
}
