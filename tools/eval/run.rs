//! Running tasks and writing the report.

use crate::extract;
use crate::lmeval;
use crate::score::Scorer;
use crate::tasks::{self, Fields, GenDoc, McDoc, PplDoc, Task};
use crate::Args;
use anyhow::{anyhow, bail, Context, Result};
use cf_common::generate::{generate, sample_rng};
use cf_common::model::{Mode, Model};
use cf_common::progress::Progress;
use cf_common::record::{write_atomic, Output, Record, Writer};
use serde_json::{json, Map, Value};
use std::path::Path;

const TOOL: &str = "cf-eval";

fn mean_stderr(xs: &[f64]) -> (f64, Option<f64>) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, None);
    }
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, Some((var / n).sqrt()))
}

/// A metric under lm-eval's keys: `"NAME,FILTER"` and `"NAME_stderr,FILTER"` (the sample
/// standard deviation over √n, or "N/A" for one document, as lm-eval writes it).
fn put(m: &mut Map<String, Value>, name: &str, filter: &str, xs: &[f64]) {
    let (mean, se) = mean_stderr(xs);
    m.insert(format!("{name},{filter}"), json!(mean));
    m.insert(
        format!("{name}_stderr,{filter}"),
        se.map_or(json!("N/A"), |s| json!(s)),
    );
}

fn argmax(xs: &[f64]) -> usize {
    (0..xs.len()).fold(0, |b, i| if xs[i] > xs[b] { i } else { b })
}

/// Every document's log-likelihoods: one question at a time (`batch` 1: its context once for
/// all its choices), or `batch` rows at a time across questions.
fn score_docs(
    sc: &Scorer,
    name: &str,
    docs: &[McDoc],
    batch: usize,
    progress: &Progress,
) -> Result<Vec<Vec<crate::score::Ll>>> {
    if batch <= 1 {
        return docs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let r = sc
                    .loglikelihoods(&d.requests)
                    .with_context(|| format!("{name}: document {i}"));
                progress.inc(1);
                r
            })
            .collect();
    }
    // Documents in groups of about `batch` rows, so progress moves and memory stays bounded.
    let mut out = Vec::with_capacity(docs.len());
    let mut start = 0;
    while start < docs.len() {
        let (mut end, mut rows) = (start, 0);
        while end < docs.len() && (rows == 0 || rows + docs[end].requests.len() <= 8 * batch) {
            rows += docs[end].requests.len();
            end += 1;
        }
        let mut pairs = Vec::with_capacity(rows);
        for (i, d) in docs[start..end].iter().enumerate() {
            for (c, k) in &d.requests {
                pairs.push(
                    sc.encode_pair(c, k)
                        .with_context(|| format!("{name}: document {}", start + i))?,
                );
            }
        }
        let lls = sc
            .score_batched(&pairs, batch)
            .with_context(|| format!("{name}: documents {start}–{}", end - 1))?;
        let mut o = 0;
        for d in &docs[start..end] {
            out.push(lls[o..o + d.requests.len()].to_vec());
            o += d.requests.len();
        }
        progress.inc((end - start) as u64);
        start = end;
    }
    Ok(out)
}

