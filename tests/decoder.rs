//! The decoder against transformers in float64: per-token log-probs, greedy continuations,
//! bf16 weights, batching, the KV cache, and gradients.

use crate::util::*;
use candle_core::{DType, Device, Tensor, Var};
use cf_common::model::{Config, Decoder, KvCache, Mode, Model, Weights};
use std::collections::HashMap;

/// f32 computation against the float64 reference. f32 carries ~7 significant digits; through
/// two layers and a log-softmax over 336 logits of magnitude < 20 the observed error is ~1e-6,
/// so 1e-4 (the bound) leaves a wide margin while still catching any wrong operation
/// (a skipped bias or norm weight moves log-probs by > 1e-2).
const F32_TOL: f64 = 1e-4;

fn load(name: &str, dtype: DType, mode: Mode) -> Model {
    Model::load(fixture(name).to_str().unwrap(), dtype, &Device::Cpu, mode).unwrap()
}

fn logprobs(m: &Decoder, seq: &[u32]) -> Vec<f64> {
    let ids = Tensor::new(seq, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let lp = m
        .sequence_logprobs(&ids)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    lp.squeeze(0).unwrap().to_vec1::<f64>().unwrap()
}

/// Greedy decoding of `n` tokens with the KV cache: the prefix once, then one token per step.
fn greedy(m: &Decoder, prefixes: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    let dev = Device::Cpu;
    let mut cache = KvCache::new(m.cfg.num_layers, prefixes[0].len() + n);
    let flat: Vec<u32> = prefixes.concat();
    let mut ids = Tensor::from_vec(flat, (prefixes.len(), prefixes[0].len()), &dev).unwrap();
    let mut out = vec![Vec::new(); prefixes.len()];
    for _ in 0..n {
        let logits = m.forward(&ids, Some(&mut cache)).unwrap();
        let t = logits.dim(1).unwrap();
        let last = logits.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap();
        let next = last.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        for (o, x) in out.iter_mut().zip(&next) {
            o.push(*x);
        }
        ids = Tensor::new(next.as_slice(), &dev)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
    }
    out
}

#[test]
fn logprobs_match_transformers_float64_in_f32() {
    for fam in FAMILIES.iter().chain(["llama-bf16"].iter()) {
        let r = reference(fam);
        for mode in [Mode::Infer, Mode::Train] {
            let m = load(fam, DType::F32, mode);
            for (seq, want) in r["sequences"]
                .as_array()
                .unwrap()
                .iter()
                .zip(r["logprobs"].as_array().unwrap())
            {
                let got = logprobs(&m.decoder, &ids(seq));
                let d = max_abs_diff(&got, &floats(want));
                assert!(d < F32_TOL, "{fam} {mode:?}: max |Δ logprob| = {d:e}");
            }
        }
    }
}

#[test]
fn greedy_continuation_matches_transformers() {
    for fam in FAMILIES.iter().chain(["llama-bf16"].iter()) {
        let r = reference(fam);
        let g = &r["greedy"];
        let m = load(fam, DType::F32, Mode::Infer);
        let got = greedy(&m.decoder, &[ids(&g["prefix"])], ids(&g["tokens"]).len());
        assert_eq!(
            got[0],
            ids(&g["tokens"]),
            "{fam}: greedy continuation differs"
        );
    }
}

#[test]
fn f64_compute_matches_reference_to_float64_precision() {
    // The same code in f64 must agree with float64 transformers to ~1e-10: only a difference
    // in the operations themselves (not rounding) can show at that level.
    for fam in FAMILIES {
        let r = reference(fam);
        let m = load(fam, DType::F64, Mode::Train);
        let seq = ids(&r["sequences"][2]);
        let d = max_abs_diff(&logprobs(&m.decoder, &seq), &floats(&r["logprobs"][2]));
        assert!(d < 1e-9, "{fam}: f64 max |Δ| = {d:e}");
    }
}

#[test]
fn bf16_compute_stays_within_stated_tolerance() {
    // bf16 keeps 8 bits of mantissa (relative error 2^-9 ≈ 2e-3 per rounding). Logits of
    // magnitude ~5 after two layers carry errors of a few 1e-2; we bound the mean absolute
    // log-prob error at 0.05 nats and the worst token at 0.25 nats.
    let r = reference("llama-bf16");
    let m = load("llama-bf16", DType::BF16, Mode::Infer);
    assert_eq!(m.decoder.dtype(), DType::BF16);
    let mut all = Vec::new();
    for (seq, want) in r["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .zip(r["logprobs"].as_array().unwrap())
    {
        let got = logprobs(&m.decoder, &ids(seq));
        all.extend(got.iter().zip(floats(want)).map(|(a, b)| (a - b).abs()));
    }
    let mean = all.iter().sum::<f64>() / all.len() as f64;
    let max = all.iter().cloned().fold(0.0, f64::max);
    assert!(
        mean < 0.05 && max < 0.25,
        "bf16: mean |Δ| {mean}, max |Δ| {max}"
    );
}

#[test]
fn bf16_weights_are_stored_as_bf16() {
    let files =
        cf_common::model::ModelFiles::locate(fixture("llama-bf16").to_str().unwrap()).unwrap();
    let w = Weights::open(&files.weights, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        w.stored_dtype("model.embed_tokens.weight"),
        Some(DType::BF16)
    );
}

#[test]
fn batched_equals_unbatched() {
    for fam in FAMILIES {
        let r = reference(fam);
        let m = load(fam, DType::F32, Mode::Infer);
        let seqs: Vec<Vec<u32>> = r["sequences"].as_array().unwrap().iter().map(ids).collect();
        let t = seqs.iter().map(Vec::len).max().unwrap();
        // Right padding with id 3: pads come after every real token, so they cannot change
        // what a real position sees.
        let padded: Vec<u32> = seqs
            .iter()
            .flat_map(|s| s.iter().cloned().chain(std::iter::repeat_n(3, t - s.len())))
            .collect();
        let batch = Tensor::from_vec(padded, (seqs.len(), t), &Device::Cpu).unwrap();
        let lp = m
            .decoder
            .sequence_logprobs(&batch)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        for (row, s) in lp.iter().zip(&seqs) {
            let alone = logprobs(&m.decoder, s);
            let d = max_abs_diff(&row[..s.len() - 1], &alone);
            assert!(d < 1e-5, "{fam}: batched vs unbatched max |Δ| = {d:e}");
        }
        // Greedy decoding of three different prefixes together equals each alone.
        let start = seqs[0][0];
        let prefixes = vec![vec![start, 10], vec![start, 50], vec![start, 200]];
        let together = greedy(&m.decoder, &prefixes, 12);
        for (p, got) in prefixes.iter().zip(&together) {
            assert_eq!(
                &greedy(&m.decoder, std::slice::from_ref(p), 12)[0],
                got,
                "{fam}: batched greedy differs"
            );
        }
    }
}

#[test]
fn chunks_after_a_cache_equal_one_token_at_a_time() {
    // Several positions at once after cached ones (the CPU attention kernel with keys before
    // its queries) against one position per step (candle's composition, no kernel), f64, two
    // rows, grouped (llama3) and ungrouped (olmo) heads: logits within 1e-10.
    let dev = Device::Cpu;
    for fam in ["llama3", "olmo"] {
        let m = load(fam, DType::F64, Mode::Infer);
        let seqs: Vec<Vec<u32>> = (0..2u32)
            .map(|r| (0..14u32).map(|i| 1 + (i * 37 + r * 11) % 200).collect())
            .collect();
        let run = |chunks: &[usize]| -> Vec<Tensor> {
            let mut cache = KvCache::new(m.cfg.num_layers, 14);
            let mut at = 0;
            let mut out = Vec::new();
            for &c in chunks {
                let ids: Vec<u32> = seqs.iter().flat_map(|s| s[at..at + c].to_vec()).collect();
                let ids = Tensor::from_vec(ids, (2, c), &dev).unwrap();
                let l = m.decoder.forward(&ids, Some(&mut cache)).unwrap();
                out.extend((0..c).map(|i| l.narrow(1, i, 1).unwrap()));
                at += c;
            }
            out
        };
        let chunked = run(&[4, 1, 6, 3]);
        let steps = run(&[1; 14]);
        for (pos, (a, b)) in chunked.iter().zip(&steps).enumerate() {
            let d = tensor_max_diff(a, b) / tensor_max_abs(b).max(1.0);
            assert!(d < 1e-10, "{fam} position {pos}: logits differ by {d:e}");
        }
    }
}

#[test]
fn kv_cache_equals_full_forward_and_dropping_rows_keeps_the_rest() {
    let m = load("llama3", DType::F32, Mode::Infer);
    let dev = Device::Cpu;
    let seqs = [
        [1u32, 20, 30, 40, 50, 60],
        [1, 21, 31, 41, 51, 61],
        [1, 22, 32, 42, 52, 62],
    ];
    let full = m
        .decoder
        .forward(&Tensor::new(&seqs, &dev).unwrap(), None)
        .unwrap();
    let mut cache = KvCache::new(m.cfg.num_layers, 6);
    // A 3-token prefill, then single tokens; after step 4 row 1 is dropped from the batch.
    let pre = Tensor::new(&[[1u32, 20, 30], [1, 21, 31], [1, 22, 32]], &dev).unwrap();
    let mut got = vec![m.decoder.forward(&pre, Some(&mut cache)).unwrap()];
    let mut rows: Vec<usize> = vec![0, 1, 2];
    #[allow(clippy::needless_range_loop)] // `pos` indexes each row of `seqs`
    for pos in 3..6 {
        if pos == 4 {
            rows = vec![0, 2];
            cache.select_rows(&[0, 2]).unwrap();
        }
        let step: Vec<u32> = rows.iter().map(|&r| seqs[r][pos]).collect();
        let l = m
            .decoder
            .forward(
                &Tensor::new(step.as_slice(), &dev)
                    .unwrap()
                    .unsqueeze(1)
                    .unwrap(),
                Some(&mut cache),
            )
            .unwrap();
        for (i, &r) in rows.iter().enumerate() {
            let a = l
                .get(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = full
                .get(r)
                .unwrap()
                .get(pos)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let d = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                d < 1e-4,
                "row {r} pos {pos}: cache vs full max |Δ logit| = {d}"
            );
        }
        got.push(l);
    }
    let pre_logits = got[0].to_vec3::<f32>().unwrap();
    let full3 = full.to_vec3::<f32>().unwrap();
    for r in 0..3 {
        for p in 0..3 {
            let d = pre_logits[r][p]
                .iter()
                .zip(&full3[r][p])
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-4);
        }
    }
}

/// Continuous batching: rows that finish are replaced by new sequences of other prefix lengths
/// at their own positions in the ring cache. Every sequence's log-probability equals the
/// uncached forward's over its whole text (within 1e-6 relative in f64, where the sampler reads
/// logits as f32, and F32_TOL in f32; a wrong position or a missing mask moves it by more than
/// 1e-3), and its tokens equal
/// the same job generated alone: so positions, the per-row mask and the ring's wrap-around
/// are right (without the mask a new row would attend to the previous row's keys).
#[test]
fn continuous_batching_rows_are_their_own_sequences() {
    use cf_common::generate::{generate, sample_rng, Generated, SamplingParams};
    // f64 runs the composed per-row rotary, f32 candle's rope kernel with per-row tables.
    for (fam, dtype, tol) in [
        ("llama", DType::F64, 1e-6),
        ("llama3", DType::F64, 1e-6),
        ("olmo2", DType::F64, 1e-6),
        ("qwen2", DType::F64, 1e-6),
        ("llama3", DType::F32, F32_TOL),
        ("olmo2", DType::F32, F32_TOL),
    ] {
        let m = load(fam, dtype, Mode::Infer);
        let vocab = m.cfg.vocab_size as u32;
        let lens = [1usize, 3, 2, 5, 1, 4, 2, 3, 1, 5];
        let jobs: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(j, &n)| {
                (0..n)
                    .map(|t| (7 + 13 * j as u32 + 5 * t as u32) % vocab)
                    .collect()
            })
            .collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            min_p: None,
            max_tokens: 9,
        };
        // Ids below vocab/6 end a sequence: rows finish at staggered steps.
        let eos: Vec<u32> = (0..vocab / 6).collect();
        let run = |batch: usize, which: &[usize]| -> Vec<Generated> {
            let mut out: Vec<Option<Generated>> = vec![None; which.len()];
            let longest = which.iter().map(|&j| jobs[j].len()).max().unwrap();
            generate(
                &m.decoder,
                which
                    .iter()
                    .map(|&j| (jobs[j].clone(), sample_rng(3, j as u64))),
                batch,
                longest,
                &p,
                &eos,
                |k, g| {
                    assert!(out[k].is_none(), "job {k} finished twice");
                    out[k] = Some(g);
                    Ok(())
                },
                |_| {},
            )
            .unwrap();
            out.into_iter().map(|g| g.unwrap()).collect()
        };
        let all: Vec<usize> = (0..jobs.len()).collect();
        let together = run(3, &all);
        let steps: usize = together.iter().map(|g| g.tokens.len()).sum();
        assert!(
            steps / 3 + 4 > 5 + 9,
            "{fam}: the test must wrap the ring ({steps} tokens)"
        );
        let ends: std::collections::BTreeSet<usize> =
            together.iter().map(|g| g.tokens.len()).collect();
        assert!(ends.len() > 2, "{fam}: rows must finish at different steps");
        for (j, g) in together.iter().enumerate() {
            let alone = &run(1, &[j])[0];
            assert_eq!(g.tokens, alone.tokens, "{fam} job {j}: tokens");
            let seq: Vec<u32> = jobs[j].iter().chain(&g.tokens).cloned().collect();
            let lp = logprobs(&m.decoder, &seq);
            let want: f64 = lp[jobs[j].len() - 1..].iter().sum();
            assert!(
                (g.logprob - want).abs() < tol * (1.0 + want.abs()),
                "{fam} job {j}: logprob {} vs uncached {want}",
                g.logprob
            );
        }
        let wide = run(16, &all);
        for (a, b) in together.iter().zip(&wide) {
            assert_eq!(a.tokens, b.tokens, "{fam}: batch 3 vs 16");
        }
    }
}

