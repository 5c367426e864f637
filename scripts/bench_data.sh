#!/usr/bin/env bash
# Reading 1 GB JSONL and 1 GB Parquet files: ferrite (validate every row, then read every
# record) against Python on the same files (json.loads per line; pyarrow iter_batches +
# to_pylist), rows/s and peak RSS, in one script on the same machine.
# Usage: scripts/bench_data.sh [DIR] [MB]   (PYTHON=/path/to/python with pyarrow)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/ferrite-bench-data}
MB=${2:-1024}
PY=${PYTHON:-python3}
BIN=target/release/examples/bench_read
cargo build -q --release -p ferrite-datasets --example bench_read
[ -f "$DIR/bench.parquet" ] || "$BIN" generate "$DIR" "$MB"
for f in bench.jsonl bench.parquet; do
  OUT=$("$BIN" read "$DIR/$f")
  echo "$OUT"
  OURS=$(echo "$OUT" | grep '^RESULT')
  "$PY" - "$DIR/$f" "$OURS" <<'PY'
import json, resource, sys, time
path, ours = sys.argv[1], sys.argv[2].split()
start = time.perf_counter()
n = 0
if path.endswith(".jsonl"):
    with open(path, encoding="utf-8") as f:
        for line in f:
            json.loads(line)
            n += 1
else:
    import pyarrow.parquet as pq
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        n += len(batch.to_pylist())
secs = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
rate = n / secs
print(f"python reference: {n} rows in {secs:.1f} s ({rate:.0f} rows/s), peak RSS {peak:.0f} MB")
print(f"{path}: ferrite / python rows/s = {float(ours[1]) / rate:.2f}x, peak RSS ratio = {float(ours[2]) / peak:.2f}x")
PY
done
