#!/usr/bin/env python3
"""TRL reference for cf-train's data processing: what SFTTrainer trains on, token by token.

    OMP_NUM_THREADS=1 python3 scripts/make_trl_reference.py     # writes fixtures/train/trl_reference.json

Needs trl 1.16.0 with transformers 5.24.0 and torch 2.15 (scripts/requirements.txt). Each case
builds a real SFTTrainer (SFTConfig(max_length=1024, assistant_only_loss=...), CPU, float32) on
one record with a tiny fixture model and its tokenizer (AutoTokenizer from fixtures/models/<model>),
and stores the input_ids and labels of its prepared train dataset, with the TRL warnings logged
while doing so. For a template case, tokenizer.chat_template is set to the text of
fixtures/train/templates/<template> first (byte-identical copies of trl/chat_templates/), and the
script checks that TRL kept that template (no swap to another training template).

llama (BPE, adds BOS <s>, EOS </s>):
  text               BOS + text + the EOS that TRL appends as a string; everything trained (the
                     label at position 0, BOS, is kept too: it is never a target after the shift).
  text_eos           text already ending in "</s>": TRL adds no second EOS.
  prompt_completion  "Question: what is 2 plus 2?" / " Answer: 4.": loss on the completion + EOS.
  prompt_split_word  "... 2? An" / "swer: 4.": the prompt's last token " An" is not a token of the
                     full text (" Answer" is), so the common prefix is shorter than the prompt; TRL
                     warns and trains from " Answer" on.
  completion_eos     completion already ending in "</s>": no second EOS.
qwen2 (ChatML specials, <think>/</think> added tokens, no BOS) with qwen3.jinja, whole sequence:
  qwen3_messages     two user/assistant turns with think blocks: the first turn's reasoning is
                     dropped by the template, the last turn's kept; everything trained.
  qwen3_prompt_completion  [user] / [assistant with think block]: loss from "<think>" on.
qwen2 with qwen3_training.jinja, assistant_only_loss: the same two records; only the
  {% generation %} spans (think block, answer, <|im_end|>\n) are trained, every think block kept.
llama with deepseek_r1_distill.jinja: the prompt ends in "<｜Assistant｜><think>\n" but the full
  render strips the reasoning, so the prompt is not a prefix (TRL warns, "<think>\n" is left out)
  and "\n\nIt is 4.<｜end▁of▁sentence｜>" is trained; messages: reasoning stripped, all trained.
llama with deepseek_r1_distill_training.jinja, assistant_only_loss: reasoning kept. messages: each
  "<｜Assistant｜>" + content + "<｜end▁of▁sentence｜>" trained; prompt/completion: the prompt's
  "<think>\n" now is a prefix, so training starts at "r1". The DeepSeek markers are not tokens of
  this fixture's vocabulary but byte-level pieces, so TRL also warns that end of turn is not
  trained, and the DeepSeek messages run to 133 and 145 tokens (the fixtures have 128 positions).
"""
import json
import logging
import os
import tempfile
import warnings

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from accelerate.logging import MultiProcessAdapter  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures")
TEMPLATES = os.path.join(FIX, "train", "templates")

MESSAGES = [
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "<think>\nr1\n</think>\n\nIt is 4."},
    {"role": "user", "content": "And 3 plus 3?"},
    {"role": "assistant", "content": "<think>\nr2\n</think>\n\nIt is 6."},
]
CONV_PC = {"prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
           "completion": [{"role": "assistant", "content": "<think>\nr1\n</think>\n\nIt is 4."}]}

