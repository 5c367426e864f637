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
#   scripts/gpu-check.sh [all|bench|checks|run|anchor]   (all: in one device call of <= 600 s)
# (every part but `anchor` first compiles the kernel modules into the driver's cache: see below)
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
# One device call is at most 600 s and no part of this has run on a GPU yet, so `all` runs
# against one deadline (GPU_CHECK_BUDGET, 530 s from here), most telling part first:
#   PyTorch's anchor (known code, about two minutes), then ferrite's bench (which prints the
#   headline learner and generation figures first), the ratios, the kernel checks, and the
#   built-in run with whatever time is left.
# Each part gets at most its own ceiling and never the time reserved for the parts after it,
# so a part that hangs costs its share only. The checks and the bench are two processes: a
# kernel fault in one (which leaves the CUDA context unusable) does not cost the other.
# Every part prints each section as it ends, so a part cut short still shows what it finished.
BUDGET=${GPU_CHECK_BUDGET:-530}
# seconds a part whose ceiling is $1 may run: the ceiling alone when one part runs, and under
# `all` no more than is left of the budget once $2 s are kept for the parts after it
share() {
  local want=$1 left=$((BUDGET - SECONDS - $2))
  [ "$WHAT" = all ] && [ "$left" -lt "$want" ] && want=$left
  echo "$want"
}

has() { [ "$WHAT" = all ] || [ "$WHAT" = "$1" ]; }
# `ferrite gpu-check PART` for at most $2 s, appended to ferrite.txt
gpu_check() {
  if [ "$2" -lt 20 ]; then echo "gpu-check $1: skipped, $2 s left of the budget"; RC=1; return; fi
  timeout "$2" "$BIN" gpu-check "$1" 2>&1 | tee -a "$OUT/ferrite.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "gpu-check $1: timed out after $2 s (a kernel may hang; the sections above ran)"
  [ "$rc" = 0 ] || RC=$rc
}
: > "$OUT/ferrite.txt"
# The driver compiles each kernel module's PTX for the GPU when a process first loads it (ptxas
# took 44 s of one core for all of them on the 2-core build machine) and keeps the code in its
# compute cache, which the later processes here then read. `gpu-check jit` fills the cache, a
# thread per module, while PyTorch's anchor runs (on the CPU: the anchor's GPU time is not
# touched), and says which module fails to load, if one does, before anything else runs.
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-$PWD/target/compute-cache}
export CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-1073741824}
mkdir -p "$CUDA_CACHE_PATH"
JIT_PID=
JIT_LIMIT=$(share "${JIT_TIMEOUT:-150}" 330)
if [ "$WHAT" != anchor ]; then
  timeout "$JIT_LIMIT" "$BIN" gpu-check jit > "$OUT/jit.txt" 2>&1 &
  JIT_PID=$!
fi
if { has bench || has anchor; } && [ -f gpu/torch_anchor.py ]; then
  LIMIT=$(share "${ANCHOR_TIMEOUT:-150}" 330)
  echo "PyTorch anchor (at most $LIMIT s)"
  if [ "$LIMIT" -ge 20 ]; then
    timeout "$LIMIT" python3 gpu/torch_anchor.py 2>&1 | grep '^{' | tee "$OUT/torch.jsonl"
  else
    echo "skipped: $LIMIT s left of the budget"
  fi
fi
if [ -n "$JIT_PID" ]; then
  wait "$JIT_PID"
  JIT_RC=$?
  echo; echo "kernel modules compiled for the GPU (exit $JIT_RC, at $SECONDS s)"
  cat "$OUT/jit.txt"
  [ "$JIT_RC" = 124 ] && echo "gpu-check jit: timed out after $JIT_LIMIT s"
fi
if has bench; then
  LIMIT=$(share "${GPU_BENCH_TIMEOUT:-300}" 150)
  echo; echo "ferrite gpu-check bench (at most $LIMIT s)"
  gpu_check bench "$LIMIT"
  [ -f "$OUT/torch.jsonl" ] && python3 - "$OUT/ferrite.txt" "$OUT/torch.jsonl" <<'PY'
import json, sys
ours = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')]
ref = [json.loads(l) for l in open(sys.argv[2]) if l.startswith('{')]
print("\nratio (ferrite / PyTorch, same card, same call)")
for o in ours:
    if o["kind"] == "learner":
        for r in ref:
            if r["kind"] == "learner" and r["B"] == o["B"] and r["T"] == o["T"]:
                tag = f'{r["attn"]}{" amp" if r["amp"] else ""}'
                # PyTorch's peak is max_memory_allocated: ours the pool's high watermark
                alloc = o.get("alloc_gib")
                mem = (f'peak allocated {alloc:.1f} / {r["peak_gib"]:.1f} GiB (device use {o["peak_gib"]:.1f})'
                       if alloc is not None else f'device use {o["peak_gib"]:.1f} / peak allocated {r["peak_gib"]:.1f} GiB')
                print(f'learner B={o["B"]} T={o["T"]}, {o.get("variant", "")}, vs {tag:<10} tok/s {o["tok_s"]:8.0f} / {r["tok_s"]:8.0f} = {o["tok_s"]/r["tok_s"]:.2f}x   {mem}')
    if o["kind"] == "rollout":
        for r in ref:
            if r["kind"] == "rollout" and r["B"] == o["B"]:
                print(f'generate B={o["B"]} vs HF generate: {o["gen_tok_s"]:8.0f} / {r["gen_tok_s"]:8.0f} tok/s = {o["gen_tok_s"]/r["gen_tok_s"]:.1f}x')
