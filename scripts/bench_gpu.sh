#!/usr/bin/env bash
# GPU benchmarks for issue "CUDA: sampling and training on the GPU, measured": cf-sample, cf-kl
# and cf-train on random weights in the real shapes of OLMo-1B or Llama-3-8B, beside PyTorch /
# transformers doing the same work on the same GPU in the same run. Writes OUT/BENCH.md.
#
#   cargo build --release --features cuda --bins --examples    # first (see README: Building for CUDA)
#   scripts/bench_gpu.sh olmo-1b   [cuda] [OUT]
#   scripts/bench_gpu.sh llama3-8b [cuda] [OUT]
#   QUICK=1 scripts/bench_gpu.sh small cpu                      # a check of the harness itself
#
# cf-train runs full fine-tuning for olmo-1b and small, LoRA (rank 16, all projections) for
# llama3-8b, at sequence length 2048 (QUICK: 64), micro-batch 1. Peak GPU memory is polled from
# nvidia-smi every 200 ms.
set -euo pipefail
cd "$(dirname "$0")/.."
shape="${1:?shape: olmo-1b, llama3-8b or small}"
device="${2:-cuda}"
out="${3:-out/bench-gpu/$shape}"
bin="${CF_BIN:-target/release}"
dtype=bf16; [ "$device" = cpu ] && dtype=f32
if [ -n "${QUICK:-}" ]; then batches="1 4"; new=16; seqlen=64; steps=3; else batches="1 32 256"; new=128; seqlen=2048; steps=6; fi
mkdir -p "$out"
m="$out/model"
[ -f "$m/model.safetensors" ] || "$bin/examples/random_model" "$shape" "$dtype" "$m"
tps() { grep -o '[0-9.]* tokens/s' | tail -1 | cut -d' ' -f1; }
peak_file="$out/.peak"
watch_mem() {  # poll GPU memory in the background until killed
  echo 0 > "$peak_file"
  if command -v nvidia-smi >/dev/null && [ "$device" != cpu ]; then
    while sleep 0.2; do
      u=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
      [ "$u" -gt "$(cat "$peak_file")" ] && echo "$u" > "$peak_file"
    done
  fi
}
rows=()
for b in $batches; do
  n=$b; [ "$b" = 1 ] && n=4
  t=$("$bin/cf-sample" --model "$m" --device "$device" --dtype "$dtype" -n "$n" --batch-size "$b" --max-tokens "$new" --ignore-eos --seed 1 2>&1 >"$out/samples-b$b.jsonl" | tps)
  rows+=("cf-sample decode, batch $b, $new new tokens|$t")
done
kl_in="$out/samples-b$(echo $batches | awk '{print $2}').jsonl"
t=$("$bin/cf-kl" --base "$m" --model "$m" --device "$device" --dtype "$dtype" "$kl_in" -q | grep -o '"tokens_per_s": [0-9.]*' | cut -d' ' -f2)
rows+=("cf-kl scoring, 2 models, exact token KL|$t")
# Training data: sequences of exactly seqlen tokens, sampled from the model itself.
"$bin/cf-sample" --model "$m" --device "$device" --dtype "$dtype" -n 4 --batch-size 4 --max-tokens $((seqlen - 1)) --ignore-eos --seed 2 -q -o "$out/train.jsonl"
train_flags=(--lr 1e-5 --max-steps "$steps" --batch-size 1 --max-length "$seqlen" --schedule constant -q)
[ "$shape" = llama3-8b ] && train_flags+=(--lora-rank 16 --lora-targets all)
watch_mem & watcher=$!
"$bin/cf-train" --model "$m" --device "$device" --dtype "$dtype" "$out/train.jsonl" -o "$out/ft" --metrics "$out/train-metrics.jsonl" "${train_flags[@]}"
kill $watcher 2>/dev/null || true
# Steady state: the mean over steps after the first.
t=$(tail -n +2 "$out/train-metrics.jsonl" | grep -o '"tokens_per_second":[0-9.]*' | cut -d: -f2 | awk '{s+=$1} END {print s/NR}')
kind=""; [ "$shape" = llama3-8b ] && kind=", LoRA r16"
rows+=("cf-train step, seq $seqlen, micro-batch 1$kind|$t")
peak=$(cat "$peak_file")
rm -f "$out/train-metrics.jsonl"
{
  echo "## $shape on $device ($dtype)"
  echo
  if [ "$device" != cpu ] && command -v nvidia-smi >/dev/null; then
    echo "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"; echo
  fi
  echo "| measurement | cf tokens/s |"
  echo "|---|---|"
  for r in "${rows[@]}"; do echo "| ${r%%|*} | ${r##*|} |"; done
  echo
  echo "cf-train peak GPU memory (nvidia-smi, whole process): ${peak} MiB"
  echo
  if python3 -c "import torch, transformers" 2>/dev/null; then
    python3 scripts/bench_gpu_torch.py "$m" "$device" "$batches" "$new" "$seqlen" "$steps" "$shape" "${rows[@]}"
  else
    echo "(PyTorch/transformers not installed: no comparison)"
  fi
} | tee "$out/BENCH.md"