fn multiple_choice(
    sc: &Scorer,
    name: &str,
    docs: &[McDoc],
    batch: usize,
    samples: &mut Vec<Record>,
    progress: &Progress,
) -> Result<Map<String, Value>> {
    let (mut acc, mut acc_norm, mut acc_bytes) = (Vec::new(), Vec::new(), Vec::new());
    let scored = score_docs(sc, name, docs, batch, progress)?;
    for ((i, d), lls) in docs.iter().enumerate().zip(scored) {
        let ll: Vec<f64> = lls.iter().map(|x| x.0).collect();
        let pred = argmax(&ll);
        let by_chars: Vec<f64> = ll
            .iter()
            .zip(&d.choices)
            .map(|(l, c)| l / c.chars().count() as f64)
            .collect();
        let by_bytes: Vec<f64> = ll
            .iter()
            .zip(&d.choices)
            .map(|(l, c)| l / c.len() as f64)
            .collect();
        let pred_norm = argmax(&by_chars);
        acc.push((pred == d.gold) as u8 as f64);
        acc_norm.push((pred_norm == d.gold) as u8 as f64);
        acc_bytes.push((argmax(&by_bytes) == d.gold) as u8 as f64);
        let mut r = Record::new();
        r.insert("task".into(), json!(name));
        r.insert("doc_id".into(), json!(i));
        r.insert("requests".into(), json!(d.requests));
        r.insert("loglikelihoods".into(), json!(ll));
        r.insert(
            "is_greedy".into(),
            json!(lls.iter().map(|x| x.1).collect::<Vec<_>>()),
        );
        r.insert("gold".into(), json!(d.gold));
        r.insert("pred".into(), json!(pred));
        r.insert("pred_norm".into(), json!(pred_norm));
        r.insert("acc".into(), json!(acc[i]));
        r.insert("acc_norm".into(), json!(acc_norm[i]));
        samples.push(r);
    }
    let mut m = Map::new();
    put(&mut m, "acc", "none", &acc);
    put(&mut m, "acc_norm", "none", &acc_norm);
    put(&mut m, "acc_bytes", "none", &acc_bytes);
    Ok(m)
}

fn perplexity(
    sc: &Scorer,
    name: &str,
    docs: &[PplDoc],
    samples: &mut Vec<Record>,
    progress: &Progress,
) -> Result<Map<String, Value>> {
    let (mut ll, mut toks, mut words, mut bytes) = (0.0, 0usize, 0usize, 0usize);
    for (i, d) in docs.iter().enumerate() {
        let (l, n) = sc
            .rolling(&d.scored)
            .with_context(|| format!("{name}: document {i}"))?;
        // lm-eval counts words and bytes on the original text (wikitext: before
        // detokenizing): len(re.split(r"\s+", doc)) and its UTF-8 length.
        let (w, b) = (lmeval::word_count(&d.counted), d.counted.len());
        ll += l;
        toks += n;
        words += w;
        bytes += b;
        let mut r = Record::new();
        r.insert("task".into(), json!(name));
        r.insert("doc_id".into(), json!(i));
        r.insert("loglikelihood".into(), json!(l));
        r.insert("tokens".into(), json!(n));
        r.insert("words".into(), json!(w));
        r.insert("bytes".into(), json!(b));
        samples.push(r);
        progress.inc(1);
    }
    let mut m = Map::new();
    let mut put_ppl = |k: &str, v: f64| {
        m.insert(format!("{k},none"), json!(v));
        m.insert(format!("{k}_stderr,none"), json!("N/A"));
    };
    put_ppl("word_perplexity", (-ll / words as f64).exp());
    put_ppl("byte_perplexity", (-ll / bytes as f64).exp());
    put_ppl(
        "bits_per_byte",
        -ll / (bytes as f64 * std::f64::consts::LN_2),
    );
    put_ppl("token_perplexity", (-ll / toks as f64).exp());
    m.insert("tokens".into(), json!(toks));
    Ok(m)
}

/// Few-shot examples for one task: lm-eval's default sampler, one `random.Random(1234)` per
/// task drawing `sample(pool, n)` for each document in order.
pub struct FewShot<'a> {
    pub pool: &'a [GenDoc],
    pub n: usize,
    pub rng: lmeval::PyRandom,
}

impl FewShot<'_> {
    /// The next document's examples as lm-eval's messages: (question, answer) pairs.
    fn next(&mut self) -> Vec<(&GenDoc, &str)> {
        let idx = self.rng.sample(self.pool.len(), self.n);
        idx.into_iter()
            .map(|i| (&self.pool[i], self.pool[i].answer.as_str()))
            .collect()
    }
}

