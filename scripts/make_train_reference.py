#!/usr/bin/env python3
"""PyTorch reference for cf-train's optimiser: two AdamW steps on fixtures/models/llama.

    python3 scripts/make_train_reference.py     # writes fixtures/train/

The data (fixtures/train/tiny.jsonl, three text records) is tokenised as cf-train does:
[BOS] + tokens(text) + [EOS], loss on every token after BOS, the mean over all of them. All
three records form one batch, so cf-train's seeded order does not matter. Each step:
loss.backward(), torch.nn.utils.clip_grad_norm_(1.0), torch.optim.AdamW(lr=1e-3, betas=(0.9,
0.95), eps=1e-6, weight_decay=0.1) with no decay on norm weights and biases. eps is 1e-6 rather
than 1e-8 so that a gradient coordinate near zero, whose sign float32 rounding can flip, moves
the weight by at most lr·|g|/eps instead of a full ±lr.

Writes adamw_reference.safetensors (the weights after two steps) and adamw_reference.json
(loss and gradient norm before each step).
"""
import json
import os

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "..", "fixtures", "models", "llama")
OUT = os.path.join(HERE, "..", "fixtures", "train")

TEXTS = [
    "Question: what is 12 plus 30? Answer: 42.",
    "The cat sees the moon.",
    "Fact 7: a robot is older than the river.",
]


def main():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "tiny.jsonl"), "w") as f:
        for t in TEXTS:
            f.write(json.dumps({"text": t}) + "\n")
    tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    cfg = json.load(open(os.path.join(MODEL, "config.json")))
    bos, eos = cfg["bos_token_id"], cfg["eos_token_id"]
    seqs = [[bos] + tok.encode(t, add_special_tokens=False).ids + [eos] for t in TEXTS]
    L = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (L - len(s)) for s in seqs])
    labels = torch.tensor([s + [-100] * (L - len(s)) for s in seqs])
    labels[:, 0] = -100

    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager")
    model.train()
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if n.endswith(".bias") or n.endswith("norm.weight") else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-6,
    )
    log = []
    for _ in range(2):
        logits = model(ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        log.append({"loss": loss.item(), "grad_norm": norm.item()})
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(OUT, "adamw_reference.safetensors"), metadata={"format": "pt"})
    json.dump({"steps": log, "torch_version": torch.__version__}, open(os.path.join(OUT, "adamw_reference.json"), "w"), indent=1)
    print(log)


if __name__ == "__main__":
    main()
