#!/usr/bin/env bash
# cf-mix on a multi-GB JSONL file beside `shuf` and DuckDB doing the same job (shuffle every
# record into a new file), in the same run: wall time and peak memory (GNU time's max RSS).
#
#   scripts/bench_mix.sh [GB] [OUT]        (default 2 GB in out/bench-mix)
set -euo pipefail
cd "$(dirname "$0")/.."
gb="${1:-2}"
out="${2:-out/bench-mix}"
mkdir -p "$out"
big="$out/big.jsonl"
if [ ! -f "$big" ] || [ "$(stat -c %s "$big")" -lt $((gb * 1000000000)) ]; then
  python3 - "$big" "$gb" <<'PY'
import json, random, sys
path, gb = sys.argv[1], float(sys.argv[2])
rng = random.Random(0)
words = "the of and a to in is you that it he was for on are as with his they at be this have from".split()
with open(path, "w") as f:
    n, size = 0, 0
    while size < gb * 1e9:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(50, 300)))
        line = json.dumps({"text": text, "id": n, "source_url": f"https://example.org/{n}"}) + "\n"
        f.write(line)
        size += len(line)
        n += 1
PY
fi
cargo build --release --quiet --bins
bytes=$(stat -c %s "$big")
lines=$(wc -l < "$big")
echo "input: $big, $bytes bytes, $lines records"
measure() {  # name, command...
  local name="$1"; shift
  sync
  read -r secs rss anon < <(python3 scripts/peakmem.py "$@")
  printf "| %s | %.1f | %.0f | %d | %d |\n" "$name" "$secs" "$(echo "$bytes / 1000000 / $secs" | bc -l)" "$rss" "$anon"
}
echo "| tool | seconds | MB/s | peak RSS MiB (incl. mapped file pages) | peak anonymous MiB |"
echo "|---|---|---|---|---|"
measure "cf-mix big.jsonl=all --seed 1 -o mix.jsonl" target/release/cf-mix "$big=all" --seed 1 -q -o "$out/mix.jsonl"
measure "shuf big.jsonl -o shuf.jsonl" shuf "$big" -o "$out/shuf.jsonl"
if python3 -c "import duckdb" 2>/dev/null; then
  measure "duckdb: copy (select * from read_json_auto(big) order by random()) to jsonl" python3 -c "
import duckdb, sys
duckdb.sql(\"copy (select * from read_json_auto('$big') order by random()) to '$out/duck.jsonl' (format json)\")"
fi
rm -f "$out/mix.jsonl" "$out/shuf.jsonl" "$out/duck.jsonl"
