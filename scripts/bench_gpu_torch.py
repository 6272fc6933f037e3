#!/usr/bin/env python3
"""The PyTorch / transformers side of scripts/bench_gpu.sh: the same work on the same model and
device, and the derived figures (decode step time against the memory-bandwidth bound, MFU).

Called by bench_gpu.sh as: MODEL DEVICE "BATCHES" NEW SEQLEN STEPS SHAPE ROW...
where each ROW is "name|cf tokens/s" in the order bench_gpu.sh measured them.
"""
import json
import sys
import time

import torch
import transformers

model_dir, device, batches, new, seqlen, steps, shape = sys.argv[1:8]
cf_rows = [r.split("|") for r in sys.argv[8:]]
batches, new, seqlen, steps = [int(b) for b in batches.split()], int(new), int(seqlen), int(steps)
dev = torch.device("cuda" if device.startswith("cuda") else "cpu")
dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
cfg = json.load(open(f"{model_dir}/config.json"))


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def load():
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(dev)


m = load().eval()
n_params = sum(p.numel() for p in m.parameters())
torch_rows = []
with torch.no_grad():
    for b in batches:
        n = 4 if b == 1 else b
        ids = torch.ones((b, 1), dtype=torch.long, device=dev)
        t0, done = time.perf_counter(), 0
        while done < n:
            m.generate(ids, do_sample=True, top_k=0, temperature=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
            done += b
        sync()
        torch_rows.append(n * new / (time.perf_counter() - t0))
    # Scoring: two forward passes (base and model) over 32 x (new + 1) tokens, log-softmax, exact KL.
    b = batches[1] if len(batches) > 1 else batches[0]
    ids = torch.randint(0, 300, (b, new + 1), device=dev)
    t0 = time.perf_counter()
    for i in range(0, b, 16):
        x = ids[i:i + 16]
        lp_m = torch.log_softmax(m(x).logits[:, :-1].float(), -1)
        lp_b = torch.log_softmax(m(x).logits[:, :-1].float(), -1)
        (lp_b.exp() * (lp_b - lp_m)).sum().item()
    sync()
    torch_rows.append(2 * b * new / (time.perf_counter() - t0))
# Training: AdamW, full fine-tuning (or LoRA r16 on every projection for llama3-8b), seq seqlen.
m.train()
if shape == "llama3-8b":
    import peft
    m = peft.get_peft_model(m, peft.LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for p in m.parameters():
        if p.requires_grad:
            p.data = p.data.float()
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
x = torch.randint(0, 300, (1, seqlen), device=dev)
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    loss = m(x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    sync()
    times.append(time.perf_counter() - t0)
torch_rows.append(seqlen / (sum(times[1:]) / len(times[1:])))
peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else float("nan")

print(f"transformers {transformers.__version__}, torch {torch.__version__}, {n_params / 1e9:.2f} B parameters\n")
print("| measurement | cf tokens/s | PyTorch tokens/s | cf / PyTorch |\n|---|---|---|---|")
for (name, cf), t in zip(cf_rows, torch_rows):
    cf = float(cf)
    print(f"| {name} | {cf:,.0f} | {t:,.0f} | {cf / t:.2f} |")
print(f"\nPyTorch training peak memory (max_memory_allocated): {peak:,.0f} MiB")
if dev.type == "cuda":
    name = torch.cuda.get_device_name()
    bw = 4.8e12 if "H200" in name else 3.35e12 if "H100" in name and "PCIe" not in name else 2.0e12
    bytes_ = n_params * (2 if dtype == torch.bfloat16 else 4)
    print(f"\nDecode bound at batch 1: weight bytes / bandwidth = {bytes_ / 1e9:.1f} GB / {bw / 1e12:.2f} TB/s = {bytes_ / bw * 1e3:.2f} ms per step; "
          f"measured cf {1e3 / float(cf_rows[0][1]):.2f} ms, PyTorch {1e3 / torch_rows[0]:.2f} ms")
    peak_flops = 989e12  # H100 SXM dense bf16
    cf_train = float(cf_rows[len(batches) + 1][1])
    print(f"MFU (6·N FLOPs per token against {peak_flops / 1e12:.0f} TFLOP/s): cf {6 * n_params * cf_train / peak_flops:.1%}, PyTorch {6 * n_params * torch_rows[-1] / peak_flops:.1%}")
