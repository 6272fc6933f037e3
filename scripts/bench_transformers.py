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
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
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
n, max_tokens = 32, 64
cf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "cf-sample")
t0 = time.perf_counter()
subprocess.run([cf, "--model", model_dir, "-n", str(n), "--batch-size", str(n), "--max-tokens", str(max_tokens),
                "--ignore-eos", "-q"], check=True, stdout=subprocess.DEVNULL)
cf_s = time.perf_counter() - t0
with torch.no_grad():
    t0 = time.perf_counter()
    model.generate(torch.ones((n, 1), dtype=torch.long), do_sample=True, top_k=0, temperature=1.0,
                   max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=0)
    hf_s = time.perf_counter() - t0
rows.append(("cf-sample vs generate (wall, incl. load)", n, n * max_tokens / cf_s, n * max_tokens / hf_s))

lines = [f"CPU, f32, {threads} threads, ~25M-parameter Llama config (random weights), transformers {transformers.__version__}, torch {torch.__version__}",
         "", "| measurement | batch | cf tokens/s | transformers tokens/s | cf / transformers |", "|---|---|---|---|---|"]
for what, b, a, h in rows:
    lines.append(f"| {what} | {b} | {a:,.0f} | {h:,.0f} | {a / h:.2f} |")
text = "\n".join(lines)
print(text)
open(os.path.join(out, "bench.md"), "w").write(text + "\n")
