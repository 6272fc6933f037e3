#!/usr/bin/env python3
"""The same measurements as examples/bench_decoder.rs, with transformers on the same weights and
the same number of threads, in the same run; then cf-sample against `generate`. Prints a table of
both and their ratio, and writes OUT/bench.md.

    python3 scripts/bench_transformers.py OUT        # after `cargo run --release --example bench_decoder -- OUT`
"""
import json
import os
import subprocess
import sys
import time

out = sys.argv[1] if len(sys.argv) > 1 else "out/bench"
rust = json.load(open(os.path.join(out, "rust.json")))
try:
    import torch
    import transformers
except ImportError:
    print("bench: transformers is not installed; only cf's numbers were measured", file=sys.stderr)
    sys.exit(0)

threads = int(os.environ.get("CF_THREADS", os.cpu_count()))
torch.set_num_threads(threads)
model_dir = os.path.join(out, "model")
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
model.eval()


def timeit(f, min_secs=2.0):
    f()
    t0, n = time.perf_counter(), 0
    while n < 2 or time.perf_counter() - t0 < min_secs:
        f()
        n += 1
    return (time.perf_counter() - t0) / n


rows = []
with torch.no_grad():
    for r in rust:
        b = r["batch"]
        if r["what"] == "forward":
            t = r["seq"]
            ids = torch.tensor([[(i * 7919 % 8000) for i in range(k * t, (k + 1) * t)] for k in range(b)])
            s = timeit(lambda: model.model(ids))
            hf = b * t / s
        else:
            steps = r["steps"]

            def decode():
                ids = torch.ones((b, 1), dtype=torch.long)
                past = transformers.DynamicCache()
                for _ in range(steps):
                    o = model(ids, past_key_values=past, use_cache=True)
                    past = o.past_key_values
                    ids = o.logits[:, -1].argmax(-1, keepdim=True)

            s = timeit(decode)
            hf = b * steps / s
        rows.append((r["what"], b, r["tokens_per_s"], hf))

# cf-sample (the binary, records written) against generate(do_sample, top_k=0), fixed length.
cf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "cf-sample")


def sample_vs_generate(label, mdir, hf_model, b, steps):
    # generate's model is already in memory; cf-sample loads its own, so its files are read once
    # beforehand: the timing then includes the load from the page cache, not from disk.
    for f in os.listdir(mdir):
        if not os.path.isfile(os.path.join(mdir, f)):
            continue
        with open(os.path.join(mdir, f), "rb") as fh:
            while fh.read(1 << 24):
                pass
    t0 = time.perf_counter()
    subprocess.run([cf, "--model", mdir, "-n", str(b), "--batch-size", str(b), "--max-tokens", str(steps),
                    "--ignore-eos", "-q"], check=True, stdout=subprocess.DEVNULL)
    cf_s = time.perf_counter() - t0
    with torch.no_grad():
        t0 = time.perf_counter()
        hf_model.generate(torch.ones((b, 1), dtype=torch.long), do_sample=True, top_k=0, temperature=1.0,
                          max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0)
        hf_s = time.perf_counter() - t0
    rows.append((label, b, b * steps / cf_s, b * steps / hf_s))


sample_vs_generate("cf-sample vs generate, vocabulary 8192 (wall, incl. load)", model_dir, model, 32, 64)

# cf-sample against generate at batch 1, 32 and 256 on the same model with 50k and 128k
# vocabularies (random output layers): the per-token sampling work grows with the vocabulary.
tok_files = [f for f in os.listdir(model_dir) if f.startswith("tokenizer") or f == "generation_config.json"]
for vocab in [50304, 128256]:
    vdir = os.path.join(out, f"model-v{vocab}")
    if not os.path.isdir(vdir):
        cfg = transformers.AutoConfig.from_pretrained(model_dir)
        cfg.vocab_size = vocab
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(vdir)
        for f in tok_files:
            subprocess.run(["cp", os.path.join(model_dir, f), vdir], check=True)
    vm = transformers.AutoModelForCausalLM.from_pretrained(vdir, dtype=torch.float32, attn_implementation="sdpa").eval()
    for b in [1, 32, 256]:
        sample_vs_generate(f"cf-sample vs generate, vocabulary {vocab} (wall, incl. load)", vdir, vm, b, 32)
        print(rows[-1], file=sys.stderr, flush=True)

