#!/usr/bin/env bash
# Every GPU check and benchmark in one call on the GPU machine: `ferrite gpu-check` (kernel checks
# against the composed ops, the small model against the CPU, then the Qwen2.5-0.5B-shape learner
# and generation benchmarks), PyTorch's anchor on the same card and the ratios, then a shortened
# built-in experiment with model.device = "cuda" (`ferrite run`, the product path end to end).
#
# Build here (no GPU needed), copy the anchor beside the binary, and carry gpu/ to the device:
#   source <(../shared/cuda/setup.sh)
#   CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda -p ferrite-experiments
#   mkdir -p gpu && gzip -9 -c target/cuda/release/ferrite > gpu/ferrite.gz
#   cp ../shared/cuda/torch_anchor.py gpu/
# (the CUDA binary is 80 MB, most of it candle's PTX; gzipped 20 MB fits the 64 MiB that travels)
# There:
#   scripts/gpu-check.sh [checks|bench|run|all]
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
WHAT=${1:-all}
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
BIN=gpu/ferrite
if [ ! -x "$BIN" ] && [ -f gpu/ferrite.gz ]; then
  BIN=${TMPDIR:-/tmp}/ferrite-cuda
  gzip -dc gpu/ferrite.gz > "$BIN" && chmod +x "$BIN"
fi
RC=0
# Ceilings, so that a hung kernel still leaves time for the anchor and the run. None of these
# parts has run on a GPU yet, so their times are unknown; together the ceilings exceed one device
# call (at most 600 s): if the first `all` runs long, call `checks`, `bench` and `run` separately.
# The checks and the bench run as two processes: a kernel fault in a check (which leaves the CUDA
# context unusable) does not cost the bench. Each prints every section as it ends.
if [ "$WHAT" != run ]; then
  : > "$OUT/ferrite.txt"
  PARTS=$WHAT
  [ "$WHAT" = all ] && PARTS="checks bench"
  for PART in $PARTS; do
    if [ "$PART" = checks ]; then LIMIT=${GPU_CHECK_TIMEOUT:-150}; else LIMIT=${GPU_BENCH_TIMEOUT:-300}; fi
    timeout "$LIMIT" "$BIN" gpu-check "$PART" 2>&1 | tee -a "$OUT/ferrite.txt"
    PART_RC=${PIPESTATUS[0]}
    [ "$PART_RC" = 124 ] && echo "gpu-check $PART: timed out after $LIMIT s (a kernel may hang; the sections above ran)"
    [ "$PART_RC" = 0 ] || RC=$PART_RC
  done
fi
if [ "$WHAT" = bench ] || [ "$WHAT" = all ] && [ -f gpu/torch_anchor.py ]; then
  timeout "${ANCHOR_TIMEOUT:-180}" python3 gpu/torch_anchor.py 2>&1 | grep '^{' | tee "$OUT/torch.jsonl"
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
if [ "$WHAT" = run ] || [ "$WHAT" = all ]; then
  # the built-in experiment, shortened (300 SFT steps, 20 GRPO steps, 200 held-out problems)
  echo; echo "ferrite run, model.device = cuda"
  timeout 240 "$BIN" --no-progress --log-level warn run --out "$OUT/run-cuda" \
    --set model.device=cuda --set sft.steps=300 --set run.steps=20 --set run.eval_every=0 \
    --set run.checkpoint_every=0 --set data.eval_size=200 --set data.eval_samples=0 2>&1 | tail -5
  RUN_RC=${PIPESTATUS[0]}
  if [ "$RUN_RC" = 0 ]; then
    # resumed on the GPU: the checkpoint, the base model and the optimizer's masters meet there
    echo "resumed to 24 steps"
    timeout 120 "$BIN" --no-progress --log-level warn run --resume "$OUT/run-cuda" \
      --set run.steps=24 2>&1 | tail -3
    RUN_RC=${PIPESTATUS[0]}
  fi
  [ -f "$OUT/run-cuda/summary.json" ] && cat "$OUT/run-cuda/summary.json"
  [ "$RUN_RC" = 0 ] || RC=$RUN_RC
fi
exit "$RC"
