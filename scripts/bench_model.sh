#!/usr/bin/env bash
# Model speed on this CPU: a training step (forward, log-probs, backward, AdamW) and batched
# sampling (batch 16, 128 new tokens), ferrite against PyTorch + transformers on the same shapes
# and the same number of threads, for a tiny model and SmolLM2-135M's shape.
# Usage: scripts/bench_model.sh [THREADS]   (PYTHON=/path/to/python with torch + transformers)
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
PY=${PYTHON:-python3}
cargo build -q --release -p ferrite-learner --example bench_model
OURS=$(RAYON_NUM_THREADS=$THREADS target/release/examples/bench_model)
echo "$OURS"
TORCH=$(OMP_NUM_THREADS=$THREADS "$PY" scripts/bench_model_torch.py "$THREADS")
echo "$TORCH"
echo
printf '%-14s %-7s %14s %14s %8s\n' model phase "ferrite tok/s" "torch tok/s" ratio
while read -r _ model phase rate _; do
  ref=$(echo "$TORCH" | awk -v m="$model" -v p="$phase" '$2==m && $3==p {print $4}')
  printf '%-14s %-7s %14.0f %14.0f %7.2fx\n' "$model" "$phase" "$rate" "$ref" "$(echo "$rate / $ref" | bc -l)"
done < <(echo "$OURS" | grep '^BENCH')
