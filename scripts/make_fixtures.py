#!/usr/bin/env python3
"""Make the tiny test models and their float64 reference numbers with transformers.

    python3 scripts/make_fixtures.py                    # writes fixtures/models/<name>/
    python3 scripts/make_fixtures.py --references-only  # recomputes reference.json only

Needs the releases pinned in scripts/requirements.txt (the models were made with transformers
4.48; their references were recomputed with the pinned transformers 5 by --references-only,
which also writes fixtures/config-v5/). The outputs are committed, so the Rust tests
never need Python. Each model is a random-weight model of one family, with norm weights and
biases random too (so a parameter the Rust decoder skipped would show), saved by
`save_pretrained` as safetensors, with a real byte-level BPE tokenizer.json trained here on a
procedural corpus.

reference.json holds, computed in float64:
  - `sequences`: token id lists, and `logprobs`: log p(x[i+1] | x[..=i]) for each;
  - `greedy`: the argmax continuation of `prefix` for `n` steps (no EOS stop), with the smallest
    top-1/top-2 logit margin seen, so a test knows the continuation is well defined.

transformers computes RMSNorm, OLMo's LayerNorm and the rotary angles in float32 even for a
float64 model (`hidden_states.to(torch.float32)`), and eager attention's softmax too. For a true
float64 reference this script patches those to compute in float64 when the input is float64,
and uses SDPA attention, which keeps the dtype. The float32 behaviour is unchanged.
"""
import json
import os
import random
import shutil
import tempfile
import sys

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, decoders, trainers, processors

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "models")

SPECIALS = ["<|endoftext|>", "<s>", "</s>", "<pad>", "<think>", "</think>", "<|im_start|>", "<|im_end|>"]

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus(n=3000, seed=0):
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the river", "seven birds", "the old king", "a robot"]
    verbs = ["sees", "likes", "jumps over", "counts", "remembers", "paints", "follows"]
    objects = ["the moon", "three apples", "a red house", "the number 42", "green fields", "the sea"]
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        kind = rng.random()
        if kind < 0.5:
            lines.append(f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}.")
        elif kind < 0.8:
            lines.append(f"Question: what is {a} plus {b}? Answer: {a + b}.")
        else:
            lines.append(f"Fact {a}: {rng.choice(subjects)} is older than {rng.choice(subjects)}.")
    return lines


def make_tokenizer(vocab_size=320):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


FAMILIES = {
    # Llama 2 style: GQA, untied, no bias, BOS added by the tokenizer.
    "llama": dict(
        cls="LlamaForCausalLM", cfg_cls="LlamaConfig", bos="<s>", eos="</s>", add_bos=True,
        cfg=dict(num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0),
    ),
    # Llama 3.1 / R1-Distill style rope scaling, plus attention and MLP biases, tied embeddings,
    # an explicit head_dim that differs from hidden/heads.
    "llama3": dict(
        cls="LlamaForCausalLM", cfg_cls="LlamaConfig", bos="<s>", eos="</s>", add_bos=True,
        cfg=dict(
            num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True, mlp_bias=True, head_dim=24,
            rope_theta=500000.0,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=32),
        ),
    ),
    # OLMo-1B-hf style: no BOS (documents start after EOS), non-parametric LayerNorm, clip_qkv.
    "olmo": dict(
        cls="OlmoForCausalLM", cfg_cls="OlmoConfig", bos=None, eos="<|endoftext|>", add_bos=False,
        cfg=dict(num_key_value_heads=4, tie_word_embeddings=True, clip_qkv=0.8, pad_token_id=3,
                 bos_token_id=None, eos_token_id=0),
    ),
    # OLMo-2 style: norms after each sublayer, q/k norm over the full projection.
    "olmo2": dict(
        cls="Olmo2ForCausalLM", cfg_cls="Olmo2Config", bos="<|endoftext|>", eos="<|endoftext|>", add_bos=False,
        cfg=dict(num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-6, pad_token_id=3,
                 bos_token_id=0, eos_token_id=0),
    ),
    # Qwen2 style: q/k/v bias, no BOS token in the tokenizer, tied embeddings, GQA 4/1.
    "qwen2": dict(
        cls="Qwen2ForCausalLM", cfg_cls="Qwen2Config", bos=None, eos="<|endoftext|>", add_bos=False, chat=True,
        cfg=dict(num_key_value_heads=1, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0,
                 bos_token_id=0, eos_token_id=0, use_sliding_window=False),
    ),
}

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

