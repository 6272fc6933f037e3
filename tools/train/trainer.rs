//! The step loop: flags checked, data read, the output folder claimed, then micro-batches
//! (batch.rs) through the losses and backward pass (step.rs), exact gradient accumulation,
//! AdamW (optim.rs), checkpoints that resume exactly (checkpoint.rs), metrics. The trainable
//! parameters and LoRA are in params.rs.

use crate::data::{inspect, Builder, Example};
use crate::optim::{self, AdamW};
use crate::Args;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;
use cf_common::model::{Decoder, Mode, Model};
use cf_common::record::{self, ReadOptions};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

const TOOL: &str = "cf-train";

fn validate(args: &Args) -> Result<()> {
    let pos = |x: f64, n: &str| {
        if x > 0.0 && x.is_finite() {
            Ok(())
        } else {
            Err(anyhow!("{n} must be > 0, got {x}"))
        }
    };
    pos(args.lr, "--lr")?;
    pos(args.adam_eps, "--adam-eps")?;
    for (b, n) in [
        (args.adam_beta1, "--adam-beta1"),
        (args.adam_beta2, "--adam-beta2"),
    ] {
        if !(0.0..1.0).contains(&b) {
            bail!("{n} must be in [0, 1), got {b}");
        }
    }
    for (x, n) in [
        (args.max_grad_norm, "--max-grad-norm"),
        (args.weight_decay, "--weight-decay"),
    ] {
        if !(x >= 0.0 && x.is_finite()) {
            bail!("{n} must be >= 0, got {x}");
        }
    }
    if args.l2_init.is_some_and(|l| !(l >= 0.0 && l.is_finite())) {
        bail!("--l2-init must be >= 0");
    }
    if args.batch_tokens == Some(0) {
        bail!("--batch-tokens must be >= 1");
    }
    if args.lora_alpha.is_some_and(|a| !(a > 0.0 && a.is_finite())) {
        bail!("--lora-alpha must be > 0");
    }
    if args.batch_size == 0 || args.grad_accum == 0 || args.max_length < 2 {
        bail!("--batch-size and --grad-accum must be >= 1 and --max-length >= 2");
    }
    if args.max_steps == Some(0) || (args.max_steps.is_none() && args.epochs == 0) {
        bail!("nothing to do: --max-steps or --epochs is 0");
    }
    if let Some(r) = args.warmup_ratio {
        if !(0.0..=1.0).contains(&r) {
            bail!("--warmup-ratio must be in [0, 1]");
        }
    }
    if args.lora_rank == Some(0) {
        bail!("--lora-rank must be >= 1");
    }
    if !(0.0..1.0).contains(&args.lora_dropout) {
        bail!("--lora-dropout must be in [0, 1)");
    }
    if args.merge && args.lora_rank.is_none() {
        bail!("--merge needs --lora-rank (a full fine-tune is already merged)");
    }
    for t in &args.lora_targets {
        if t != "all" && !crate::params::ALL_TARGETS.contains(&t.as_str()) {
            bail!(
                "--lora-targets: unknown module {t:?} (expected {} or all)",
                crate::params::ALL_TARGETS.join(", ")
            );
        }
    }
    Ok(())
}

