#!/usr/bin/env bash
# The paper's experiment in miniature, with error bars. A base model learns a small procedural
# world (capitals and sums), is fine-tuned on a new task (people's jobs), and forgets. Plain
# fine-tuning is compared with context-free samples of the base mixed into the task data (1, 2
# and 4 per task record, sampled at temperature 1 and 0.7), contextual synthetic data, replay of
# the base's own corpus, LoRA, ℓ2 regularisation toward the base, and WiSE-FT (the base and the
# plain fine-tune interpolated, α = 0.25, 0.5, 0.75). Every run is repeated for each seed (the
# seed of the samples, the mix and the training); every number in the table is a mean over
# seeds with its 95% interval (examples/demo_report.rs says how). Every step is one of the cf
# tools.
#
#   examples/forgetting/run.sh [--quick] [OUT]      (default out/forgetting)
#
# --quick: one epoch everywhere, 2 seeds and 20 questions per skill (the test suite's run).
# Knobs (environment): SEEDS ("1 2 3 4 5"), BASE_EPOCHS (20), EPOCHS (6), LR (3e-3), LORA_EPOCHS
# (30), LORA_LR (3e-3), L2 (0.03), JOBS (parallel tool runs: the number of cores), CF_BIN (where the
# built binaries are; default: build them here).
#
# LoRA gets 5× the epochs: with the others' 6 it learns nothing of the new task here (PEFT does
# the same with this recipe). The job follows from a name's last syllable, and the base's
# embeddings of those syllables are nearly alike (it never had to tell them apart); LoRA cannot
# change embeddings, so it needs many more steps to separate them through the layers.
set -euo pipefail
cd "$(dirname "$0")/../.."
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
out="${1:-out/forgetting}"
if [ $quick = 1 ]; then
  : "${SEEDS:=1 2}" "${BASE_EPOCHS:=1}" "${EPOCHS:=1}" "${LORA_EPOCHS:=1}"
  limit=(--limit 20)
else
  limit=()
fi
SEEDS="${SEEDS:-1 2 3 4 5}" BASE_EPOCHS="${BASE_EPOCHS:-20}" EPOCHS="${EPOCHS:-6}" LR="${LR:-3e-3}"
LORA_EPOCHS="${LORA_EPOCHS:-30}" LORA_LR="${LORA_LR:-3e-3}" L2="${L2:-0.03}" JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
if [ -z "${CF_BIN:-}" ]; then
  cargo build --release --quiet --bins --examples
  CF_BIN=target/release
fi
PATH="$CF_BIN:$PATH"
mkdir -p "$out"
say() { echo "forgetting: $*" >&2; }

# A small job pool: at most JOBS tools at once, each on one thread (these models are tiny, and
# one process per core beats two threads per process). A failed job stops the run.
export CF_THREADS=1
failed="$out/.failed"
rm -f "$failed"
job() {
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  [ ! -e "$failed" ] || { say "a job failed: $(cat "$failed")"; wait; exit 1; }
  ( "$@" || { echo "$*" >> "$failed"; exit 1; } ) &
}
drain() {
  wait
  [ ! -e "$failed" ] || { say "a job failed: $(cat "$failed")"; exit 1; }
}

# 1. The world and the base model (the base is kept when already built with these settings).
"$CF_BIN/examples/demo_data" "$out/data"
d="$out/data"
base="$out/base"
if [ ! -f "$base/model.safetensors" ] || [ "$(cat "$base/.epochs" 2>/dev/null)" != "$BASE_EPOCHS" ]; then
  say "pretraining the base model ($BASE_EPOCHS epochs)"
  cf-train --model "$d/base-init" "$d/corpus.jsonl" -o "$base" --lr 5e-3 \
    --epochs "$BASE_EPOCHS" --batch-size 32 --schedule cosine --warmup-ratio 0.05 \
    --weight-decay 0.01 --seed 1 -q --overwrite
  echo "$BASE_EPOCHS" > "$base/.epochs"
fi

