#!/usr/bin/env python3
"""cf-train beside a plain PyTorch loop and TRL's SFTTrainer on the same recipe and weights, on
CPU: tokens/s (steps after the first) and peak memory (peak anonymous RSS), in one table.

    python3 scripts/bench_train.py [OUT]      # `just bench-train`; writes OUT/train.md

The model is the ~26M-parameter `small` shape with random weights (examples/random_model.rs);
the recipe: full fine-tuning, f32, AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, no decay), no
clipping, one micro-batch per step, 6 steps, at 8 × 256 and 1 × 2048 tokens, and cf-train again
with --gradient-checkpointing. The same random token ids feed every trainer, each sequence
starting with BOS; the loss is the mean NLL over every token after the first, as in all three.
Then the same shapes' training attention alone: cf's CPU kernel (examples/bench_attn.rs) against
torch's scaled_dot_product_attention, forward and backward (median of 7 runs).
PyTorch and cf-train alternate BENCH_ROUNDS times (default 2) per shape, and each trainer's
tokens/s is the median over all its runs' steps, so that the machine's drift between runs falls
on both. Threads: CF_THREADS (default all cores) for cf and torch alike.
"""
import json
import os
import random
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "out", "bench-train"))
os.makedirs(out, exist_ok=True)
threads = int(os.environ.get("CF_THREADS", os.cpu_count()))
STEPS = 6
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
model = os.path.join(out, "small")
if not os.path.isdir(model):
    subprocess.run(["cargo", "run", "--release", "-q", "--example", "random_model", "--", "small", "f32", model], cwd=ROOT, check=True)


def data(b, t):
    random.seed(0)
    rows = [[1] + [random.randrange(3, 8192) for _ in range(t - 1)] for _ in range(b)]
    path = os.path.join(out, f"d{b}x{t}.jsonl")
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"prefix_ids": r[:1], "token_ids": r[1:]}) + "\n")
    return path, rows


def peak_anon(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) // 1024
    except FileNotFoundError:
        pass
    return 0


