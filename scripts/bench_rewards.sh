#!/usr/bin/env bash
# Math-answer scoring speed: ferrite's verifier against Math-Verify (Hugging Face's, used by TRL
# and verl) on the same 10,000 GSM8K-style completions, in one script on the same machine.
# Needs a Python with math-verify: PYTHON=/path/to/python (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=$(mktemp -d)/completions.jsonl
cargo run -q --release -p ferrite-rewards --example bench_rewards -- "$OUT" > "$OUT.ours"
cat "$OUT.ours"
OURS=$(grep '^RATE' "$OUT.ours" | cut -d' ' -f2)
"$PY" - "$OUT" "$OURS" <<'PY'
import json, sys, time
from math_verify import parse, verify
rows = [json.loads(l) for l in open(sys.argv[1])]
ours = float(sys.argv[2])
start = time.perf_counter()
verdicts = [verify(parse(r["gold"]), parse(r["completion"])) for r in rows]
secs = time.perf_counter() - start
rate = len(rows) / secs
agree = sum(v == r["ferrite"] for v, r in zip(verdicts, rows))
print(f"Math-Verify: {len(rows)} completions in {secs:.3f} s = {rate:.0f} completions/s ({sum(verdicts)} judged correct)")
print(f"verdicts agree on {agree}/{len(rows)}; ferrite / Math-Verify speed = {ours / rate:.1f}x")
PY