/// Parameters of a fixture as Vars (so gradients can reach them), in `dtype`.
fn vars(name: &str, dtype: DType) -> (Config, HashMap<String, Var>) {
    let files = cf_common::model::ModelFiles::locate(fixture(name).to_str().unwrap()).unwrap();
    let cfg = Config::load(&files.config).unwrap();
    let w = Weights::open(&files.weights, dtype, &Device::Cpu).unwrap();
    let mut out = HashMap::new();
    for (n, shape) in Decoder::parameter_shapes(&cfg) {
        use cf_common::model::Source;
        out.insert(
            n.clone(),
            Var::from_tensor(&w.get(&n, &shape).unwrap()).unwrap(),
        );
    }
    (cfg, out)
}

fn as_tensors(v: &HashMap<String, Var>) -> HashMap<String, Tensor> {
    v.iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

fn mean_logprob(d: &Decoder, seqs: &Tensor) -> Tensor {
    d.sequence_logprobs(seqs).unwrap().mean_all().unwrap()
}

#[test]
fn every_parameter_receives_a_gradient() {
    for fam in FAMILIES {
        let (cfg, params) = vars(fam, DType::F32);
        let d = Decoder::new(
            &cfg,
            &as_tensors(&params),
            DType::F32,
            &Device::Cpu,
            Mode::Train,
        )
        .unwrap();
        let seqs = Tensor::new(
            &[
                [1u32, 40, 41, 42, 43, 44, 45, 46],
                [1, 7, 8, 9, 10, 11, 12, 13],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let grads = mean_logprob(&d, &seqs).backward().unwrap();
        assert_eq!(params.len(), Decoder::parameter_shapes(&cfg).len());
        for (name, v) in &params {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{fam}: {name} got no gradient"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{fam}: {name} gradient norm {norm}"
            );
        }
    }
}

#[test]
fn inference_mode_cuts_the_graph_so_training_must_not_use_it() {
    // Documents why Mode::Train exists: candle's fused kernels have no backward.
    let (cfg, params) = vars("llama", DType::F32);
    let d = Decoder::new(
        &cfg,
        &as_tensors(&params),
        DType::F32,
        &Device::Cpu,
        Mode::Infer,
    )
    .unwrap();
    let seqs = Tensor::new(&[[1u32, 40, 41, 42]], &Device::Cpu).unwrap();
    let grads = mean_logprob(&d, &seqs).backward().unwrap();
    let missing = params
        .values()
        .filter(|v| grads.get(v.as_tensor()).is_none())
        .count();
    assert!(missing > 0, "fused kernels unexpectedly carried gradients");
}

#[test]
fn gradients_match_finite_differences_in_f64() {
    for fam in FAMILIES {
        let (cfg, params) = vars(fam, DType::F64);
        let seqs = Tensor::new(
            &[[1u32, 40, 41, 42, 43, 44], [1, 7, 8, 9, 10, 11]],
            &Device::Cpu,
        )
        .unwrap();
        let d = Decoder::new(
            &cfg,
            &as_tensors(&params),
            DType::F64,
            &Device::Cpu,
            Mode::Train,
        )
        .unwrap();
        let grads = mean_logprob(&d, &seqs).backward().unwrap();
        let loss_with = |name: &str, idx: usize, delta: f64| -> f64 {
            let mut t = as_tensors(&params);
            let orig = &params[name];
            let mut flat = orig.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            flat[idx] += delta;
            t.insert(
                name.to_string(),
                Tensor::from_vec(flat, orig.shape(), &Device::Cpu).unwrap(),
            );
            let d = Decoder::new(&cfg, &t, DType::F64, &Device::Cpu, Mode::Train).unwrap();
            mean_logprob(&d, &seqs).to_scalar::<f64>().unwrap()
        };
        let mut names: Vec<&String> = params.keys().collect();
        names.sort();
        for name in names {
            let g = grads
                .get(params[name].as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            // Two coordinates per tensor: the largest-gradient one and one in the middle.
            let big = (0..g.len())
                .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                .unwrap();
            for idx in [big, g.len() / 2] {
                let h = 1e-5;
                let fd = (loss_with(name, idx, h) - loss_with(name, idx, -h)) / (2.0 * h);
                let err = (fd - g[idx]).abs() / g[idx].abs().max(1e-6);
                assert!(
                    err < 1e-5,
                    "{fam}: {name}[{idx}]: autograd {} vs finite difference {fd} (rel {err:e})",
                    g[idx]
                );
            }
        }
    }
}

/// The fixture with its config.json replaced by the one transformers 5.24's save_pretrained
/// writes (`rope_parameters`, `dtype`; no `rope_theta`, `rope_scaling` or `torch_dtype`).
fn with_v5_config(fam: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let d = dir.join(fam);
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(fixture(fam)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::copy(
        root().join(format!("fixtures/config-v5/{fam}.json")),
        d.join("config.json"),
    )
    .unwrap();
    d
}

#[test]
fn configs_written_by_transformers_5_score_as_transformers_does() {
    // Every family, in f64, against the float64 reference: a wrong rotary base or scaling
    // (e.g. theta 10000 for llama3's 500000) moves log-probs by far more than 1e-9.
    let tmp = tempfile::tempdir().unwrap();
    for fam in FAMILIES.iter().chain(["llama-bf16"].iter()) {
        let v5: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root().join(format!("fixtures/config-v5/{fam}.json")))
                .unwrap(),
        )
        .unwrap();
        assert!(
            v5.get("rope_theta").is_none() && v5.get("rope_parameters").is_some(),
            "{fam}: the stored config is not transformers 5's layout"
        );
        let dir = with_v5_config(fam, tmp.path());
        let m = Model::load(dir.to_str().unwrap(), DType::F64, &Device::Cpu, Mode::Infer).unwrap();
        let v4 = load(fam, DType::F64, Mode::Infer);
        assert_eq!(m.cfg.rope_theta, v4.cfg.rope_theta, "{fam}");
        assert_eq!(m.cfg.rope_scaling, v4.cfg.rope_scaling, "{fam}");
        assert_eq!(m.cfg.torch_dtype, v4.cfg.torch_dtype, "{fam}");
        let r = reference(fam);
        for (seq, want) in r["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .zip(r["logprobs"].as_array().unwrap())
        {
            let d = max_abs_diff(&logprobs(&m.decoder, &ids(seq)), &floats(want));
            assert!(d < 1e-9, "{fam} (transformers 5 config): max |Δ| = {d:e}");
        }
    }
}

/// Gradients of Σ w·loss / denom for every parameter, three ways: candle's autograd through
/// one graph of the plain composition (log-softmax, gather; the exact KL as Σ p₀(log p₀ − log
/// p)), the chunked vocabulary loss with its own backward (one chunk), and the same in chunks of
/// 16 rows, layer by layer with recomputation (gradient checkpointing).
fn three_gradients(fam: &str, dtype: DType, kl: bool) -> [HashMap<String, Tensor>; 3] {
    use cf_common::model::staged;
    use cf_common::model::vocab_loss::{loss_grad, loss_grad_chunked, surrogate, Target};
    let (cfg, params) = vars(fam, dtype);
    let d = Decoder::new(&cfg, &as_tensors(&params), dtype, &Device::Cpu, Mode::Train).unwrap();
    // Another model of the same shapes, so the KL is not zero.
    let other = if fam == "llama" { "llama3" } else { "llama" };
    let base = Decoder::new(
        &cfg,
        &as_tensors(&vars(other, dtype).1),
        dtype,
        &Device::Cpu,
        Mode::Infer,
    )
    .ok()
    .filter(|b| b.cfg.vocab_size == cfg.vocab_size && b.cfg.hidden_size == cfg.hidden_size);
    let named: Vec<(String, Var)> = params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let (b, l) = (2usize, 40usize);
    let ids: Vec<u32> = (0..b * l).map(|i| ((i * 37 + 11) % 300) as u32).collect();
    let ids_t = Tensor::from_vec(ids.clone(), (b, l), &Device::Cpu).unwrap();
    // Every position but the last predicts the next token; weights vary by row.
    let rows: Vec<u32> = (0..b)
        .flat_map(|r| (0..l - 1).map(move |i| (r * l + i) as u32))
        .collect();
    let targets: Vec<u32> = rows.iter().map(|&r| ids[r as usize + 1]).collect();
    let w: Vec<f32> = rows.iter().map(|&r| 0.5 + (r % 3) as f32 * 0.25).collect();
    let denom = 57.0;
    let hsz = cfg.hidden_size;
    let idx = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
    let base_h = base.as_ref().map(|bd| {
        bd.forward_hidden(&ids_t, None)
            .unwrap()
            .reshape((b * l, hsz))
            .unwrap()
            .index_select(&idx, 0)
            .unwrap()
    });
    let use_kl = kl && base.is_some();
    // 1. Plain composition.
    let h = d
        .forward_hidden(&ids_t, None)
        .unwrap()
        .reshape((b * l, hsz))
        .unwrap()
        .index_select(&idx, 0)
        .unwrap();
    let lp = candle_nn::ops::log_softmax(&d.logits(&h).unwrap(), candle_core::D::Minus1).unwrap();
    let wt = Tensor::new(w.as_slice(), &Device::Cpu)
        .unwrap()
        .to_dtype(lp.dtype())
        .unwrap();
    let per_row = if use_kl {
        let lp0 = candle_nn::ops::log_softmax(
            &base
                .as_ref()
                .unwrap()
                .logits(base_h.as_ref().unwrap())
                .unwrap(),
            candle_core::D::Minus1,
        )
        .unwrap();
        (lp0.exp().unwrap() * (&lp0 - &lp).unwrap())
            .unwrap()
            .sum(candle_core::D::Minus1)
            .unwrap()
    } else {
        let tg = Tensor::new(targets.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        lp.gather(&tg, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap()
    };
    let loss = ((per_row * wt).unwrap().sum_all().unwrap() / denom).unwrap();
    let g = loss.backward().unwrap();
    let mut plain = HashMap::new();
    staged::add_grads(&mut plain, &named, &g).unwrap();
    // 2 and 3. Chunked loss, one graph or layer by layer.
    let run = |ckpt: bool| {
        let mut acc = HashMap::new();
        let head = |h: &Tensor| -> anyhow::Result<Tensor> {
            let hr = h.reshape((b * l, hsz))?.index_select(&idx, 0)?;
            let target = match (&base, &base_h, use_kl) {
                (Some(bd), Some(hb), true) => Target::Model {
                    base: bd,
                    hidden: hb,
                },
                _ => Target::Tokens(&targets),
            };
            // The checkpointed run scores 16 rows at a time (5 chunks), the other one chunk.
            let lg = match ckpt {
                true => loss_grad_chunked(&d, &hr, &target, &w, denom, true, 16)?,
                false => loss_grad(&d, &hr, &target, &w, denom, true)?,
            };
            surrogate(&hr, &lg, Some(d.lm_head()))
        };
        staged::backward(&d, &ids_t, head, &named, ckpt, None, &mut acc).unwrap();
        acc
    };
    [plain, run(false), run(true)]
}

#[test]
fn chunked_loss_and_checkpointing_give_the_plain_gradients() {
    // f64: the three agree to 1e-10 (relative to the largest gradient entry): only rounding
    // differs. f32: within 1e-6 of it. Tied (qwen2) and untied (llama) output weights, OLMo's
    // clip_qkv, OLMo-2's norms; the NLL and the exact KL to another model.
    for (fam, kl) in [
        ("llama", false),
        ("llama3", true),
        ("olmo", false),
        ("olmo2", false),
        ("qwen2", false),
        ("llama", true),
    ] {
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-6)] {
            let [plain, chunked, ckpt] = three_gradients(fam, dtype, kl);
            assert_eq!(
                plain.len(),
                chunked.len(),
                "{fam}: every parameter has a gradient"
            );
            assert_eq!(plain.len(), ckpt.len());
            for (name, g) in &plain {
                let scale = tensor_max_abs(g).max(1e-3);
                for (what, other) in [("chunked", &chunked), ("checkpointed", &ckpt)] {
                    let d = tensor_max_diff(g, &other[name]);
                    assert!(
                        d <= tol * scale,
                        "{fam} {dtype:?} kl={kl} {what} {name}: |Δ| {d:e} (scale {scale:e})"
                    );
                }
            }
        }
    }
}

#[test]
fn blockwise_attention_has_the_plain_gradients() {
    // Training attention (the CPU kernel, and the composition of candle's operations that CUDA
    // runs) against candle's autograd of softmax(q kᵀ·s + mask) v with keys and values
    // repeated per query head: 4 query heads on 2 key heads, 600 positions (blocks of 64 and
    // of 256, the last ones partial). f64: values within 1e-12, the gradients of q, k and v
    // within 1e-10. f32 (the kernel's exponential is within 2 ulp): within 2e-5 of the largest.
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-5)] {
        attention_against_plain(dtype, tol);
    }
}

/// Reference attention: candle's autograd of softmax(q kᵀ·scale + causal mask) v, keys and
/// values (b, kv_heads, keys, d) repeated per query head, the queries the last t positions.
fn masked_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    let (b, h, t, d) = q.dims4().unwrap();
    let (kvh, keys) = (k.dim(1).unwrap(), k.dim(2).unwrap());
    let rep = |x: &Tensor| {
        x.unsqueeze(2)
            .unwrap()
            .expand((b, kvh, h / kvh, keys, d))
            .unwrap()
            .reshape((b, h, keys, d))
            .unwrap()
    };
    let mask = cf_common::model::decoder::causal_mask(t, keys - t, q.dtype(), q.device()).unwrap();
    let s = (q.matmul(&rep(k).t().unwrap()).unwrap() * scale)
        .unwrap()
        .broadcast_add(&mask)
        .unwrap();
    let p = candle_nn::ops::softmax(&s, candle_core::D::Minus1).unwrap();
    p.matmul(&rep(v)).unwrap()
}