BASE = dict(vocab_size=336, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, hidden_act="silu")


def patch_float64():
    """Make transformers' norms and rotary angles honour float64 (see module docstring)."""
    from transformers.models.llama import modeling_llama
    from transformers.models.olmo import modeling_olmo
    from transformers.models.olmo2 import modeling_olmo2
    from transformers.models.qwen2 import modeling_qwen2

    def wide(x):
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def rms_forward(self, x):
        h = x.to(wide(x))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)

    def olmo_ln_forward(self, x):
        return F.layer_norm(x.to(wide(x)), self.normalized_shape, None, None, eps=1e-5).to(x.dtype)

    def rot_forward(self, x, position_ids):
        if x.dtype != torch.float64:
            return self._cf_orig_forward(x, position_ids)
        freqs = position_ids[:, :, None].to(torch.float64) * self.inv_freq.to(torch.float64)[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    for cls in (modeling_llama.LlamaRMSNorm, modeling_qwen2.Qwen2RMSNorm, modeling_olmo2.Olmo2RMSNorm):
        cls.forward = rms_forward
    modeling_olmo.OlmoLayerNorm.forward = olmo_ln_forward
    for cls in (modeling_llama.LlamaRotaryEmbedding, modeling_qwen2.Qwen2RotaryEmbedding,
                modeling_olmo.OlmoRotaryEmbedding, modeling_olmo2.Olmo2RotaryEmbedding):
        cls._cf_orig_forward = cls.forward
        cls.forward = rot_forward


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[1] ** 0.5) * 1.2)


def logprobs64(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].to(torch.float64)
    lp = torch.log_softmax(logits, -1)
    return [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def greedy64(model, prefix, n):
    ids = list(prefix)
    margin = float("inf")
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            top = torch.topk(logits, 2).values
            margin = min(margin, (top[0] - top[1]).item())
            ids.append(int(logits.argmax()))
    return ids[len(prefix):], margin


def tokenizer_files(out, tok, fam):
    t = Tokenizer.from_str(tok.to_str())
    if fam["add_bos"]:
        bos_id = t.token_to_id(fam["bos"])
        t.post_processor = processors.TemplateProcessing(
            single=f"{fam['bos']} $A", pair=f"{fam['bos']} $A {fam['bos']} $B", special_tokens=[(fam["bos"], bos_id)]
        )
    if fam["cls"].startswith("Qwen2"):
        # transformers 5 rebuilds a qwen2 model's pre-tokenizer as Qwen2Tokenizer's (single
        # digits, NFC), whatever tokenizer.json says; real Qwen2 tokenizer.json files carry the
        # same, so the fixture does too and the tokenizers crate agrees with transformers.
        t.normalizer = normalizers.NFC()
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    t.save(os.path.join(out, "tokenizer.json"))
    tc = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": fam["bos"],
        "eos_token": fam["eos"],
        "pad_token": "<pad>",
        "add_bos_token": fam["add_bos"],
        "model_max_length": 128,
    }
    if fam.get("chat"):
        tc["chat_template"] = CHATML
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=2)


def build(name, fam, tok, seed, dtype=None):
    cfg_cls = getattr(transformers, fam["cfg_cls"])
    model_cls = getattr(transformers, fam["cls"])
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    cfg_kw = dict(BASE, **fam["cfg"])
    if fam["bos"] is not None:
        cfg_kw.setdefault("bos_token_id", ids[fam["bos"]])
    cfg_kw.setdefault("eos_token_id", ids[fam["eos"]])
    cfg = cfg_cls(**cfg_kw)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    randomize(model, seed)
    if dtype is not None:
        model = model.to(dtype)
    return model


