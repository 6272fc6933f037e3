#!/usr/bin/env python3
"""lm-evaluation-harness reference for cf-eval.

    python3 scripts/make_eval_reference.py      # writes fixtures/eval/

Needs lm_eval 0.4.8 (with transformers 4.48, datasets 3.2). Writes two small tasks in cf-eval's
default record layout and runs lm-eval on them, as local YAML tasks, with the hf backend in
float32 on two fixture models (llama: has a BOS token, which lm-eval does not add by default;
qwen2: no BOS, so an empty context becomes the EOS token):

  mc.jsonl    {"context", "choices", "gold"}: multiple choice by log-likelihood; contexts with
              trailing spaces (lm-eval moves them onto the continuation) and an empty context;
  wino.jsonl  {"contexts", "continuation", "gold"}: Winogrande-style partial scoring, the same
              continuation scored after each context.

reference-<model>.json: acc, acc_norm and their stderr per task, and every per-choice
log-likelihood by document.
"""
import json
import os
import tempfile

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
OUT = os.path.join(ROOT, "fixtures", "eval")

MC = [
    {"context": "Question: what is 2 plus 2?\nAnswer:", "choices": ["4", "5", "22"], "gold": 0},
    {"context": "The cat sees the", "choices": ["moon", "sea", "red house", "number 42"], "gold": 0},
    {"context": "Fact 7: a robot is older than ", "choices": ["the river", "my friend"], "gold": 1},
    {"context": "", "choices": ["Question", "Answer", "Fact"], "gold": 2},
    {"context": "Question: what is 10 plus 31?\nAnswer: ", "choices": ["41", "14", "4 1"], "gold": 0},
    {"context": "Seven birds follow", "choices": ["green fields", "the sea", "three apples"], "gold": 1},
    {"context": "A dog likes", "choices": ["the moon.", "a red house.", "three apples."], "gold": 2},
    {"context": "The old king paints", "choices": ["the number 42", "green fields"], "gold": 0},
]

WINO = [
    {"contexts": ["The cat is older than the dog because the cat", "The cat is older than the dog because the dog"], "continuation": "was born first.", "gold": 0},
    {"contexts": ["My friend follows the robot since my friend", "My friend follows the robot since the robot"], "continuation": "knows the way.", "gold": 1},
    {"contexts": ["Seven birds see the moon but the moon", "Seven birds see the moon but the birds"], "continuation": "fly away.", "gold": 1},
]

YAML_MC = """task: cf_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""

YAML_WINO = """task: cf_wino
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: gold
doc_to_choice: contexts
doc_to_target: continuation
metric_list:
  - metric: acc
"""


def main():
    os.makedirs(OUT, exist_ok=True)
    paths = {}
    for name, rows in [("mc", MC), ("wino", WINO)]:
        paths[name] = os.path.join(OUT, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    with tempfile.TemporaryDirectory() as tasks:
        open(os.path.join(tasks, "cf_mc.yaml"), "w").write(YAML_MC.format(path=paths["mc"]))
        open(os.path.join(tasks, "cf_wino.yaml"), "w").write(YAML_WINO.format(path=paths["wino"]))
        tm = TaskManager(include_path=tasks)
        for model in ["llama", "qwen2"]:
            path = os.path.join(ROOT, "fixtures", "models", model)
            res = lm_eval.simple_evaluate(
                model="hf",
                model_args=f"pretrained={path},dtype=float32",
                tasks=["cf_mc", "cf_wino"],
                task_manager=tm,
                log_samples=True,
                batch_size=1,
                device="cpu",
            )
            ref = {"lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "0.4.8", "tasks": {}}
            for task in ["cf_mc", "cf_wino"]:
                r = res["results"][task]
                samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
                ref["tasks"][task] = {
                    "acc": r["acc,none"],
                    "acc_stderr": r["acc_stderr,none"],
                    "acc_norm": r.get("acc_norm,none"),
                    "acc_norm_stderr": r.get("acc_norm_stderr,none"),
                    "loglikelihoods": [[float(x[0]) for x in s["filtered_resps"]] for s in samples],
                }
            with open(os.path.join(OUT, f"reference-{model}.json"), "w") as f:
                json.dump(ref, f, indent=1)
            print(model, {t: (v["acc"], v["acc_norm"]) for t, v in ref["tasks"].items()})


if __name__ == "__main__":
    main()
