#!/usr/bin/env bash
# cf-train --plan against measured peak memory on CPU (peak anonymous RSS, polled every 20 ms by
# scripts/peakmem.py), three optimizer steps so AdamW's moments exist, random weights in real
# shapes with fewer layers (examples/random_model.rs).
#
#   scripts/bench_train_memory.sh [OUT]        # writes OUT/memory.md (default out/bench-train-memory)
#
# Needs python3 (only for peakmem.py). Takes about 35 minutes on 2 cores (the Llama-3-8B 8192-token row alone about 18).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/bench-train-memory}
mkdir -p "$out"
cargo build --release --bins --example random_model -q
bin=target/release
[ -d "$out/small" ] || $bin/examples/random_model small f32 "$out/small"
[ -d "$out/olmo-1b-2l" ] || $bin/examples/random_model olmo-1b f32 "$out/olmo-1b-2l" 2
[ -d "$out/llama3-8b-2l" ] || $bin/examples/random_model llama3-8b f32 "$out/llama3-8b-2l" 2
# The small model stretched to 8192 positions (the same weights): long sequences on a narrow model.
if [ ! -d "$out/small8k" ]; then
  cp -r "$out/small" "$out/small8k"
  python3 -c "
import json, sys
p = sys.argv[1] + '/config.json'
c = json.load(open(p)); c['max_position_embeddings'] = 8192; json.dump(c, open(p, 'w'), indent=2)" "$out/small8k"
fi
data() { # B T: B sequences of T tokens (prefix + T-1 sampled ids)
  python3 -c "
import json, random
random.seed(0)
for _ in range($1):
    print(json.dumps({'prefix_ids': [1], 'token_ids': [random.randrange(3, 320) for _ in range($2 - 1)]}))" > "$out/d$1x$2.jsonl"
}
echo "| model | micro-batch | flags | predicted (MiB) | measured (MiB) | measured / predicted | seconds |" > "$out/memory.md"
echo "|---|---|---|---|---|---|---|" >> "$out/memory.md"
run() { # MODEL B T FLAGS...
  local m=$1 b=$2 t=$3; shift 3
  data "$b" "$t"
  local pred
  pred=$($bin/cf-train --model "$out/$m" x -o "$out/o" --max-length "$t" --batch-size "$b" --plan -q "$@" |
    python3 -c "import json,sys; print(round(json.load(sys.stdin)['peak_bytes'] / 2**20))")
  rm -rf "$out/o"
  read -r secs _hwm anon < <(python3 scripts/peakmem.py $bin/cf-train --model "$out/$m" "$out/d${b}x${t}.jsonl" \
    -o "$out/o" --max-steps 3 --batch-size "$b" --max-length "$t" -q "$@")
  rm -rf "$out/o"
  local ratio
  ratio=$(python3 -c "print(f'{$anon / $pred:.3f}')")
  echo "| $m | $b × $t | ${*:-(full)} | $pred | $anon | $ratio | $secs |" | tee -a "$out/memory.md"
}
run small 1 1024
run small 1 1024 --gradient-checkpointing
run small 8 256
run small 8 256 --gradient-checkpointing
run small 2 512
run small 2 512 --gradient-checkpointing
run olmo-1b-2l 1 2048 --gradient-checkpointing
run olmo-1b-2l 1 512
run olmo-1b-2l 1 1024 --gradient-checkpointing
run llama3-8b-2l 1 512 --gradient-checkpointing --lora-rank 16 --lora-targets all
run llama3-8b-2l 1 512 --lora-rank 16 --lora-targets all
run llama3-8b-2l 1 2048 --gradient-checkpointing --lora-rank 16 --lora-targets all
run llama3-8b-2l 1 8192 --gradient-checkpointing --lora-rank 16 --lora-targets all
run small8k 1 8192 --gradient-checkpointing --lora-rank 16 --lora-targets all