def measured(cmd, env=None):
    """Run cmd; its stdout (JSON: tokens/s) and peak anonymous memory in MiB."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=out)
    peak = 0
    while p.poll() is None:
        peak = max(peak, peak_anon(p.pid))
        time.sleep(0.02)
    stdout = p.stdout.read().decode()
    if p.returncode:
        raise SystemExit(f"{cmd[0]} failed")
    return stdout, peak


def cf(b, t, extra):
    path, _ = data(b, t)
    m = os.path.join(out, "m.jsonl")
    env = dict(os.environ, CF_THREADS=str(threads))
    subprocess.run(["rm", "-rf", os.path.join(out, "o")])
    _, peak = measured([os.path.join(ROOT, "target", "release", "cf-train"), "--model", model, path, "-o", "o",
                        "--max-steps", str(STEPS), "--batch-size", str(b), "--max-length", str(t), "--lr", "1e-4",
                        "--max-grad-norm", "0", "--schedule", "constant", "--metrics", m, "-q"] + extra, env)
    rows = [json.loads(l) for l in open(m)][1:]
    return [r["tokens_per_second"] for r in rows], peak


TORCH = r'''
import json, sys, time, torch, transformers
torch.set_num_threads(int(sys.argv[3]))
rows = [json.loads(l) for l in open(sys.argv[2])]
ids = torch.tensor([r["prefix_ids"] + r["token_ids"] for r in rows])
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, attn_implementation="sdpa")
m.train()
opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
rates = []
for step in range(int(sys.argv[4])):
    t0 = time.perf_counter()
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    rates.append(ids.numel() / (time.perf_counter() - t0))
print(json.dumps(rates[1:]))
'''

TRL = r'''
import json, sys, time, torch, datasets, transformers, trl
torch.set_num_threads(int(sys.argv[3]))
rows = [json.loads(l) for l in open(sys.argv[2])]
ds = datasets.Dataset.from_list([{"input_ids": r["prefix_ids"] + r["token_ids"]} for r in rows])
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, attn_implementation="sdpa")
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
rates = []
class Timer(transformers.TrainerCallback):
    def on_step_begin(self, *a, **k):
        self.t0 = time.perf_counter()
    def on_step_end(self, *a, **k):
        rates.append(len(rows) * len(ds[0]["input_ids"]) / (time.perf_counter() - self.t0))
cfg = trl.SFTConfig(output_dir=sys.argv[5], max_steps=int(sys.argv[4]), per_device_train_batch_size=len(rows),
    learning_rate=1e-4, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, bf16=False,
    gradient_checkpointing=False, report_to=[], logging_steps=1000, save_strategy="no", max_length=4096,
    use_cpu=True, dataloader_num_workers=0, seed=0)
trl.SFTTrainer(model=m, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()]).train()
print(json.dumps(rates[1:]))
'''


ATTN = r'''
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
b, h, kvh, t, d = map(int, sys.argv[2:7])
q = torch.randn(b, h, t, d, requires_grad=True)
k, v = (torch.randn(b, kvh, t, d, requires_grad=True) for _ in range(2))
g = torch.randn(b, h, t, d)
fwd, both = [], []
for run in range(8):
    t0 = time.perf_counter()
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kvh != h)
    f = time.perf_counter() - t0
    (o * g).sum().backward()
    if run:
        fwd.append(f * 1e3)
        both.append((time.perf_counter() - t0) * 1e3)
    q.grad = k.grad = v.grad = None
print(json.dumps({"forward_ms": sorted(fwd)[3], "forward_backward_ms": sorted(both)[3]}))
'''


def attention(b, t):
    """The small model's training attention alone (8 heads on 4 key heads, head size 64):
    cf's CPU kernel against PyTorch's scaled_dot_product_attention, forward and backward."""
    shape = [str(x) for x in (b, 8, 4, t, 64)]
    subprocess.run(["cargo", "build", "--release", "-q", "--example", "bench_attn"], cwd=ROOT, check=True)
    env = dict(os.environ, CF_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    ours = json.loads(subprocess.run([os.path.join(ROOT, "target", "release", "examples", "bench_attn")] + shape,
                                     env=env, check=True, capture_output=True, text=True).stdout)
    ref = json.loads(subprocess.run([sys.executable, "-c", ATTN, str(threads)] + shape,
                                    env=env, check=True, capture_output=True, text=True).stdout)
    return ours, ref


def py(script, b, t):
    path, _ = data(b, t)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    stdout, peak = measured([sys.executable, "-c", script, model, path, str(threads), str(STEPS), os.path.join(out, "trl")], env)
    return json.loads(stdout.strip().splitlines()[-1]), peak


att = ["| attention (8 heads, 4 key heads, 64) | cf forward ms | PyTorch SDPA forward ms | cf forward+backward ms | PyTorch forward+backward ms | forward+backward vs PyTorch (speed) |",
       "|---|---|---|---|---|---|"]
for b, t in [(8, 256), (1, 2048)]:
    ours, ref = attention(b, t)
    att.append(f"| {b} × {t} | {ours['forward_ms']:.1f} | {ref['forward_ms']:.1f} | {ours['forward_backward_ms']:.1f} | "
               f"{ref['forward_backward_ms']:.1f} | {ref['forward_backward_ms'] / ours['forward_backward_ms']:.2f} |")
    print(att[-1], flush=True)

lines = ["| micro-batch | trainer | tokens/s | peak MiB | tokens/s vs PyTorch | memory vs PyTorch |", "|---|---|---|---|---|---|"]
for b, t in [(8, 256), (1, 2048)]:
    # PyTorch and cf alternate, ROUNDS runs each, so that the machine's drift (other tenants)
    # falls on both; tokens/s is the median over every run's steps after its first, the peak
    # the largest of the runs'. TRL runs once.
    runs = {}
    def add(name, r):
        rates, peak = runs.get(name, ([], 0))
        runs[name] = (rates + r[0], max(peak, r[1]))
    for rnd in range(ROUNDS):
        add("PyTorch loop", py(TORCH, b, t))
        if rnd == 0:
            try:
                add("TRL SFTTrainer", py(TRL, b, t))
            except SystemExit as e:
                print(f"bench-train: TRL: {e}", file=sys.stderr)
        add("cf-train", cf(b, t, []))
        add("cf-train --gradient-checkpointing", cf(b, t, ["--gradient-checkpointing"]))
        print(f"bench-train: {b} × {t} round {rnd + 1}: " + ", ".join(
            f"{k} {statistics.median(v[0][-(STEPS - 1):]):,.0f}" for k, v in runs.items()
            if rnd == 0 or not k.startswith("TRL")), file=sys.stderr, flush=True)
    ref = (statistics.median(runs["PyTorch loop"][0]), runs["PyTorch loop"][1])
    for name in ["PyTorch loop", "TRL SFTTrainer", "cf-train", "cf-train --gradient-checkpointing"]:
        if name not in runs:
            continue
        rate, peak = statistics.median(runs[name][0]), runs[name][1]
        lines.append(f"| {b} × {t} | {name} | {rate:,.0f} | {peak:,} | {rate / ref[0]:.2f} | {peak / ref[1]:.2f} |")
        print(lines[-1], flush=True)
open(os.path.join(out, "train.md"), "w").write("\n".join(lines) + "\n\n" + "\n".join(att) + "\n")
print(f"bench-train: {threads} threads; wrote {os.path.join(out, 'train.md')}", file=sys.stderr)
