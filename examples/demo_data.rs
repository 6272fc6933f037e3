//! Data for the forgetting demo (examples/forgetting): a procedural world the base model learns,
//! and a new task it cannot do. Everything is generated from a fixed seed; nothing is
//! downloaded.
//!
//!     cargo run --release --example demo_data -- OUT
//!
//! Writes to OUT:
//!   corpus.jsonl       the base model's training text: the capitals of 200 made-up countries,
//!                      sums of numbers below 20, and short stories in a few styles
//!   base-init/         a randomly initialised Llama-style model (2 layers, ~0.5M parameters)
//!                      with a byte-level BPE tokenizer trained on the corpus, for cf-train to
//!                      pretrain
//!   old_capitals.jsonl, old_sums.jsonl
//!                      zero-shot multiple-choice suites (200 questions each, cf-eval's format)
//!                      on what the base knows; the 200 sums are held out from the corpus
//!   new_train.jsonl    the new task, prompt/completion: the jobs of 200 made-up people (a job
//!                      follows from the last syllable of the name)
//!   new_eval.jsonl     the new task as multiple choice, on 200 other people
//!   new_prompts.jsonl  the training prompts alone (for contextual synthetic data)
//!   replay.jsonl       half of the base's own corpus (the replay baseline)

use anyhow::Result;
use candle_core::{Device, Tensor};
use cf_common::model::{save::save_safetensors, Config, Decoder};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use tokenizers::models::bpe::BpeTrainerBuilder;
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

const CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024,
"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
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

const SYLLABLES: [&str; 24] = [
    "ka", "lo", "mi", "ra", "ven", "dor", "sa", "tu", "pel", "zor", "ni", "qua", "bri", "fen",
    "go", "lis", "mar", "te", "run", "vi", "hal", "os", "du", "win",
];

fn name(r: &mut Rng, syllables: usize) -> String {
    let mut s: String = (0..syllables).map(|_| *r.pick(&SYLLABLES)).collect();
    s[..1].make_ascii_uppercase();
    s
}

/// `n` distinct names, none of them in `taken`.
fn distinct(r: &mut Rng, n: usize, syllables: usize, taken: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    while out.len() < n {
        let x = name(r, syllables);
        if !out.contains(&x) && !taken.contains(&x) {
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

fn shuffle<T>(r: &mut Rng, xs: &mut [T]) {
    for i in (1..xs.len()).rev() {
        let j = r.below(i + 1);
        xs.swap(i, j);
    }
}

/// Questions per skill (each evaluation set), and how often the base's corpus repeats a fact.
const QUESTIONS: usize = 200;
const CAPITAL_REPEATS: usize = 3;
const SUM_REPEATS: usize = 1;
const STORIES: usize = 200;

fn main() -> Result<()> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "out/demo".into());
    let out = Path::new(&out);
    std::fs::create_dir_all(out)?;
    let mut r = Rng(ChaCha8Rng::seed_from_u64(2026));

    let countries = distinct(&mut r, QUESTIONS, 2, &[]);
    let cities = distinct(&mut r, QUESTIONS, 2, &countries);
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
    // Sums a + b with a, b < 20: half the pairs are taught, the other half are the evaluation.
    let mut pairs: Vec<(usize, usize)> =
        (0..20).flat_map(|a| (0..20).map(move |b| (a, b))).collect();
    shuffle(&mut r, &mut pairs);
    let (held, seen) = pairs.split_at(QUESTIONS);

    let mut corpus = Vec::new();
    for _ in 0..CAPITAL_REPEATS {
        for (c, city) in countries.iter().zip(&cities) {
            corpus.push(format!("The capital of {c} is {city}."));
        }
    }
    for _ in 0..SUM_REPEATS {
        for (a, b) in seen {
            corpus.push(format!("{a} plus {b} is {}.", a + b));
        }
    }
    for _ in 0..STORIES {
        let (opening, who, did) = r.pick(&styles);
        corpus.push(format!("{opening}, {} {}.", r.pick(who), r.pick(did)));
    }
    // Shuffle the lines so an epoch mixes the three kinds.
    shuffle(&mut r, &mut corpus);
    write(
        &out.join("corpus.jsonl"),
        &corpus
            .iter()
            .map(|t| json!({"text": t}))
            .collect::<Vec<_>>(),
    )?;
    let replay: Vec<_> = corpus
        .iter()
        .step_by(2)
        .map(|t| json!({"text": t}))
        .collect();
    write(&out.join("replay.jsonl"), &replay)?;

    let capitals: Vec<_> = countries
        .iter()
        .zip(&cities)
        .map(|(c, city)| mc(&mut r, format!("The capital of {c} is"), city, &cities))
        .collect();
    write(&out.join("old_capitals.jsonl"), &capitals)?;
    let numbers: Vec<String> = (0..39).map(|n| n.to_string()).collect();
    let sums: Vec<_> = held
        .iter()
        .map(|(a, b)| {
            mc(
                &mut r,
                format!("{a} plus {b} is"),
                &(a + b).to_string(),
                &numbers,
            )
        })
        .collect();
    write(&out.join("old_sums.jsonl"), &sums)?;

    // The new task: people and their jobs, a kind of fact the base has never seen. A person's
    // job follows from the last syllable of their name, a rule the fine-tune can learn: it trains
    // on some people and is evaluated on others.
    let mut taken = countries.clone();
    taken.extend(cities.iter().cloned());
    let all_people = distinct(&mut r, 2 * QUESTIONS, 3, &taken);
    let jobs: Vec<String> = ["baker", "teacher", "farmer", "king", "robot", "fox"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let job_of = |p: &str| -> String {
        let last = SYLLABLES
            .iter()
            .position(|s| p.ends_with(s))
            .expect("a name ends with a syllable");
        jobs[last % jobs.len()].clone()
    };
    let (people, eval_people) = all_people.split_at(QUESTIONS);
    let assigned: Vec<String> = people.iter().map(|p| job_of(p)).collect();
    let train: Vec<_> = people
        .iter()
        .zip(&assigned)
        .map(|(p, j)| json!({"prompt": format!("{p} is the"), "completion": format!(" {j}.")}))
        .collect();
    write(&out.join("new_train.jsonl"), &train)?;
    let eval: Vec<_> = eval_people
        .iter()
        .map(|p| {
            let j = job_of(p);
            mc(&mut r, format!("{p} is the"), &j, &jobs)
        })
        .collect();
    write(&out.join("new_eval.jsonl"), &eval)?;
    write(
        &out.join("new_prompts.jsonl"),
        &people
            .iter()
            .map(|p| json!({"prompt": format!("{p} is the")}))
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
    // The world's own tokenizer: byte-level BPE, as real models have, trained on the base's
    // corpus (not the new task), with the project's test tokenizer's special tokens and
    // post-processor (BOS first).
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/llama");
    let mut tok = Tokenizer::from_file(fx.join("tokenizer.json")).map_err(anyhow::Error::msg)?;
    let specials = [
        "<|endoftext|>",
        "<s>",
        "</s>",
        "<pad>",
        "<think>",
        "</think>",
        "<|im_start|>",
        "<|im_end|>",
    ];
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(cfg.vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tok.train(&mut trainer, corpus.iter())
        .map_err(anyhow::Error::msg)?;
    tok.save(init.join("tokenizer.json"), false)
        .map_err(anyhow::Error::msg)?;
    for f in ["tokenizer_config.json", "generation_config.json"] {
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
