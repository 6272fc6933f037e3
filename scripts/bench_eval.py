#!/usr/bin/env python3
"""cf-eval against lm-evaluation-harness on the same multiple-choice task and model, same run.

    python3 scripts/bench_eval.py out/bench        # after `cargo run --release --example bench_decoder -- out/bench`

Makes a 300-question, 4-choice task in cf-eval's layout (contexts of ~40 words), runs cf-eval and
lm-eval (hf backend, float32, CPU, batch size 1 and 16) on out/bench/model, checks that they
agree on acc, and prints wall times (each including model load) and scoring times (cf-eval's
"N documents in S s", lm-eval's HFLM.loglikelihood, each with tokenization and batching);
cf-eval at --batch-size 1, 16 and 64, lm-eval at 1 and 16.
"""
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
out = sys.argv[1] if len(sys.argv) > 1 else "out/bench"
model = os.path.abspath(os.path.join(out, "model"))
rng = random.Random(0)
words = "the of and a to in is you that it he was for on are as with his they at be this have from".split()
task = os.path.abspath(os.path.join(out, "mc300.jsonl"))
with open(task, "w") as f:
    for _ in range(300):
        ctx = " ".join(rng.choice(words) for _ in range(40))
        choices = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(4)]
        f.write(json.dumps({"context": ctx, "choices": choices, "gold": rng.randrange(4)}) + "\n")
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
rows = []
for bs in [1, 16, 64]:
    t0 = time.perf_counter()
    r = subprocess.run([os.path.join(root, "target/release/cf-eval"), "--model", model, "--task", task, "--batch-size", str(bs)],
                       check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    scoring = float(re.search(r"mc300: 300 documents in ([0-9.]+) s", r.stderr).group(1))
    rows.append((f"cf-eval batch {bs}", wall, scoring, json.loads(r.stdout)["results"]["mc300"]["acc,none"]))

import lm_eval  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

# lm-eval's scoring time: every call of HFLM.loglikelihood, timed.
scoring = [0.0]
_loglikelihood = HFLM.loglikelihood


def timed(self, *a, **k):
    t = time.perf_counter()
    try:
        return _loglikelihood(self, *a, **k)
    finally:
        scoring[0] += time.perf_counter() - t


HFLM.loglikelihood = timed

with tempfile.TemporaryDirectory() as d:
    open(os.path.join(d, "mc300.yaml"), "w").write(
        f"task: mc300\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {task}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    for bs in [1, 16]:
        t0 = time.perf_counter()
        scoring[0] = 0.0
        res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=float32", tasks=["mc300"],
                                      task_manager=TaskManager(include_path=d), batch_size=bs, device="cpu")
        rows.append((f"lm-eval batch {bs}", time.perf_counter() - t0, scoring[0], res["results"]["mc300"]["acc,none"]))
print("| run | seconds (incl. load) | scoring seconds | acc |\n|---|---|---|---|")
for name, s, sc, acc in rows:
    print(f"| {name} | {s:.1f} | {sc:.1f} | {acc:.4f} |")
cf_best = min((r for r in rows if r[0].startswith("cf-eval")), key=lambda r: r[2])
lm_best = min((r for r in rows if r[0].startswith("lm-eval")), key=lambda r: r[2])
print(f"\nscoring, best of each: {cf_best[0]} {cf_best[2]:.1f} s, {lm_best[0]} {lm_best[2]:.1f} s: "
      f"cf-eval {lm_best[2] / cf_best[2]:.2f}x lm-eval's speed")