/// The prompt lm-eval builds: plain text `q1 a1\n\n…qN aN\n\nq`, or with --chat the
/// conversation (few-shot as multi-turn, lm-eval's default with a chat template) through the
/// template with the generation prompt, then --prefix.
fn gen_prompt(args: &Args, model: &Model, shots: &[(&GenDoc, &str)], d: &GenDoc) -> Result<String> {
    let mut text = if args.chat {
        let tmpl = model
            .tok
            .chat_template
            .as_deref()
            .ok_or_else(|| anyhow!("--chat: the model has no chat template"))?;
        let mut msgs = Vec::new();
        for (q, a) in shots {
            msgs.push(json!({"role": "user", "content": q.prompt}));
            msgs.push(json!({"role": "assistant", "content": a}));
        }
        msgs.push(json!({"role": "user", "content": d.prompt}));
        cf_common::chat::render(
            tmpl,
            &Value::Array(msgs),
            true,
            model.tok.bos_token.as_deref(),
            model.tok.eos_token.as_deref(),
        )
        .with_context(|| model.tok.chat_template_from.clone())?
    } else {
        let mut t = String::new();
        for (q, a) in shots {
            t.push_str(&format!("{} {a}\n\n", q.prompt));
        }
        t + &d.prompt
    };
    if let Some(p) = &args.prefix {
        text.push_str(p);
    }
    Ok(text)
}