/// The gradients of Σ y ⊙ upstream.
fn grads_of(y: &Tensor, upstream: &Tensor) -> candle_core::backprop::GradStore {
    (y * upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}

fn attention_against_plain(dtype: DType, tol: f64) {
    let dev = Device::Cpu;
    let (b, h, kvh, t, d) = (2usize, 4usize, 2usize, 600usize, 8usize);
    let mk = |heads: usize, seed: u64| {
        let v: Vec<f64> = (0..b * heads * t * d)
            .map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f64 / 250.0 - 2.0)
            .collect();
        let x = Tensor::from_vec(v, (b, heads, t, d), &dev).unwrap();
        Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap()
    };
    let (q, k, v) = (mk(h, 1), mk(kvh, 2), mk(kvh, 3));
    let upstream = mk(h, 4).as_tensor().detach();
    let scale = 1.0 / (d as f64).sqrt();
    let plain = masked_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale);
    let g_plain = grads_of(&plain, &upstream);
    use cf_common::model::attention::{causal_attention, causal_attention_composed};
    for (what, f) in [
        (
            "kernel",
            causal_attention as fn(&Tensor, &Tensor, &Tensor, f64) -> anyhow::Result<Tensor>,
        ),
        ("composed", causal_attention_composed),
    ] {
        let ours = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).unwrap();
        assert_eq!(ours.dims(), plain.dims());
        let dv = tensor_max_diff(&ours, &plain);
        let vtol = if dtype == DType::F64 { 1e-12 } else { tol };
        assert!(dv < vtol, "{dtype:?} {what}: values differ by {dv:e}");
        let g = grads_of(&ours, &upstream);
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, want) = (
                g.get(x.as_tensor()).unwrap(),
                g_plain.get(x.as_tensor()).unwrap(),
            );
            assert_eq!(a.dims(), x.as_tensor().dims());
            let dd = tensor_max_diff(a, want) / tensor_max_abs(want).max(1.0);
            assert!(dd < tol, "{dtype:?} {what}: d{name} differs by {dd:e}");
        }
    }
}