# the issue's goals: the headline learner step >= 1.3x PyTorch's (sdpa, bf16) within its peak
# memory allocated, and generation >= 10x HF generate at B=64 and B=256
print("\ngoals (issue 7)")
head = [o for o in ours if o["kind"] == "learner" and o.get("variant") == "CUDA kernels"]
sdpa = [r for r in ref if r["kind"] == "learner" and r["attn"] == "sdpa" and not r["amp"]]
if head and sdpa:
    o, r = head[0], sdpa[0]
    alloc = o.get("alloc_gib")
    speed, fits = o["tok_s"] / r["tok_s"], alloc is not None and alloc <= r["peak_gib"]
    print(f'learner B={o["B"]} T={o["T"]}: {speed:.2f}x PyTorch sdpa (goal 1.3x), peak allocated '
          f'{alloc if alloc is not None else float("nan"):.1f} / {r["peak_gib"]:.1f} GiB: '
          f'{"met" if speed >= 1.3 and fits else "NOT met"}')
else:
    print("learner: no headline step or no PyTorch sdpa step to compare")
for b in (64, 256):
    g = [o for o in ours if o["kind"] == "rollout" and o["B"] == b]
    h = [r for r in ref if r["kind"] == "rollout" and r["B"] == b]
    if g and h:
        x = g[0]["gen_tok_s"] / h[0]["gen_tok_s"]
        print(f'generate B={b}: {x:.1f}x HF generate (goal 10x): {"met" if x >= 10 else "NOT met"}')
    else:
        print(f"generate B={b}: no figure on one side")
PY
fi
if has checks; then
  LIMIT=$(share "${GPU_CHECK_TIMEOUT:-150}" 45)
  echo; echo "ferrite gpu-check checks (at most $LIMIT s)"
  gpu_check checks "$LIMIT"
fi
if has run; then
  # the built-in experiment, shortened (300 SFT steps, 20 GRPO steps, 200 held-out problems,
  # each worker generating up to 16 groups in one batch, groups_per_batch's CUDA default at one
  # step of staleness, refilled as rows finish while the staleness bound lets it start more),
  # then resumed on the GPU: the checkpoint, the base model and the optimizer's masters meet there
  LIMIT=$(share 240 0)
  echo; echo "ferrite run, model.device = cuda (at most $LIMIT s)"
  if [ "$LIMIT" -lt 20 ]; then
    echo "skipped: $LIMIT s left of the budget"
  else
    timeout "$LIMIT" "$BIN" --no-progress --log-level warn run --out "$OUT/run-cuda" \
      --set model.device=cuda --set sft.steps=300 --set run.steps=20 --set run.eval_every=0 \
      --set rollout.max_staleness=1 \
      --set run.checkpoint_every=0 --set data.eval_size=200 --set data.eval_samples=0 2>&1 | tail -5
    RUN_RC=${PIPESTATUS[0]}
    [ "$RUN_RC" = 124 ] && echo "ferrite run: timed out after $LIMIT s"
    LIMIT=$(share 120 0)
    if [ "$RUN_RC" = 0 ] && [ "$LIMIT" -ge 20 ]; then
      echo "resumed to 24 steps (at most $LIMIT s)"
      timeout "$LIMIT" "$BIN" --no-progress --log-level warn run --resume "$OUT/run-cuda" \
        --set run.steps=24 2>&1 | tail -3
      RUN_RC=${PIPESTATUS[0]}
    fi
    [ -f "$OUT/run-cuda/summary.json" ] && cat "$OUT/run-cuda/summary.json"
    # the RL steps' rollout speed and how full the workers' decode steps ran (metrics.parquet)
    [ -f "$OUT/run-cuda/metrics.parquet" ] && python3 - "$OUT/run-cuda/metrics.parquet" <<'PY'
import math, sys
try:
    import pyarrow.parquet as pq
except ImportError:
    sys.exit("metrics.parquet: no pyarrow here to read it")
t = pq.read_table(sys.argv[1]).to_pydict()
def mean(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")
print(f'RL steps {len(t["step"])}: rollout {mean(t["rollout_tokens_per_s"]):.0f} tok/s, '
      f'{mean(t["rollout_rows_per_decode_step"]):.1f} rows a decode step, learner '
      f'{mean(t["learner_tokens_per_s"]):.0f} tok/s, {mean(t["time/wait_rollout"]):.2f} s a step waiting for rollouts')
# the training-inference gap: the learner's log-probs against the sampler's, on the steps whose
# samples are all of the policy's own version (the others add the policy's drift)
stale = [c for c in t if c.startswith("staleness_") and c != "staleness_0"]
own = [i for i in range(len(t["step"])) if all(not t[c][i] for c in stale)]
if own:
    print(f'sampler vs learner log-probs, {len(own)} steps of fresh samples: behaviour KL '
          f'{mean([t["behaviour_kl"][i] for i in own]):.2e} (mean), largest |Δ| '
          f'{max(t["logprob_diff_max"][i] for i in own):.2e}')
PY
    [ "$RUN_RC" = 0 ] || RC=$RUN_RC
  fi
fi
echo "gpu-check.sh $WHAT: $SECONDS s"
exit "$RC"
