#!/usr/bin/env bash
# The main job, as far as the tools exist today: context-free samples from a model that ships
# with the project (fixtures/models/olmo, a tiny random-weight OLMo made by
# scripts/make_fixtures.py), written as Parquet and JSONL, and summarised.
#
# Usage: examples/demo.sh [OUT_DIR]      (default: out/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-out/demo}"
mkdir -p "$out"
cargo build --release --quiet --bins
bin=target/release
model=fixtures/models/olmo

# 1. Context-free samples: start from the document-start token only, temperature 1, no truncation.
"$bin/cf-sample" --model "$model" -n 64 --max-tokens 48 --seed 1 --batch-size 16 -o "$out/cfs.parquet"

# 2. The same run in two shards, concatenated: the same samples as the unsharded run.
"$bin/cf-sample" --model "$model" -n 64 --max-tokens 48 --seed 1 -q > "$out/cfs.jsonl"
for k in 1 2; do
  "$bin/cf-sample" --model "$model" -n 64 --max-tokens 48 --seed 1 -q --shard "$k/2"
done > "$out/cfs.sharded.jsonl"
ids() { grep -o '"token_ids":\[[0-9,]*\]' "$1"; }
cmp <(ids "$out/cfs.jsonl") <(ids "$out/cfs.sharded.jsonl") && echo "demo: 2 shards concatenate to the unsharded samples"

# 3. A look at the records (first sample's fields, and how samples ended).
head -1 "$out/cfs.jsonl" | cut -c1-300
echo "demo: finish reasons: $(grep -o '"finish_reason":"[a-z]*"' "$out/cfs.jsonl" | sort | uniq -c | tr -s ' ' | paste -sd, -)"
echo "demo: wrote $out/cfs.parquet and $out/cfs.jsonl"