#[test]
fn attention_after_cached_keys_has_the_plain_values_and_gradients() {
    // The CPU kernel with queries that are the last 150 of 220 positions (cached keys before
    // them, several blocks of queries), 4 query heads on 2 key heads, f64: values within 1e-12
    // and the gradients of q, k and v within 1e-10 of candle's autograd of the masked softmax.
    let dev = Device::Cpu;
    let (b, h, kvh, t, keys, d) = (1usize, 4usize, 2usize, 150usize, 220usize, 8usize);
    let mk = |shape: (usize, usize, usize, usize), seed: u64| {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f64> = (0..n)
            .map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f64 / 250.0 - 2.0)
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap()
    };
    let (q, k, v) = (
        mk((b, h, t, d), 1),
        mk((b, kvh, keys, d), 2),
        mk((b, kvh, keys, d), 3),
    );
    let upstream = mk((b, h, t, d), 4).as_tensor().detach();
    let scale = 1.0 / (d as f64).sqrt();
    let plain = masked_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale);
    let ours = cf_common::model::attention::causal_attention(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        scale,
    )
    .unwrap();
    let dv = tensor_max_diff(&ours, &plain);
    assert!(dv < 1e-12, "values differ by {dv:e}");
    let (g1, g2) = (grads_of(&ours, &upstream), grads_of(&plain, &upstream));
    for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
        let (a, want) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        let dd = tensor_max_diff(a, want);
        assert!(dd < 1e-10, "d{name} differs by {dd:e}");
    }
}