# Samples that end at EOS, at random lengths: 400 of the 8192 ids are EOS ids (config.json's
# eos_token_id list, which both tools honour), so a sample ends with probability ~5% per token.
# 256 samples at batch 32, at most 128 tokens: `generate` runs 8 batches, each until its longest
# sample ends; cf-sample refills finished rows (continuous batching). Tokens counted: those
# generated up to and including EOS.
edir = os.path.join(out, "model-eos")
eos_ids = list(range(2, 402))
if not os.path.isdir(edir):
    subprocess.run(["cp", "-r", model_dir, edir], check=True)
    for name in ["config.json", "generation_config.json"]:
        p = os.path.join(edir, name)
        if os.path.exists(p):
            c = json.load(open(p))
            c["eos_token_id"] = eos_ids
            json.dump(c, open(p, "w"), indent=2)
t0 = time.perf_counter()
res = subprocess.run([cf, "--model", edir, "-n", "256", "--batch-size", "32", "--max-tokens", "128", "--seed", "3", "-q"],
                     check=True, capture_output=True, text=True)
cf_s = time.perf_counter() - t0
cf_tokens = sum(json.loads(l)["n_tokens"] for l in res.stdout.splitlines())
em = transformers.AutoModelForCausalLM.from_pretrained(edir, dtype=torch.float32, attn_implementation="sdpa").eval()
hf_tokens = 0
eos_set = set(eos_ids)
with torch.no_grad():
    torch.manual_seed(3)
    t0 = time.perf_counter()
    for _ in range(256 // 32):
        g = em.generate(torch.ones((32, 1), dtype=torch.long), do_sample=True, top_k=0, temperature=1.0,
                        max_new_tokens=128, eos_token_id=eos_ids, pad_token_id=0)
        for row in g[:, 1:].tolist():
            for t in row:
                hf_tokens += 1
                if t in eos_set:
                    break
    hf_s = time.perf_counter() - t0
print(f"bench: EOS-ended samples: cf {cf_tokens} tokens in {cf_s:.2f} s, generate {hf_tokens} tokens in {hf_s:.2f} s",
      file=sys.stderr)
rows.append(("cf-sample vs generate, 256 samples ending at EOS (~5%/token, ≤128), batch 32 (wall, incl. load)", 32,
             cf_tokens / cf_s, hf_tokens / hf_s))

# cf-kl (two models score every sample; exact token KL) against a PyTorch forward doing the same.
samples = os.path.join(out, "cfs.jsonl")
with open(samples, "w") as f:
    subprocess.run([cf, "--model", model_dir, "-n", "64", "--batch-size", "64", "--max-tokens", "127", "--ignore-eos", "-q",
                    "--seed", "1"], check=True, stdout=f)
kl_bin = cf.replace("cf-sample", "cf-kl")
res = subprocess.run([kl_bin, "--base", model_dir, "--model", model_dir, samples, "--batch-size", "16", "-q"],
                     check=True, capture_output=True, text=True)
cf_kl = json.loads(res.stdout)["tokens_per_s"]
recs = [json.loads(l) for l in open(samples)]
base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


def score_all():
    for i in range(0, len(recs), 16):
        ids = torch.tensor([r["prefix_ids"] + r["token_ids"] for r in recs[i:i + 16]])
        lp_m = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
        lp_b = torch.log_softmax(base(ids).logits[:, :-1].float(), -1)
        (lp_m.gather(-1, ids[:, 1:, None]).sum(), (lp_b.exp() * (lp_b - lp_m)).sum())


with torch.no_grad():
    t0 = time.perf_counter()
    score_all()
    hf_kl = 2 * sum(len(r["token_ids"]) for r in recs) / (time.perf_counter() - t0)
rows.append(("cf-kl scoring (2 models, exact token KL)", 16, cf_kl, hf_kl))

lines = [f"CPU, f32, {threads} threads, ~25M-parameter Llama config (random weights), transformers {transformers.__version__}, torch {torch.__version__}",
         "", "| measurement | batch | cf tokens/s | transformers tokens/s | cf / transformers |", "|---|---|---|---|---|"]
for what, b, a, h in rows:
    lines.append(f"| {what} | {b} | {a:,.0f} | {h:,.0f} | {a / h:.2f} |")
text = "\n".join(lines)
print(text)
open(os.path.join(out, "bench.md"), "w").write(text + "\n")
