#!/usr/bin/env bash
# Every GPU check and benchmark in one call on the GPU machine: ferrite's gpu-check (kernel checks
# against the composed ops, the small model against the CPU, then the Qwen2.5-0.5B-shape learner
# and generation benchmarks), then PyTorch's anchor on the same card, then the ratios.
#
# Build here (no GPU needed), copy the anchor beside the binary, and carry gpu/ to the device:
#   source <(../shared/cuda/setup.sh)
#   CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda -p ferrite-learner --bin gpu-check
#   mkdir -p gpu && cp target-cuda/release/gpu-check ../shared/cuda/torch_anchor.py gpu/
# There:
#   scripts/gpu-check.sh [checks|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
WHAT=${1:-all}
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
./gpu/gpu-check "$WHAT" 2>&1 | tee "$OUT/ferrite.txt"
RC=${PIPESTATUS[0]}
if [ "$WHAT" != checks ] && [ -f gpu/torch_anchor.py ]; then
  python3 gpu/torch_anchor.py 2>&1 | grep '^{' | tee "$OUT/torch.jsonl"
  python3 - "$OUT/ferrite.txt" "$OUT/torch.jsonl" <<'PY'
import json, sys
ours = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')]
ref = [json.loads(l) for l in open(sys.argv[2]) if l.startswith('{')]
print("\nratio (ferrite / PyTorch, same card, same call)")
for o in ours:
    if o["kind"] == "learner":
        for r in ref:
            if r["kind"] == "learner" and r["B"] == o["B"] and r["T"] == o["T"]:
                tag = f'{r["attn"]}{" amp" if r["amp"] else ""}'
                print(f'learner B={o["B"]} T={o["T"]}, {o.get("variant", "")}, vs {tag:<10} tok/s {o["tok_s"]:8.0f} / {r["tok_s"]:8.0f} = {o["tok_s"]/r["tok_s"]:.2f}x'
                      f'   peak {o["peak_gib"]:.1f} / {r["peak_gib"]:.1f} GiB')
    if o["kind"] == "rollout":
        for r in ref:
            if r["kind"] == "rollout" and r["B"] == o["B"]:
                print(f'generate B={o["B"]} vs HF generate: {o["gen_tok_s"]:8.0f} / {r["gen_tok_s"]:8.0f} tok/s = {o["gen_tok_s"]/r["gen_tok_s"]:.1f}x')
PY
fi
exit "$RC"