# (case, model, template, assistant_only_loss, record)
CASES = [
    ("text", "llama", None, False, {"text": "The cat sees the moon."}),
    ("text_eos", "llama", None, False, {"text": "The cat sees the moon.</s>"}),
    ("prompt_completion", "llama", None, False, {"prompt": "Question: what is 2 plus 2?", "completion": " Answer: 4."}),
    ("prompt_split_word", "llama", None, False, {"prompt": "Question: what is 2 plus 2? An", "completion": "swer: 4."}),
    ("completion_eos", "llama", None, False, {"prompt": "Question: what is 2 plus 2?", "completion": " Answer: 4.</s>"}),
    ("qwen3_messages", "qwen2", "qwen3.jinja", False, {"messages": MESSAGES}),
    ("qwen3_prompt_completion", "qwen2", "qwen3.jinja", False, CONV_PC),
    ("qwen3_training_messages", "qwen2", "qwen3_training.jinja", True, {"messages": MESSAGES}),
    ("qwen3_training_prompt_completion", "qwen2", "qwen3_training.jinja", True, CONV_PC),
    ("deepseek_prompt_completion", "llama", "deepseek_r1_distill.jinja", False, CONV_PC),
    ("deepseek_messages", "llama", "deepseek_r1_distill.jinja", False, {"messages": MESSAGES}),
    ("deepseek_training_messages", "llama", "deepseek_r1_distill_training.jinja", True, {"messages": MESSAGES}),
    ("deepseek_training_prompt_completion", "llama", "deepseek_r1_distill_training.jinja", True, CONV_PC),
]


class Collect(logging.Handler):
    """Keeps the messages TRL logs at WARNING or above (without accelerate's "[RANK 0] " prefix)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage().removeprefix("[RANK 0] "))


def run_case(name, model_name, template, assistant_only_loss, record):
    model_dir = os.path.join(FIX, "models", model_name)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    if template is not None:
        tok.chat_template = open(os.path.join(TEMPLATES, template), encoding="utf-8").read()
    given_template = tok.chat_template
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    MultiProcessAdapter.warning_once.cache_clear()  # otherwise a warning seen in an earlier case is not logged again
    handler = Collect()
    logging.getLogger("trl").addHandler(handler)
    try:
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            args = SFTConfig(output_dir=out, report_to=[], use_cpu=True, bf16=False, max_length=1024,
                             assistant_only_loss=assistant_only_loss)
            trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list([record]),
                                 processing_class=tok)
    finally:
        logging.getLogger("trl").removeHandler(handler)
    msgs = handler.messages + [str(w.message) for w in caught if f"{os.sep}trl{os.sep}" in w.filename]
    # TRL must render with the template as given: no training template swapped in, none edited.
    assert trainer.chat_template is None and tok.chat_template == given_template, name
    (example,) = trainer.train_dataset
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels) < 1024, name
    if "messages" in record:  # the same ids as the template renders on its own
        assert ids == tok.apply_chat_template(record["messages"], tokenize=True, return_dict=True)["input_ids"], name
    if name == "prompt_split_word":  # the boundary really falls inside a token
        prompt_ids = tok(record["prompt"])["input_ids"]
        assert trl.data_utils.common_prefix_length(prompt_ids, ids) < len(prompt_ids), name
    trained = tok.decode([i for i, l in zip(ids, labels) if l != -100])
    print(f"== {name} ({model_name}, {template}, assistant_only_loss={assistant_only_loss})")
    print(f"   full   : {tok.decode(ids)!r}\n   trained: {trained!r}")
    for m in msgs:
        print(f"   warning: {m[:160]}")
    return {"case": name, "model": model_name, "template": template, "assistant_only_loss": assistant_only_loss,
            "record": record, "input_ids": ids, "labels": labels, "warnings": msgs}


def main():
    assert trl.__version__ == "1.16.0", trl.__version__
    datasets.disable_progress_bar()
    transformers.logging.set_verbosity_error()  # only "longer than model_max_length 128" for the DeepSeek cases
    transformers.utils.logging.disable_progress_bar()
    cases = [run_case(*c) for c in CASES]
    path = os.path.join(FIX, "train", "trl_reference.json")
    with open(path, "w", encoding="utf-8") as f:  # one case per line
        f.write("[\n" + ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n]\n")
    print(f"wrote {len(cases)} cases to {os.path.normpath(path)} (trl {trl.__version__}, transformers {transformers.__version__})")


if __name__ == "__main__":
    main()