pub fn run(args: &Args) -> Result<()> {
    validate(args)?;
    if args.plan {
        // config.json only: a folder of just a config (a model not downloaded yet) is enough.
        let direct = Path::new(&args.model.model).join("config.json");
        let cfg = if direct.is_file() {
            cf_common::model::Config::load(&direct)?
        } else {
            cf_common::model::Config::load(
                &cf_common::model::ModelFiles::locate(&args.model.model)?.config,
            )?
        };
        let parts = crate::plan::plan(args, &cfg)?;
        if !args.log.quiet {
            crate::plan::print_table(&parts);
        }
        let mut so = cf_common::exit::stdout()?.lock();
        writeln!(
            so,
            "{}",
            serde_json::to_string_pretty(&crate::plan::report(args, &cfg, &parts))?
        )?;
        return Ok(());
    }
    let weights = cf_common::cli::loss_weights(&args.weight)?;
    let (_files, cfg, mut tok, eos_ids) = Model::describe(&args.model.model)?;
    if let Some(p) = &args.chat_template {
        tok.chat_template =
            Some(std::fs::read_to_string(p).with_context(|| format!("{p}: cannot read"))?);
        tok.chat_template_from = p.clone();
    }
    // Data first: bad records fail before any weight is read.
    let mut reader = record::open(
        args.input.as_deref(),
        ReadOptions {
            skip_bad: args.skip_bad,
        },
    )?;
    let builder = Builder {
        tok: &tok,
        vocab: cfg.vocab_size,
        eos_ids: &eos_ids,
        max_length: args.max_length,
        weights: &weights,
        exact_kl: &args.exact_kl,
        notes: Default::default(),
    };
    let mut examples = Vec::new();
    while let Some(r) = reader.next() {
        let (loc, rec) = r?;
        match builder.build(&rec) {
            Ok(e) => examples.push(e),
            Err(e) => reader.reject(&loc, e)?,
        }
    }
    if examples.is_empty() {
        bail!("{}: no training examples", reader.name());
    }
    for (msg, n) in builder.notes.borrow().iter() {
        args.log
            .warn(TOOL, format!("{msg} ({n} of {} examples)", examples.len()));
    }
    if let Some(n) = args.inspect {
        let mut so = cf_common::exit::stdout()?.lock();
        inspect(
            &tok,
            &examples[..n.min(examples.len())],
            args.inspect_format,
            &mut so,
        )?;
        so.flush()?;
        return Ok(());
    }
    // clap requires --output unless --inspect or --plan, which have returned by now.
    let out = PathBuf::from(args.output.as_deref().context("--output is required")?);
    for s in &args.exact_kl {
        if !examples.iter().any(|e| &e.source == s) {
            bail!("--exact-kl {s}: no record has source {s:?}");
        }
    }
    for (s, _) in &weights {
        if !examples.iter().any(|e| &e.source == s) {
            bail!("--weight {s}: no record has source {s:?}");
        }
    }
    let truncated = examples.iter().filter(|e| e.truncated).count();
    if truncated > 0 {
        args.log.warn(
            TOOL,
            format!(
                "{truncated} of {} examples truncated to --max-length {}",
                examples.len(),
                args.max_length
            ),
        );
    }
    if reader.skipped() > 0 {
        args.log
            .warn(TOOL, format!("skipped {} bad records", reader.skipped()));
    }

    let device = args.model.device()?;
    let dtype = args.model.dtype(&device)?;
    if let Some(m) = &args.metrics {
        // Fail now, not after the model is loaded.
        cf_common::temp::check_writable(m, "--metrics")?;
    }
    let resuming = args.resume || args.resume_from.is_some();
    let (_owned, notes) = crate::outdir::claim(&out, resuming, args.overwrite)?;
    for n in notes {
        args.log.warn(TOOL, n);
    }
    let resume_dir = match (&args.resume_from, args.resume) {
        (Some(p), _) => Some(PathBuf::from(p)),
        (None, true) => Some(
            crate::save::latest_checkpoint(&out)
                .ok_or_else(|| anyhow!("--resume: no checkpoint-N in {}", out.display()))?,
        ),
        _ => None,
    };
    let state: Option<Value> = match &resume_dir {
        Some(d) => {
            let p = d.join("trainer_state.json");
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("{}: cannot read", p.display()))?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("{}: invalid JSON", p.display()))?,
            )
        }
        None => None,
    };
    let fp = crate::batch::fingerprint(&examples);
    if let Some(st) = &state {
        let dir = resume_dir.as_ref().unwrap().display();
        if st["data"].as_str() != Some(fp.as_str()) || st["seed"].as_u64() != Some(args.seed) {
            bail!("{dir}: the checkpoint was made with other data or another --seed; resuming would not continue the same run");
        }
        if let Some(was) = st.get("settings").and_then(Value::as_object) {
            let now = crate::checkpoint::settings(args);
            let changed: Vec<String> = now
                .iter()
                .filter(|(k, v)| was.get(*k).is_some_and(|w| w != *v))
                .map(|(k, v)| format!("--{} {} (was {})", k.replace('_', "-"), v, was[k]))
                .collect();
            if !changed.is_empty() {
                bail!("{dir}: the run was started with other settings, so resuming would not continue it: {}", changed.join(", "));
            }
        }
    }
    let load_t0 = Instant::now();
    let t = crate::params::trainable(args, &device, dtype, resume_dir.as_deref())?;
    args.log.detail(
        TOOL,
        t.model
            .describe_loaded(dtype, &device, load_t0.elapsed().as_secs_f64()),
    );
    args.log.detail(
        TOOL,
        format!(
            "settings: {}",
            Value::Object(crate::checkpoint::settings(args))
        ),
    );
    let base = if args.exact_kl.is_empty() {
        None
    } else {
        Some(args.model.load(dtype, &device, Mode::Infer)?)
    };
    let l2 = match args.l2_init {
        Some(lambda) => Some(crate::l2::L2Init::new(lambda, &t, &device)?),
        None => None,
    };
    let mut opt = AdamW::new(
        t.vars.clone(),
        args.adam_beta1,
        args.adam_beta2,
        args.adam_eps,
        args.weight_decay,
    )?;

    let mut plan = crate::batch::epoch_plan(&examples, args, 0);
    let steps_per_epoch = plan.len().div_ceil(args.grad_accum) as u64;
    let total = args.max_steps.unwrap_or(args.epochs * steps_per_epoch);
    let warmup = match args.warmup_ratio {
        Some(r) => (r * total as f64).ceil() as u64,
        None => args.warmup,
    };
    let (mut epoch, mut micro) = (0u64, 0usize);
    if let (Some(st), Some(dir)) = (&state, &resume_dir) {
        let ost = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &device)?;
        opt.load_state(&ost, st["global_step"].as_u64().unwrap_or(0))?;
        epoch = st["epoch"].as_u64().unwrap_or(0);
        micro = st["micro_batch"].as_u64().unwrap_or(0) as usize;
        if let (Some(rng), Some(pos)) = (&t.lora_rng, st["lora_dropout_word_pos"].as_str()) {
            rng.lock().unwrap().set_word_pos(
                pos.parse::<u128>()
                    .map_err(|_| anyhow!("trainer_state.json: bad lora_dropout_word_pos"))?,
            );
        }
        args.log.info(
            TOOL,
            format!("resuming {} at step {}", dir.display(), opt.step),
        );
    }
    // The metrics describe this run: a new run starts the file afresh, a resumed one keeps the
    // lines up to its checkpoint and then continues them (redone steps are not repeated).
    let mut metrics = match &args.metrics {
        Some(p) => {
            let kept: String = match std::fs::read_to_string(p) {
                Ok(text) if opt.step > 0 => text
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<Value>(l)
                            .ok()
                            .and_then(|v| v["step"].as_u64())
                            .is_some_and(|s| s <= opt.step)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect(),
                _ => String::new(),
            };
            cf_common::record::write_atomic(Path::new(p), kept.as_bytes())?;
            Some(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(p)
                    .with_context(|| format!("{p}: cannot open"))?,
            )
        }
        None => None,
    };
    args.log.info(
        TOOL,
        format!(
            "{} examples, {} trainable parameters{}, {total} steps ({} per epoch)",
            examples.len(),
            t.vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
            if t.lora.is_some() { " (LoRA)" } else { "" },
            steps_per_epoch
        ),
    );
    if epoch != 0 {
        plan = crate::batch::epoch_plan(&examples, args, epoch);
    }
    let mut num_tokens: u64 = 0;
    let mut last_ckpt: Option<PathBuf> = resume_dir.clone();
    // A bar on a terminal; in a log, the --log-every lines carry the time left.
    let progress =
        cf_common::progress::Progress::with_plain(TOOL, "steps", Some(total), &args.log, false);
    progress.inc(opt.step);
    let (run_t0, run_step0) = (Instant::now(), opt.step);
    while opt.step < total {
        if micro >= plan.len() {
            epoch += 1;
            micro = 0;
            plan = crate::batch::epoch_plan(&examples, args, epoch);
        }
        let t0 = Instant::now();
        let mbs: Vec<&Vec<usize>> = plan[micro..(micro + args.grad_accum).min(plan.len())]
            .iter()
            .collect();
        let denom: usize = mbs
            .iter()
            .flat_map(|mb| mb.iter())
            .map(|&i| examples[i].n_targets())
            .sum();
        let mut stats = crate::step::SourceStats::new();
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut loss_sum = 0.0;
        let mut tokens = 0usize;
        let step_decoder = match t.half {
            Some(dt) => {
                let cast: HashMap<String, Tensor> = t
                    .vars
                    .iter()
                    .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(dt)?)))
                    .collect::<Result<_>>()?;
                Some(Decoder::new(&t.model.cfg, &cast, dt, &device, Mode::Train)?)
            }
            None => None,
        };
        let dec = step_decoder.as_ref().unwrap_or(&t.model.decoder);
        let step_fn = crate::step::Step {
            dec,
            base: base.as_ref().map(|b| &b.decoder),
            vars: &t.vars,
            checkpointing: args.gradient_checkpointing,
            lora_rng: t.lora_rng.as_ref(),
        };
        for mb in &mbs {
            let exs: Vec<&Example> = mb.iter().map(|&i| &examples[i]).collect();
            tokens += exs.iter().map(|e| e.ids.len()).sum::<usize>();
            loss_sum += step_fn.run(&exs, denom as f64, &mut stats, &mut grads)?;
        }
        let step = opt.step + 1;
        let ckpt_note = last_ckpt
            .as_ref()
            .map_or("none yet".to_string(), |p| p.display().to_string());
        if !loss_sum.is_finite() {
            bail!("step {step}: the loss is {loss_sum}; stopping without updating (last good checkpoint: {ckpt_note})");
        }
        let l2_penalty = match &l2 {
            Some(l) => Some(l.apply(&t, &mut grads)?),
            None => None,
        };
        if let Some(p) = l2_penalty {
            loss_sum += p;
        }
        let grad_norm = optim::clip(&mut grads, args.max_grad_norm)?;
        if !grad_norm.is_finite() {
            bail!("step {step}: the gradient norm is {grad_norm}; stopping without updating (last good checkpoint: {ckpt_note})");
        }
        let lr = args.lr * optim::lr_factor(args.schedule, opt.step, warmup, total);
        opt.apply(&grads, lr)?;
        micro += mbs.len();
        num_tokens += tokens as u64;
        let secs = t0.elapsed().as_secs_f64();
        let by_source: serde_json::Map<String, Value> = stats
            .iter()
            .map(|(k, (s, n))| (k.clone(), json!(s / *n as f64)))
            .collect();
        let line = json!({
            "step": opt.step,
            "epoch": epoch as f64 + micro as f64 / plan.len() as f64,
            "loss": loss_sum,
            "loss_by_source": by_source,
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "l2_init": l2_penalty,
            "trained_tokens": denom,
            "num_tokens": num_tokens,
            "tokens_per_second": tokens as f64 / secs.max(1e-9),
        });
        if let Some(m) = metrics.as_mut() {
            writeln!(m, "{line}").context("writing metrics")?;
            m.flush()?;
        }
        progress.inc(1);
        progress.set_message(format!("loss {loss_sum:.4}"));
        if opt.step % args.log_every.max(1) == 0 || opt.step == total {
            let per_step = run_t0.elapsed().as_secs_f64() / (opt.step - run_step0) as f64;
            let left = per_step * (total - opt.step) as f64;
            if !args.log.quiet {
                progress.println(&format!("{TOOL}: step {}/{total} loss {loss_sum:.4} lr {lr:.3e} grad_norm {grad_norm:.3} {:.0} tokens/s, {left:.0} s left", opt.step, tokens as f64 / secs.max(1e-9)));
            }
        }
        if args.save_every > 0 && opt.step % args.save_every == 0 && opt.step < total {
            let dir = out.join(format!("checkpoint-{}", opt.step));
            crate::checkpoint::finite_weights(&t, opt.step, &ckpt_note)?;
            crate::checkpoint::checkpoint(args, &t, &opt, &dir, epoch, micro, &fp)?;
            last_ckpt = Some(dir);
        }
    }
    progress.finish();
    let ckpt_note = last_ckpt
        .as_ref()
        .map_or("none".to_string(), |p| p.display().to_string());
    crate::checkpoint::finite_weights(&t, opt.step, &ckpt_note)?;
    crate::checkpoint::final_output(args, &t, &out)?;
    args.log.info(TOOL, format!("wrote {}", out.display()));
    Ok(())
}