#[allow(clippy::too_many_arguments)]
fn generative(
    args: &Args,
    sc: &Scorer,
    name: &str,
    preset: Option<&str>,
    docs: &[GenDoc],
    mut fewshot: Option<FewShot>,
    samples: &mut Vec<Record>,
    progress: &Progress,
) -> Result<Map<String, Value>> {
    let model = sc.model;
    let params = args.sampling.params(0.0, args.max_tokens)?;
    // lm-eval keeps the prompt's last max_length - max_gen_toks tokens.
    let keep = sc
        .max_len
        .checked_sub(args.max_tokens)
        .filter(|&k| k > 0)
        .ok_or_else(|| {
            anyhow!(
                "--max-tokens {} leaves no room for a prompt in the model's {} positions",
                args.max_tokens,
                sc.max_len
            )
        })?;
    // lm-eval's `until`: the preset's stop strings (gsm8k's also with a chat template), then
    // the EOS text; the answer is cut before the first of them.
    let mut stops = args.stop.clone();
    if stops.is_empty() && preset == Some("gsm8k") {
        stops = vec!["Question:".into(), "</s>".into(), "<|im_end|>".into()];
    }
    if let Some(e) = model.tok.eos_token.as_ref().filter(|e| !e.is_empty()) {
        if !stops.contains(e) {
            stops.push(e.clone());
        }
    }
    let (mut strict_acc, mut flex_acc, mut cf_acc) = (Vec::new(), Vec::new(), Vec::new());
    let ks: Vec<usize> = (0..)
        .map(|e| 1usize << e)
        .take_while(|&k| k <= args.n)
        .collect();
    let mut pass: Vec<Vec<f64>> = vec![Vec::new(); ks.len()];
    let mut maj: Vec<Vec<f64>> = vec![Vec::new(); ks.len()];
    // Every document's prompt first (the few-shot sampler draws in document order), then all
    // answers decoded together: up to max(--batch-size, -n) at a time across documents, a
    // finished answer's place taken by the next (continuous batching). Answer j of document i
    // draws from stream i·n + j, whatever the batch.
    let mut prompts = Vec::with_capacity(docs.len());
    for d in docs {
        let shots = fewshot.as_mut().map(|f| f.next()).unwrap_or_default();
        let text = gen_prompt(args, model, &shots, d)?;
        let mut ids = sc.prompt_ids(&text, keep)?;
        if ids.is_empty() {
            ids = vec![sc.prefix()?];
        }
        prompts.push((text, ids));
    }
    let longest = prompts.iter().map(|p| p.1.len()).max().unwrap_or(1);
    let n = args.n;
    let jobs = prompts.iter().enumerate().flat_map(|(i, (_, ids))| {
        (0..n).map(move |j| (ids.clone(), sample_rng(args.seed, (i * n + j) as u64)))
    });
    let mut answers: Vec<Vec<Option<String>>> = vec![vec![None; n]; docs.len()];
    let mut left: Vec<usize> = vec![n; docs.len()];
    generate(
        &model.decoder,
        jobs,
        (args.batch_size as usize).max(n),
        longest,
        &params,
        &model.eos_ids,
        |job, g| {
            let end = g.tokens.len() - usize::from(g.finish == cf_common::generate::Finish::Eos);
            let mut s = model.tok.decode(&g.tokens[..end], true)?;
            if let Some(cut) = stops
                .iter()
                .filter(|st| !st.is_empty())
                .filter_map(|st| s.find(st.as_str()))
                .min()
            {
                s.truncate(cut);
            }
            let (i, j) = (job / n, job % n);
            answers[i][j] = Some(s);
            left[i] -= 1;
            if left[i] == 0 {
                progress.inc(1);
            }
            Ok(())
        },
        |_| {},
    )
    .with_context(|| model.files.dir.display().to_string())?;
    for (i, (d, ((text, _), outs))) in docs
        .iter()
        .zip(prompts.into_iter().zip(answers))
        .enumerate()
    {
        let outs: Vec<String> = outs.into_iter().map(|o| o.unwrap_or_default()).collect();
        // lm-eval's gsm8k filters and exact_match, against the whole reference.
        let strict: Vec<String> = outs.iter().map(|o| lmeval::gsm8k_strict(o)).collect();
        let flex: Vec<String> = outs.iter().map(|o| lmeval::gsm8k_flexible(o)).collect();
        let hit = |a: &String| lmeval::gsm8k_exact_match(a, &d.answer);
        let cs = strict.iter().filter(|a| hit(a)).count();
        let cfl = flex.iter().filter(|a| hit(a)).count();
        // cf's own: \boxed{}, else #### n, else the last number, compared by value with the
        // reference's final answer.
        let gold = extract::flexible(&d.answer).unwrap_or_else(|| d.answer.clone());
        let own: Vec<Option<String>> = outs.iter().map(|o| extract::flexible(o)).collect();
        let cc = own
            .iter()
            .filter(|a| a.as_deref().is_some_and(|a| extract::same_answer(a, &gold)))
            .count();
        strict_acc.push(cs as f64 / args.n as f64);
        flex_acc.push(cfl as f64 / args.n as f64);
        cf_acc.push(cc as f64 / args.n as f64);
        for (j, &k) in ks.iter().enumerate() {
            pass[j].push(extract::pass_at_k(args.n, cc, k));
            maj[j].push(extract::maj_at_k(&own, k, &gold) as u8 as f64);
        }
        let mut r = Record::new();
        r.insert("task".into(), json!(name));
        r.insert("doc_id".into(), json!(i));
        r.insert("prompt".into(), json!(text));
        r.insert("target".into(), json!(d.answer));
        r.insert("resps".into(), json!(outs));
        r.insert("strict-match".into(), json!(strict));
        r.insert("flexible-extract".into(), json!(flex));
        r.insert("cf-extract".into(), json!(own));
        r.insert("correct_strict".into(), json!(cs));
        r.insert("correct_flexible".into(), json!(cfl));
        r.insert("correct_cf".into(), json!(cc));
        samples.push(r);
    }
    let mut m = Map::new();
    put(&mut m, "exact_match", "strict-match", &strict_acc);
    put(&mut m, "exact_match", "flexible-extract", &flex_acc);
    put(&mut m, "exact_match", "cf-extract", &cf_acc);
    for (j, &k) in ks.iter().enumerate() {
        put(&mut m, &format!("pass@{k}"), "cf-extract", &pass[j]);
        put(&mut m, &format!("maj@{k}"), "cf-extract", &maj[j]);
    }
    m.insert("samples_per_problem".into(), json!(args.n));
    m.insert("sampling".into(), json!({"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k, "min_p": params.min_p, "max_tokens": args.max_tokens, "seed": args.seed}));
    Ok(m)
}

/// The stderr key of a metric key: lm-eval's "acc,none" → "acc_stderr,none" (cf-eval's
/// reports before 0.4.13's layout had "acc" → "acc_stderr").
fn stderr_key(metric: &str) -> String {
    match metric.split_once(',') {
        Some((m, f)) => format!("{m}_stderr,{f}"),
        None => format!("{metric}_stderr"),
    }
}

/// The before/after table: every metric both reports have (cf-eval's, or lm-eval's own
/// results file), with the change and its standard error (the two runs taken as independent).
fn compare(
    before: &Value,
    before_name: &str,
    after: &Map<String, Value>,
    log: &cf_common::cli::LogArgs,
) -> Value {
    let mut rows = Vec::new();
    let empty = Map::new();
    let theirs = before["results"].as_object().unwrap_or(&empty);
    for (task, a) in after {
        let Some(b) = theirs.get(task) else {
            continue;
        };
        for (metric, av) in a.as_object().into_iter().flatten() {
            if metric.contains("_stderr") {
                continue;
            }
            let (Some(x), Some(y)) = (b.get(metric).and_then(Value::as_f64), av.as_f64()) else {
                continue;
            };
            if ["tokens", "samples_per_problem", "sample_len"].contains(&metric.as_str()) {
                continue;
            }
            let se = |r: &Value| r.get(stderr_key(metric)).and_then(Value::as_f64);
            let dse = match (se(b), se(&Value::Object(a.as_object().unwrap().clone()))) {
                (Some(p), Some(q)) => Some((p * p + q * q).sqrt()),
                _ => None,
            };
            rows.push(json!({"task": task, "metric": metric, "before": x, "after": y, "delta": y - x, "delta_stderr": dse}));
        }
    }
    if rows.is_empty() {
        let names: Vec<&String> = theirs.keys().collect();
        let msg = format!(
            "--compare {before_name}: no task and metric in common (it has {names:?}; this run has {:?})",
            after.keys().collect::<Vec<_>>()
        );
        log.warn(TOOL, &msg);
        return json!({"rows": [], "note": msg});
    }
    if !log.quiet {
        eprintln!(
            "{TOOL}: {:<16} {:<30} {:>9} {:>9} {:>18}",
            "task", "metric", "before", "after", "change ± se"
        );
        for r in &rows {
            let se = r["delta_stderr"]
                .as_f64()
                .map_or(String::new(), |s| format!(" ± {s:.4}"));
            eprintln!(
                "{TOOL}: {:<16} {:<30} {:>9.4} {:>9.4} {:>+9.4}{se}",
                r["task"].as_str().unwrap_or_default(),
                r["metric"].as_str().unwrap_or_default(),
                r["before"].as_f64().unwrap_or_default(),
                r["after"].as_f64().unwrap_or_default(),
                r["delta"].as_f64().unwrap_or_default()
            );
        }
    }
    let accs: Vec<f64> = rows
        .iter()
        .filter(|r| r["metric"] == "acc,none" || r["metric"] == "acc")
        .filter_map(|r| r["delta"].as_f64())
        .collect();
    let forgetting = if accs.is_empty() {
        Value::Null
    } else {
        let mean = accs.iter().sum::<f64>() / accs.len() as f64;
        log.info(
            TOOL,
            format!(
                "mean change in acc over {} multiple-choice tasks: {mean:+.4}",
                accs.len()
            ),
        );
        json!({"mean_delta_acc": mean, "tasks": accs.len()})
    };
    json!({"rows": rows, "forgetting": forgetting})
}

pub fn run(args: &Args) -> Result<()> {
    let fields = Fields {
        context: args.context_field.clone(),
        choices: args.choices_field.clone(),
        gold: args.gold_field.clone(),
        delimiter: args.target_delimiter.clone(),
    };
    // Flags and outputs are checked before anything is read or loaded.
    if args.n == 0 {
        bail!("-n must be at least 1");
    }
    let t = args.sampling.params(0.0, args.max_tokens)?.temperature;
    if t == 0.0 && args.n > 1 {
        bail!(
            "-n {} with greedy decoding would repeat one answer: give --temperature or --sampling",
            args.n
        );
    }
    if args.num_fewshot > 0 && args.fewshot_file.is_none() {
        bail!(
            "--num-fewshot {} needs --fewshot-file (the task's few-shot split, e.g. gsm8k's train)",
            args.num_fewshot
        );
    }
    if let Some(o) = &args.output {
        cf_common::temp::check_writable(o, "-o")?;
    }
    if let Some(o) = &args.log_samples {
        Output::parse(Some(o))?;
        cf_common::temp::check_writable(o, "--log-samples")?;
    }
    let before: Option<Value> = match &args.compare {
        Some(p) => Some(
            serde_json::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("{p}: cannot read"))?,
            )
            .with_context(|| format!("{p}: not a cf-eval or lm-eval results file"))?,
        ),
        None => None,
    };
    let out = args.output.clone();
    let log_out = args
        .log_samples
        .as_deref()
        .map(|p| Output::parse(Some(p)))
        .transpose()?;
    // Tasks are read (and checked) before the model is loaded.
    let mut loaded: Vec<(String, Option<String>, String, Task)> = Vec::new();
    for spec in &args.tasks {
        let (preset, path) = match spec.split_once(':') {
            Some((p, f)) if tasks::PRESETS.contains(&p) => (Some(p.to_string()), f.to_string()),
            _ => (args.preset.clone(), spec.clone()),
        };
        if let Some(p) = &preset {
            if !tasks::PRESETS.contains(&p.as_str()) {
                bail!(
                    "--preset {p}: unknown (known: {})",
                    tasks::PRESETS.join(", ")
                );
            }
        }
        let mut name = preset.clone().unwrap_or_else(|| {
            Path::new(&path)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("task")
                .to_string()
        });
        // Two tasks of one name keep both: the later ones are numbered.
        if loaded.iter().any(|l| l.0 == name) {
            let base = name.clone();
            let mut k = 2;
            while loaded.iter().any(|l| l.0 == name) {
                name = format!("{base}_{k}");
                k += 1;
            }
            args.log.warn(
                TOOL,
                format!("two tasks are named {base:?}: {path} is reported as {name:?}"),
            );
        }
        let task = tasks::load(&path, preset.as_deref(), &fields, args.limit)?;
        loaded.push((name, preset, path, task));
    }
    let fewshot_pool: Option<Vec<GenDoc>> = match &args.fewshot_file {
        None => None,
        Some(f) => {
            let presets: Vec<Option<&str>> = loaded.iter().map(|l| l.1.as_deref()).collect();
            match tasks::load(f, presets[0], &fields, None)? {
                Task::Generative(d) if d.len() >= args.num_fewshot => Some(d),
                Task::Generative(d) => bail!("--fewshot-file {f}: {} documents, fewer than --num-fewshot {}", d.len(), args.num_fewshot),
                _ => bail!("--fewshot-file {f}: few-shot examples are for generative tasks (question and answer records)"),
            }
        }
    };
    let device = args.model.device()?;
    let dtype = args.model.dtype(&device)?;
    let load_t0 = std::time::Instant::now();
    let model = args.model.load(dtype, &device, Mode::Infer)?;
    args.log.detail(
        TOOL,
        model.describe_loaded(dtype, &device, load_t0.elapsed().as_secs_f64()),
    );
    let sc = Scorer::new(
        &model,
        args.add_bos_token,
        model.cfg.max_position_embeddings,
    )?;
    let (mut results, mut configs, mut versions, mut nshot) =
        (Map::new(), Map::new(), Map::new(), Map::new());
    let (mut better, mut nsamples) = (Map::new(), Map::new());
    let mut samples = Vec::new();
    for (name, preset, path, task) in &loaded {
        let t0 = std::time::Instant::now();
        let total = match task {
            Task::MultipleChoice(d) => d.len(),
            Task::Perplexity(d) => d.len(),
            Task::Generative(d) => d.len(),
        };
        let progress = Progress::new(
            TOOL,
            &format!("{name} documents"),
            Some(total as u64),
            &args.log,
        );
        let shots = match (task, &fewshot_pool) {
            (Task::Generative(_), Some(_)) => args.num_fewshot,
            _ => 0,
        };
        let (kind, n, mut m) = match task {
            Task::MultipleChoice(d) => (
                "multiple_choice",
                d.len(),
                multiple_choice(
                    &sc,
                    name,
                    d,
                    args.batch_size as usize,
                    &mut samples,
                    &progress,
                )?,
            ),
            Task::Perplexity(d) => (
                "loglikelihood_rolling",
                d.len(),
                perplexity(&sc, name, d, &mut samples, &progress)?,
            ),
            Task::Generative(d) => {
                let fs = fewshot_pool
                    .as_deref()
                    .filter(|_| shots > 0)
                    .map(|pool| FewShot {
                        pool,
                        n: shots,
                        rng: lmeval::PyRandom::new(1234),
                    });
                (
                    "generate_until",
                    d.len(),
                    generative(
                        args,
                        &sc,
                        name,
                        preset.as_deref(),
                        d,
                        fs,
                        &mut samples,
                        &progress,
                    )?,
                )
            }
        };
        progress.finish();
        args.log.info(
            TOOL,
            format!(
                "{name}: {n} documents in {:.1} s",
                t0.elapsed().as_secs_f64()
            ),
        );
        let mut entry = Map::new();
        entry.insert("name".into(), json!(name));
        entry.insert("alias".into(), json!(name));
        entry.insert("sample_len".into(), json!(n));
        entry.append(&mut m);
        let hib: Map<String, Value> = entry
            .keys()
            .filter_map(|k| k.split_once(',').map(|(m, _)| m))
            .filter(|m| !m.ends_with("_stderr"))
            .map(|m| {
                (
                    m.to_string(),
                    json!(!m.contains("perplexity") && m != "bits_per_byte"),
                )
            })
            .collect();
        better.insert(name.clone(), Value::Object(hib));
        results.insert(name.clone(), Value::Object(entry));
        nsamples.insert(name.clone(), json!({"original": n, "effective": n}));
        configs.insert(name.clone(), json!({
            "task": name, "file": path, "preset": preset, "output_type": kind, "num_fewshot": shots,
            "fewshot_file": if shots > 0 { json!(args.fewshot_file) } else { Value::Null },
            "target_delimiter": args.target_delimiter, "add_bos_token": args.add_bos_token, "limit": args.limit,
        }));
        versions.insert(name.clone(), json!(1.0));
        nshot.insert(name.clone(), json!(shots));
    }
    let mut report = json!({
        "results": results, "group_subtasks": {}, "configs": configs, "versions": versions, "n-shot": nshot,
        "higher_is_better": better, "n-samples": nsamples,
        "config": {"model": "cf", "model_args": {"pretrained": args.model.model, "dtype": format!("{dtype:?}").to_lowercase(), "add_bos_token": args.add_bos_token}, "limit": args.limit, "fewshot_seed": 1234},
        "max_length": model.cfg.max_position_embeddings,
        "model_name": args.model.model, "cf_version": env!("CARGO_PKG_VERSION"),
    });
    if let (Some(b), Some(p)) = (&before, &args.compare) {
        report["compare"] = compare(b, p, report["results"].as_object().unwrap(), &args.log);
    }
    // All outputs are finished into temporary files first and renamed together at the end.
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(o) = &log_out {
        let mut w = Writer::create(o)?;
        for s in &samples {
            w.write(s)?;
        }
        w.finish()?;
    }
    match out {
        Some(p) => write_atomic(Path::new(&p), text.as_bytes())?,
        None => {
            use std::io::Write;
            let mut so = cf_common::exit::stdout()?.lock();
            writeln!(so, "{text}")?;
            so.flush()?;
        }
    }
    Ok(())
}