def reference(model, tok, fam, vocab_len, seed):
    rng = random.Random(seed)
    for prm in model.parameters():
        prm.data = prm.data.to(torch.float64)
    m64 = model.to(torch.float64)
    start = tok.token_to_id(fam["bos"] or fam["eos"])
    text_ids = tok.encode("Question: what is 12 plus 30? Answer: 42.").ids
    seqs = [
        [start] + text_ids,
        [start] + [rng.randrange(vocab_len) for _ in range(6)],
        [start] + [rng.randrange(vocab_len) for _ in range(40)],
    ]
    greedy, margin = greedy64(m64, [start], 24)
    return {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "sequences": seqs,
        "logprobs": [logprobs64(m64, s) for s in seqs],
        "greedy": {"prefix": [start], "tokens": greedy, "min_margin": margin},
    }


def references_only():
    """Recompute every fixture's reference.json with the installed transformers, on the stored
    weights and sequences (the models themselves are not remade), and write the config.json that
    this transformers' save_pretrained writes for each to fixtures/config-v5/<family>.json
    (transformers 5: `rope_parameters` and `dtype`, where transformers 4 wrote `rope_theta`,
    `rope_scaling` and `torch_dtype`)."""
    v5 = os.path.join(os.path.dirname(ROOT), "config-v5")
    os.makedirs(v5, exist_ok=True)
    for name in list(FAMILIES) + ["llama-bf16"]:
        out = os.path.join(ROOT, name)
        with open(os.path.join(out, "reference.json")) as f:
            old = json.load(f)
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64, attn_implementation="sdpa")
        ref = dict(old)
        ref["transformers_version"] = transformers.__version__
        ref["torch_version"] = torch.__version__
        ref["logprobs"] = [logprobs64(model, s) for s in old["sequences"]]
        greedy, margin = greedy64(model, old["greedy"]["prefix"], len(old["greedy"]["tokens"]))
        ref["greedy"] = {"prefix": old["greedy"]["prefix"], "tokens": greedy, "min_margin": margin}
        drift = max(abs(a - b) for x, y in zip(old["logprobs"], ref["logprobs"]) for a, b in zip(x, y))
        with open(os.path.join(out, "reference.json"), "w") as f:
            json.dump(ref, f, indent=1)
        with tempfile.TemporaryDirectory() as d:
            transformers.AutoConfig.from_pretrained(out).save_pretrained(d)
            shutil.copy(os.path.join(d, "config.json"), os.path.join(v5, f"{name}.json"))
        print(f"{name}: max |Δ logprob| against the previous reference {drift:.2e}, "
              f"greedy {'same' if greedy == old['greedy']['tokens'] else 'DIFFERENT'}", file=sys.stderr)


def main():
    patch_float64()
    if "--references-only" in sys.argv:
        return references_only()
    tok = make_tokenizer()
    vocab_len = tok.get_vocab_size()
    assert vocab_len <= BASE["vocab_size"], vocab_len
    todo = list(FAMILIES.items()) + [("llama-bf16", FAMILIES["llama"])]
    for i, (name, fam) in enumerate(todo):
        out = os.path.join(ROOT, name)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        seed = 1000 + (0 if name == "llama-bf16" else i)
        if name == "llama-bf16":
            # The same weights as `llama`, stored in bfloat16; the reference is the float64
            # model of the bf16-rounded weights.
            # Only parameters are rounded: `.to(bfloat16)` would round the rotary inv_freq
            # buffer too, which transformers keeps in float32.
            model = build(name, fam, tok, 1000)
            for prm in model.parameters():
                prm.data = prm.data.to(torch.bfloat16)
        else:
            model = build(name, fam, tok, seed)
        model.config.attn_implementation = "sdpa"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer_files(out, tok, fam)
        ref = reference(model, tok, fam, vocab_len, seed)
        ref["family"] = name
        with open(os.path.join(out, "reference.json"), "w") as f:
            json.dump(ref, f, indent=1)
        print(f"{name}: greedy margin {ref['greedy']['min_margin']:.4f}, "
              f"mean logprob {sum(ref['logprobs'][0]) / len(ref['logprobs'][0]):.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