# 2. Samples of the base, per seed: context-free at temperature 1 and 0.7 (4 per task record at
#    most), and contextual (continuations of the new task's training prompts). One more set of
#    context-free samples, never trained on, is where cf-kl measures KL(base ‖ run).
tasks=$(wc -l < "$d/new_train.jsonl")
job cf-sample --model "$base" -n 500 --max-tokens 32 --seed 1000 -q -o "$out/heldout.jsonl"
for s in $SEEDS; do
  mkdir -p "$out/s$s"
  job cf-sample --model "$base" -n $((4 * tasks)) --max-tokens 32 --seed $((100 * s + 1)) -q -o "$out/s$s/cfs-t1.jsonl"
  job cf-sample --model "$base" -n $((4 * tasks)) --max-tokens 32 --temperature 0.7 --seed $((100 * s + 2)) \
    -q -o "$out/s$s/cfs-t0.7.jsonl"
  job cf-sample --model "$base" --prompts "$d/new_prompts.jsonl" -n 4 --max-tokens 16 --seed $((100 * s + 3)) \
    -q -o "$out/s$s/ctx.jsonl"
done
drain

# 3. The mixes: the task data, plus R records of another source per task record.
for s in $SEEDS; do
  m="$out/s$s"
  mix() { cf-mix task:"$d/new_train.jsonl" "$@" --seed "$s" -q; }
  mix -o "$m/mix-plain.jsonl"
  for r in 1 2 4; do
    mix cf:"$m/cfs-t1.jsonl"=per:$r -o "$m/mix-cf-${r}x.jsonl"
    mix cf:"$m/cfs-t0.7.jsonl"=per:$r -o "$m/mix-cf-${r}x-t0.7.jsonl"
  done
  mix ctx:"$m/ctx.jsonl"=per:4 -o "$m/mix-contextual-4x.jsonl"
  mix replay:"$d/replay.jsonl"=per:4 -o "$m/mix-replay-4x.jsonl" 2>/dev/null
done

# 4. Fine-tune each way and seed, with the same optimiser settings and epochs over each mix.
trained=(plain cf-1x cf-2x cf-4x cf-1x-t0.7 cf-2x-t0.7 cf-4x-t0.7 contextual-4x replay-4x lora l2)
wise=(wise-0.25 wise-0.5 wise-0.75)
rm -rf "$out/runs" && mkdir -p "$out/runs"
say "fine-tuning ${#trained[@]} ways × seeds $SEEDS, $JOBS at a time"
for s in $SEEDS; do
  mkdir -p "$out/runs/s$s"
  for run in "${trained[@]}"; do
    mix="$out/s$s/mix-$run.jsonl" extra=(--lr "$LR" --epochs "$EPOCHS")
    case $run in
      lora) mix="$out/s$s/mix-plain.jsonl"
        extra=(--lr "$LORA_LR" --epochs "$LORA_EPOCHS" --lora-rank 8 --lora-targets all) ;;
      l2) mix="$out/s$s/mix-plain.jsonl" extra+=(--l2-init "$L2") ;;
    esac
    job cf-train --model "$base" "$mix" -o "$out/runs/s$s/$run" --batch-size 8 \
      --schedule constant --seed "$s" --metrics "$out/runs/s$s/$run.metrics.jsonl" -q "${extra[@]}"
  done
done
drain
# WiSE-FT: (1 − α)·base + α·plain, from each seed's plain run.
for s in $SEEDS; do
  for a in 0.25 0.5 0.75; do
    job cf-merge --base "$base" --model "$out/runs/s$s/plain" --alpha "$a" -o "$out/runs/s$s/wise-$a" -q
  done
done
drain

# 5. Measure every model: old skills and the new task (cf-eval, each question logged), distance
#    from the base on the held-out samples (cf-kl, each sample's value kept).
say "evaluating"
tasks=(--task "$d/old_capitals.jsonl" --task "$d/old_sums.jsonl" --task "$d/new_eval.jsonl" --batch-size 64
  "${limit[@]}")
job cf-eval --model "$base" "${tasks[@]}" -q -o "$out/runs/base.eval.json" --log-samples "$out/runs/base.samples.jsonl"
for s in $SEEDS; do
  for run in "${trained[@]}" "${wise[@]}"; do
    r="$out/runs/s$s/$run"  # the LoRA run is an adapter folder: a model like the others
    job cf-eval --model "$r" "${tasks[@]}" -q -o "$r.eval.json" --log-samples "$r.samples.jsonl"
    job sh -c 'cf-kl --base "$1" --model "$2" "$3" --per-record "$2.kl.jsonl" -q > "$2.kl.json"' \
      - "$base" "$r" "$out/heldout.jsonl"
  done
done
drain

# 6. The table, the plot and every number with its interval.
"$CF_BIN/examples/demo_report" "$out/runs" "$(echo $SEEDS | tr ' ' ',')" base "${trained[@]}" "${wise[@]}" \
  > "$out/results.md"
cat "$out/results.md"
say "wrote $out/results.md, $out/results.svg and $out/results.json"
