//! Running tasks and writing the report.

use crate::extract;
use crate::score::Scorer;
use crate::tasks::{self, Fields, GenDoc, McDoc, Task};
use crate::Args;
use anyhow::{anyhow, bail, Context, Result};
use cf_common::generate::{generate, sample_rng, SamplingParams};
use cf_common::model::{Mode, Model};
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

fn put(m: &mut Map<String, Value>, name: &str, xs: &[f64]) {
    let (mean, se) = mean_stderr(xs);
    m.insert(name.to_string(), json!(mean));
    m.insert(format!("{name}_stderr"), json!(se));
}

fn argmax(xs: &[f64]) -> usize {
    (0..xs.len()).fold(0, |b, i| if xs[i] > xs[b] { i } else { b })
}

fn multiple_choice(
    sc: &Scorer,
    name: &str,
    docs: &[McDoc],
    samples: &mut Vec<Record>,
) -> Result<Map<String, Value>> {
    let (mut acc, mut acc_norm, mut acc_bytes) = (Vec::new(), Vec::new(), Vec::new());
    for (i, d) in docs.iter().enumerate() {
        let lls = sc
            .loglikelihoods(&d.requests)
            .with_context(|| format!("{name}: document {i}"))?;
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
    put(&mut m, "acc", &acc);
    put(&mut m, "acc_norm", &acc_norm);
    put(&mut m, "acc_bytes", &acc_bytes);
    Ok(m)
}

fn perplexity(
    sc: &Scorer,
    name: &str,
    docs: &[String],
    samples: &mut Vec<Record>,
) -> Result<Map<String, Value>> {
    let (mut ll, mut toks, mut words, mut bytes) = (0.0, 0usize, 0usize, 0usize);
    for (i, t) in docs.iter().enumerate() {
        let (l, n) = sc
            .rolling(t)
            .with_context(|| format!("{name}: document {i}"))?;
        // lm-eval counts words as len(re.split(r"\s+", doc)): one more than the whitespace runs.
        let (mut runs, mut in_space) = (0usize, false);
        for c in t.chars() {
            runs += usize::from(c.is_whitespace() && !in_space);
            in_space = c.is_whitespace();
        }
        let w = 1 + runs;
        ll += l;
        toks += n;
        words += w;
        bytes += t.len();
        let mut r = Record::new();
        r.insert("task".into(), json!(name));
        r.insert("doc_id".into(), json!(i));
        r.insert("loglikelihood".into(), json!(l));
        r.insert("tokens".into(), json!(n));
        samples.push(r);
    }
    let mut m = Map::new();
    m.insert("token_perplexity".into(), json!((-ll / toks as f64).exp()));
    m.insert("word_perplexity".into(), json!((-ll / words as f64).exp()));
    m.insert("byte_perplexity".into(), json!((-ll / bytes as f64).exp()));
    m.insert(
        "bits_per_byte".into(),
        json!(-ll / (bytes as f64 * std::f64::consts::LN_2)),
    );
    m.insert("tokens".into(), json!(toks));
    Ok(m)
}

fn generative(
    args: &Args,
    model: &Model,
    name: &str,
    preset: Option<&str>,
    docs: &[GenDoc],
    samples: &mut Vec<Record>,
) -> Result<Map<String, Value>> {
    let (mut t, mut top_p) = (args.temperature, args.top_p);
    if args.sampling.as_deref() == Some("r1") {
        t = 0.6;
        top_p = Some(0.95);
    }
    let params = SamplingParams {
        temperature: t,
        top_k: args.top_k,
        top_p,
        min_p: None,
        max_tokens: args.max_tokens,
    };
    params.validate()?;
    if t == 0.0 && args.n > 1 {
        bail!(
            "-n {} with greedy decoding would repeat one answer: give --temperature or --sampling",
            args.n
        );
    }
    let mut stops = args.stop.clone();
    if stops.is_empty() && preset == Some("gsm8k") && !args.chat {
        stops = vec!["Question:".into(), "</s>".into(), "<|im_end|>".into()];
    }
    let (mut strict_acc, mut flex_acc, mut per_doc) = (Vec::new(), Vec::new(), Vec::new());
    let ks: Vec<usize> = (0..)
        .map(|e| 1usize << e)
        .take_while(|&k| k <= args.n)
        .collect();
    let mut pass: Vec<Vec<f64>> = vec![Vec::new(); ks.len()];
    let mut maj: Vec<Vec<f64>> = vec![Vec::new(); ks.len()];
    for (i, d) in docs.iter().enumerate() {
        let mut text = if args.chat {
            let tmpl = model
                .tok
                .chat_template
                .as_deref()
                .ok_or_else(|| anyhow!("--chat: the model has no chat template"))?;
            cf_common::chat::render(
                tmpl,
                &json!([{"role": "user", "content": d.prompt}]),
                true,
                model.tok.bos_token.as_deref(),
                model.tok.eos_token.as_deref(),
            )?
        } else {
            d.prompt.clone()
        };
        if let Some(p) = &args.prefix {
            text.push_str(p);
        }
        let mut ids = model.tok.encode(&text, args.add_bos_token && !args.chat)?;
        if ids.is_empty() {
            ids = vec![model
                .tok
                .document_start()
                .ok_or_else(|| anyhow!("empty prompt and no BOS/EOS"))?];
        }
        let prefixes = vec![ids; args.n];
        let mut rngs: Vec<_> = (0..args.n)
            .map(|j| sample_rng(args.seed, (i * args.n + j) as u64))
            .collect();
        let mut outs: Vec<Option<String>> = vec![None; args.n];
        generate(
            &model.decoder,
            &prefixes,
            &mut rngs,
            &params,
            &model.eos_ids,
            |row, g| {
                let end =
                    g.tokens.len() - usize::from(g.finish == cf_common::generate::Finish::Eos);
                let mut s = model.tok.decode(&g.tokens[..end], true)?;
                if let Some(cut) = stops.iter().filter_map(|st| s.find(st.as_str())).min() {
                    s.truncate(cut);
                }
                outs[row] = Some(s);
                Ok(())
            },
            |_| {},
        )?;
        let outs: Vec<String> = outs.into_iter().map(|o| o.unwrap_or_default()).collect();
        let strict: Vec<Option<String>> = outs.iter().map(|o| extract::strict(o)).collect();
        let flex: Vec<Option<String>> = outs.iter().map(|o| extract::flexible(o)).collect();
        let ok = |a: &Option<String>| {
            a.as_deref()
                .is_some_and(|a| extract::same_answer(a, &d.answer))
        };
        let cs = strict.iter().filter(|a| ok(a)).count();
        let cf = flex.iter().filter(|a| ok(a)).count();
        strict_acc.push(cs as f64 / args.n as f64);
        flex_acc.push(cf as f64 / args.n as f64);
        for (j, &k) in ks.iter().enumerate() {
            pass[j].push(extract::pass_at_k(args.n, cf, k));
            maj[j].push(extract::maj_at_k(&flex, k, &d.answer) as u8 as f64);
        }
        per_doc.push(cf);
        let mut r = Record::new();
        r.insert("task".into(), json!(name));
        r.insert("doc_id".into(), json!(i));
        r.insert("prompt".into(), json!(text));
        r.insert("answer".into(), json!(d.answer));
        r.insert("outputs".into(), json!(outs));
        r.insert("strict".into(), json!(strict));
        r.insert("flexible".into(), json!(flex));
        r.insert("correct_strict".into(), json!(cs));
        r.insert("correct_flexible".into(), json!(cf));
        samples.push(r);
    }
    let mut m = Map::new();
    put(&mut m, "exact_match,strict-match", &strict_acc);
    put(&mut m, "exact_match,flexible-extract", &flex_acc);
    for (j, &k) in ks.iter().enumerate() {
        put(&mut m, &format!("pass@{k},flexible-extract"), &pass[j]);
        put(&mut m, &format!("maj@{k},flexible-extract"), &maj[j]);
    }
    m.insert("samples_per_problem".into(), json!(args.n));
    m.insert("sampling".into(), json!({"temperature": t, "top_p": top_p, "top_k": args.top_k, "max_tokens": args.max_tokens, "seed": args.seed}));
    Ok(m)
}

/// The before/after table: every metric both reports have, with the change and its standard
/// error (the two runs taken as independent).
fn compare(before: &Value, after: &Map<String, Value>, log: &cf_common::cli::LogArgs) -> Value {
    let mut rows = Vec::new();
    for (task, a) in after {
        let Some(b) = before["results"].get(task) else {
            continue;
        };
        for (metric, av) in a.as_object().into_iter().flatten() {
            if metric.contains("_stderr") || metric == "tokens" || metric == "samples_per_problem" {
                continue;
            }
            let (Some(x), Some(y)) = (b.get(metric).and_then(Value::as_f64), av.as_f64()) else {
                continue;
            };
            let se = |r: &Value| r.get(format!("{metric}_stderr")).and_then(Value::as_f64);
            let dse = match (
                se(b),
                a.get(format!("{metric}_stderr")).and_then(Value::as_f64),
            ) {
                (Some(p), Some(q)) => Some((p * p + q * q).sqrt()),
                _ => None,
            };
            rows.push(json!({"task": task, "metric": metric, "before": x, "after": y, "delta": y - x, "delta_stderr": dse}));
        }
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
                r["task"].as_str().unwrap(),
                r["metric"].as_str().unwrap(),
                r["before"].as_f64().unwrap(),
                r["after"].as_f64().unwrap(),
                r["delta"].as_f64().unwrap()
            );
        }
    }
    let accs: Vec<f64> = rows
        .iter()
        .filter(|r| r["metric"] == "acc")
        .map(|r| r["delta"].as_f64().unwrap())
        .collect();
    let forgetting = if accs.is_empty() {
        Value::Null
    } else {
        let mean = accs.iter().sum::<f64>() / accs.len() as f64;
        if !log.quiet {
            eprintln!(
                "{TOOL}: mean change in acc over {} multiple-choice tasks: {mean:+.4}",
                accs.len()
            );
        }
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
    let before: Option<Value> = match &args.compare {
        Some(p) => Some(
            serde_json::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("{p}: cannot read"))?,
            )
            .with_context(|| format!("{p}: not a cf-eval report"))?,
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
    let mut loaded = Vec::new();
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
        let name = preset.clone().unwrap_or_else(|| {
            Path::new(&path)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("task")
                .to_string()
        });
        let task = tasks::load(&path, preset.as_deref(), &fields, args.limit)?;
        loaded.push((name, preset, path, task));
    }
    let device = args.model.device()?;
    let dtype = args.model.dtype(&device)?;
    let model = Model::load(&args.model.model, dtype, &device, Mode::Infer)?;
    let sc = Scorer {
        model: &model,
        add_bos: args.add_bos_token,
        max_len: model.cfg.max_position_embeddings,
    };
    let (mut results, mut configs, mut versions, mut nshot) =
        (Map::new(), Map::new(), Map::new(), Map::new());
    let mut samples = Vec::new();
    for (name, preset, path, task) in &loaded {
        let t0 = std::time::Instant::now();
        let (kind, n, mut m) = match task {
            Task::MultipleChoice(d) => (
                "multiple_choice",
                d.len(),
                multiple_choice(&sc, name, d, &mut samples)?,
            ),
            Task::Perplexity(d) => (
                "loglikelihood_rolling",
                d.len(),
                perplexity(&sc, name, d, &mut samples)?,
            ),
            Task::Generative(d) => (
                "generate_until",
                d.len(),
                generative(args, &model, name, preset.as_deref(), d, &mut samples)?,
            ),
        };
        m.insert("alias".into(), json!(name));
        m.insert("n".into(), json!(n));
        args.log.info(
            TOOL,
            format!(
                "{name}: {n} documents in {:.1} s",
                t0.elapsed().as_secs_f64()
            ),
        );
        results.insert(name.clone(), Value::Object(m));
        configs.insert(name.clone(), json!({
            "task": name, "file": path, "preset": preset, "output_type": kind, "num_fewshot": 0,
            "target_delimiter": args.target_delimiter, "add_bos_token": args.add_bos_token, "limit": args.limit,
        }));
        versions.insert(name.clone(), json!(1.0));
        nshot.insert(name.clone(), json!(0));
    }
    let mut report = json!({
        "results": results, "configs": configs, "versions": versions, "n-shot": nshot,
        "model": args.model.model, "dtype": format!("{dtype:?}").to_lowercase(), "cf_version": env!("CARGO_PKG_VERSION"),
    });
    if let Some(b) = &before {
        report["compare"] = compare(b, report["results"].as_object().unwrap(), &args.log);
    }
    if let Some(o) = &log_out {
        let mut w = Writer::create(o)?;
        for s in &samples {
            w.write(s)?;
        }
        w.finish()?;
    }
    let text = serde_json::to_string_pretty(&report)?;
    match out {
        Some(p) => write_atomic(Path::new(&p), text.as_bytes())?,
        None => {
            use std::io::Write;
            let mut so = std::io::stdout().lock();
            writeln!(so, "{text}")?;
            so.flush()?;
        }
    }
    Ok(())
}
