#!/usr/bin/env bash
# The paper's experiment in miniature: a base model learns a small procedural world, is
# fine-tuned on a new task, and forgets; context-free samples of the base, mixed into the
# fine-tuning data, are compared with plain fine-tuning, contextual synthetic data, replay of
# the base's own corpus, LoRA, ℓ2 regularisation toward the base, and WiSE-FT (the base and the
# plain fine-tune interpolated). Every step is one of the cf tools.
#
#   examples/forgetting/run.sh [OUT]          (default out/forgetting)
#
# Knobs (environment): BASE_EPOCHS (40), EPOCHS (20), LR (3e-3), CF_SAMPLES (600), L2 (0.3). The test
# suite runs it with tiny values so it cannot rot. CF_BIN: where the built binaries are
# (default: build them here).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-out/forgetting}"
BASE_EPOCHS="${BASE_EPOCHS:-40}" EPOCHS="${EPOCHS:-20}" LR="${LR:-3e-3}" CF_SAMPLES="${CF_SAMPLES:-600}"
if [ -z "${CF_BIN:-}" ]; then
  cargo build --release --quiet --bins --examples
  CF_BIN=target/release
fi
PATH="$CF_BIN:$PATH"
mkdir -p "$out"
say() { echo "forgetting: $*" >&2; }

# 1. The world and the base model (skipped when already built with these settings).
"$CF_BIN/examples/demo_data" "$out/data"
d="$out/data"
if [ ! -f "$out/base/model.safetensors" ] || [ "$(cat "$out/base/.epochs" 2>/dev/null)" != "$BASE_EPOCHS" ]; then
  say "pretraining the base model ($BASE_EPOCHS epochs)"
  cf-train --model "$d/base-init" "$d/corpus.jsonl" -o "$out/base" --lr 3e-3 --epochs "$BASE_EPOCHS" \
    --batch-size 16 --schedule cosine --warmup-ratio 0.05 --weight-decay 0.01 --seed 1 -q --overwrite
  echo "$BASE_EPOCHS" > "$out/base/.epochs"
fi
base="$out/base"

# 2. Samples from the base: context-free (to train on, and a separate set to measure KL), and
#    contextual (continuations of the new task's prompts).
cf-sample --model "$base" -n "$CF_SAMPLES" --max-tokens 32 --seed 1 -q -o "$out/cfs.jsonl"
cf-sample --model "$base" -n 300 --max-tokens 32 --seed 2 -q -o "$out/cfs-heldout.jsonl"
cf-sample --model "$base" --prompts "$d/new_prompts.jsonl" -n 20 --max-tokens 16 --seed 3 -q -o "$out/ctx.jsonl"

# 3. The mixes: the task data, plus R records of another source per task record.
cf-mix task:"$d/new_train.jsonl" --seed 1 -q -o "$out/mix-plain.jsonl"
for r in 1 4; do
  cf-mix task:"$d/new_train.jsonl" cf:"$out/cfs.jsonl"=per:$r --seed 1 -q -o "$out/mix-cf$r.jsonl"
done
cf-mix task:"$d/new_train.jsonl" ctx:"$out/ctx.jsonl"=per:4 --seed 1 -q -o "$out/mix-ctx.jsonl"
cf-mix task:"$d/new_train.jsonl" replay:"$d/replay.jsonl"=per:4 --seed 1 -q -o "$out/mix-replay.jsonl"

# 4. Fine-tune each way, with the same optimiser settings and epochs over each mix.
ft() {  # name mix [extra flags]
  local name=$1 mix=$2; shift 2
  say "fine-tuning: $name"
  cf-train --model "$base" "$mix" -o "$out/runs/$name" --lr "$LR" --epochs "$EPOCHS" --batch-size 8 \
    --schedule constant --seed 1 --metrics "$out/runs/$name.metrics.jsonl" -q "$@"
}
rm -rf "$out/runs" && mkdir -p "$out/runs"
ft plain "$out/mix-plain.jsonl"
ft cf-1x "$out/mix-cf1.jsonl"
ft cf-4x "$out/mix-cf4.jsonl"
ft contextual-4x "$out/mix-ctx.jsonl"
ft replay-4x "$out/mix-replay.jsonl"
ft lora "$out/mix-plain.jsonl" --lora-rank 8 --lora-targets all
ft l2 "$out/mix-plain.jsonl" --l2-init "${L2:-0.3}"
# WiSE-FT: (1 − α)·base + α·plain, from the one plain run.
for a in 0.25 0.5 0.75; do
  cf-merge --base "$base" --model "$out/runs/plain" --alpha "$a" -o "$out/runs/wise-$a" -q
done

# 5. Measure every model: old skills and the new task (cf-eval), distance from the base (cf-kl).
tasks=(--task "$d/old_capitals.jsonl" --task "$d/old_sums.jsonl" --task "$d/new_eval.jsonl")
cf-eval --model "$base" "${tasks[@]}" -q -o "$out/runs/base.eval.json"
runs=(plain cf-1x cf-4x contextual-4x replay-4x lora l2 wise-0.25 wise-0.5 wise-0.75)
for run in "${runs[@]}"; do
  model="$out/runs/$run"  # the LoRA run is an adapter folder: a model like the others
  cf-eval --model "$model" "${tasks[@]}" --compare "$out/runs/base.eval.json" -q -o "$out/runs/$run.eval.json"
  cf-kl --base "$base" --model "$model" "$out/cfs-heldout.jsonl" -q > "$out/runs/$run.kl.json"
done

# 6. The table and the plot.
"$CF_BIN/examples/demo_report" "$out/runs" base "${runs[@]}" > "$out/results.md"
cat "$out/results.md"
say "wrote $out/results.md and $out/results.svg"