#[test]
fn lora_gradients_through_the_chunked_loss_and_checkpointing_are_the_plain_ones() {
    // Llama, and Qwen2 (biases on q, k and v, which stay frozen).
    lora_gradients("llama");
    lora_gradients("qwen2");
}

fn lora_gradients(fam: &str) {
    // Adapters (non-zero A and B) on every projection of a frozen base, f64: their gradients
    // equal the chain rule through merged weights W + s·B·A (an independent path), and the
    // chunked loss, with and without checkpointing, gives the same, within 1e-10 of the largest.
    use cf_common::model::staged;
    use cf_common::model::vocab_loss::{loss_grad, surrogate, Target};
    let (cfg, params) = vars(fam, DType::F64);
    let frozen: HashMap<String, Tensor> = params
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let mut d = Decoder::new(&cfg, &frozen, DType::F64, &Device::Cpu, Mode::Train).unwrap();
    let mut adapters: Vec<(String, Var)> = Vec::new();
    let mut seed = 1u64;
    d.for_each_linear(|name, lin| {
        let (out, inp) = lin.weight.dims2()?;
        let mut mk = |r: usize, c: usize| {
            seed += 1;
            let v: Vec<f64> = (0..r * c)
                .map(|i| ((i as u64 * 2654435761 + seed * 7919) % 1000) as f64 / 5000.0 - 0.1)
                .collect();
            Var::from_tensor(&Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap()).unwrap()
        };
        let (a, b) = (mk(4, inp), mk(out, 4));
        lin.lora = Some(cf_common::model::Lora {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 2.0,
            dropout: 0.0,
            rng: None,
        });
        adapters.push((format!("{name}.A"), a));
        adapters.push((format!("{name}.B"), b));
        Ok(())
    })
    .unwrap();
    let (b, l) = (2usize, 30usize);
    let ids: Vec<u32> = (0..b * l).map(|i| ((i * 53 + 5) % 300) as u32).collect();
    let ids_t = Tensor::from_vec(ids.clone(), (b, l), &Device::Cpu).unwrap();
    let rows: Vec<u32> = (0..b)
        .flat_map(|r| (0..l - 1).map(move |i| (r * l + i) as u32))
        .collect();
    let targets: Vec<u32> = rows.iter().map(|&r| ids[r as usize + 1]).collect();
    let w = vec![1.0f32; rows.len()];
    let idx = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
    let h = cfg.hidden_size;
    let tg = Tensor::new(targets.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    // The plain composition's loss: log-softmax over the whole vocabulary, no chunks.
    let plain_loss = |d: &Decoder| -> Tensor {
        let hr = d
            .forward_hidden(&ids_t, None)
            .unwrap()
            .reshape((b * l, h))
            .unwrap()
            .index_select(&idx, 0)
            .unwrap();
        let lp =
            candle_nn::ops::log_softmax(&d.logits(&hr).unwrap(), candle_core::D::Minus1).unwrap();
        (lp.gather(&tg, 1).unwrap().sum_all().unwrap().neg().unwrap() / 40.0).unwrap()
    };
    let mut plain = HashMap::new();
    staged::add_grads(&mut plain, &adapters, &plain_loss(&d).backward().unwrap()).unwrap();
    assert_eq!(plain.len(), adapters.len());
    // An independent reference: the same loss through merged weights W + s·B·A trained as
    // plain weights (no adapter code at all); by the chain rule dA = s·Bᵀ·dW and dB = s·dW·Aᵀ.
    let var_of: HashMap<&str, &Var> = adapters.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut merged = frozen.clone();
    let mut merged_vars: Vec<(String, Var)> = Vec::new();
    for (name, _) in adapters.iter().filter(|(k, _)| k.ends_with(".A")) {
        let stem = name.trim_end_matches(".A");
        let (a, bm) = (
            var_of[name.as_str()].as_tensor(),
            var_of[format!("{stem}.B").as_str()].as_tensor(),
        );
        let wk = format!("{stem}.weight");
        let v = Var::from_tensor(&(&frozen[&wk] + (bm.matmul(a).unwrap() * 2.0).unwrap()).unwrap())
            .unwrap();
        merged.insert(wk, v.as_tensor().clone());
        merged_vars.push((stem.to_string(), v));
    }
    let dm = Decoder::new(&cfg, &merged, DType::F64, &Device::Cpu, Mode::Train).unwrap();
    let gm = plain_loss(&dm).backward().unwrap();
    for (stem, v) in &merged_vars {
        let dw = gm.get(v.as_tensor()).unwrap();
        let (a, bm) = (
            var_of[format!("{stem}.A").as_str()].as_tensor(),
            var_of[format!("{stem}.B").as_str()].as_tensor(),
        );
        let want_a = (bm.t().unwrap().matmul(dw).unwrap() * 2.0).unwrap();
        let want_b = (dw.matmul(&a.t().unwrap()).unwrap() * 2.0).unwrap();
        for (which, want) in [("A", want_a), ("B", want_b)] {
            let got = &plain[&format!("{stem}.{which}")];
            let scale = tensor_max_abs(&want).max(1e-6);
            let diff = tensor_max_diff(got, &want);
            assert!(
                diff <= 1e-10 * scale,
                "{stem}.{which} against the merged weights' chain rule: |Δ| {diff:e} (scale {scale:e})"
            );
        }
    }
    for ckpt in [false, true] {
        let mut acc = HashMap::new();
        let head = |h2: &Tensor| -> anyhow::Result<Tensor> {
            let hr = h2.reshape((b * l, h))?.index_select(&idx, 0)?;
            let lg = loss_grad(&d, &hr, &Target::Tokens(&targets), &w, 40.0, false)?;
            surrogate(&hr, &lg, None)
        };
        staged::backward(&d, &ids_t, head, &adapters, ckpt, None, &mut acc).unwrap();
        for (name, g) in &plain {
            let scale = tensor_max_abs(g).max(1e-6);
            let diff = tensor_max_diff(g, &acc[name]);
            assert!(
                diff <= 1e-10 * scale,
                "ckpt={ckpt} {name}: |Δ| {diff:e} (scale {scale:e})"
            );
        }
    }
}

// The fused CPU kernels (cf_common::model::fused) against candle's composition: values and
// gradients.
mod fused_kernels {
    use crate::util::tensor_max_diff;
    use candle_core::{DType, Device, Tensor, Var, D};
    use cf_common::model::fused;

    fn rand_tensor(shape: &[usize], seed: u64, dt: DType) -> Tensor {
        // A small deterministic generator: values in (-2, 2).
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }

    /// Values and gradients (through a random linear read-out) of the fused op and of candle's
    /// composition, on the same inputs.
    fn check(
        dt: DType,
        tol: f64,
        shapes: &[&[usize]],
        fused: impl Fn(&[Tensor]) -> Tensor,
        plain: impl Fn(&[Tensor]) -> Tensor,
    ) {
        let vars: Vec<Var> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| Var::from_tensor(&rand_tensor(s, i as u64 + 1, dt)).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&ts), plain(&ts));
        assert!(
            tensor_max_diff(&a, &b) <= tol,
            "values differ by {}",
            tensor_max_diff(&a, &b)
        );
        let r = rand_tensor(a.dims(), 99, dt);
        let ga = (&a * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (x, y) = (ga.get(v), gb.get(v));
            match (x, y) {
                (Some(x), Some(y)) => {
                    let d = tensor_max_diff(x, y);
                    assert!(d <= tol, "input {i}: gradients differ by {d}");
                }
                (None, None) => {}
                _ => panic!("input {i}: a gradient on one side only"),
            }
        }
    }

    #[test]
    fn fused_kernels_match_candles_composition_with_gradients() {
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            check(
                dt,
                tol,
                &[&[3, 5, 70], &[3, 5, 70]],
                |t| fused::silu_mul(&t[0], &t[1]).unwrap(),
                |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
            );
            let eps = 1e-5;
            check(
                dt,
                tol,
                &[&[2, 37, 48], &[48]],
                |t| fused::rms_norm(&t[0], &t[1], eps).unwrap().unwrap(),
                |t| {
                    let ms = t[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                    t[0].broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
                        .unwrap()
                        .broadcast_mul(&t[1])
                        .unwrap()
                },
            );
            // Rotary: x (b, h, t, d) from a transposed (not contiguous) view, as the decoder's.
            let (cos, sin) = (
                rand_tensor(&[6, 8], 7, dt).cos().unwrap(),
                rand_tensor(&[6, 8], 7, dt).sin().unwrap(),
            );
            let (c2, s2) = (cos.clone(), sin.clone());
            check(
                dt,
                tol,
                &[&[2, 6, 3, 16]],
                move |t| {
                    fused::rope(&t[0].transpose(1, 2).unwrap(), &cos, &sin)
                        .unwrap()
                        .unwrap()
                },
                move |t| {
                    candle_nn::rotary_emb::rope_slow(&t[0].transpose(1, 2).unwrap(), &c2, &s2)
                        .unwrap()
                },
            );
        }
    }

    #[test]
    fn bf16_rms_norm_rounds_the_normalised_value_as_transformers_does() {
        let x = rand_tensor(&[4, 32], 3, DType::F32);
        let w = rand_tensor(&[32], 4, DType::BF16);
        let xb = x.to_dtype(DType::BF16).unwrap();
        let got = fused::rms_norm(&xb, &w, 1e-6).unwrap().unwrap();
        // transformers: (x.float() * rsqrt(mean(x²) + eps)).to(bf16) * w
        let xf = xb.to_dtype(DType::F32).unwrap();
        let ms = xf.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let n = xf
            .broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap())
            .unwrap();
        let want = n.to_dtype(DType::BF16).unwrap().broadcast_mul(&w).unwrap();
        assert_eq!(tensor_max_diff(&got, &want), 0.0);
    }
}
