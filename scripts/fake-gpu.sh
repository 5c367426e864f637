#!/usr/bin/env bash
# Runs the CUDA build of ferrite on a machine without a GPU, against a CPU stand-in for the CUDA
# libraries it links (model/kernels/emu/fake_cuda.cpp: device memory is host memory, ferrite's
# kernels run in the kernel emulator, candle's kernels and cuBLAS are not emulated), so that the
# launchers of model/src/cuda.rs run before a GPU is lent:
#   source <(../shared/cuda/setup.sh)
#   CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda -p ferrite-experiments
#   scripts/fake-gpu.sh                 # runs `ferrite gpu-check glue`
#   scripts/fake-gpu.sh gpu-check jit   # or any other ferrite command
# FERRITE_CUDA_BIN names another binary (default target/cuda/release/ferrite).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=target/fake-cuda
mkdir -p "$DIR"
# ferrite.cu with its shared memory as the emulator's race-checked arrays, and its kernels' names
# (as model/tests/kernel_emulation.rs generates them)
python3 - "$DIR" <<'PY'
import re, sys
out = sys.argv[1]
src = open("model/kernels/ferrite.cu").read().splitlines()
def decl(rest):
    rest = rest.rstrip(";")
    m = re.fullmatch(r"(.*?)\s+(\w+)(?:\[(.*)\])?", rest.strip())
    return m.groups() if m else None
lines, names = [], []
for line in src:
    t = line.strip()
    if t.startswith("extern __shared__ "):
        ty, name, _ = decl(t[len("extern __shared__ "):])
        line = f"EMU_DYNAMIC_SHARED({ty}, {name});"
    elif t.startswith("__shared__ "):
        ty, name, n = decl(t[len("__shared__ "):])
        line = f"EMU_SHARED({ty}, {name}, {n or '1'});"
    if line.startswith('extern "C" __global__ void '):
        names.append(line[len('extern "C" __global__ void '):].split("(")[0])
    lines.append(line)
assert not any("__shared__ " in l for l in lines), "unrewritten shared memory"
open(f"{out}/kernels.inc", "w").write("\n".join(lines) + "\n")
open(f"{out}/registry.inc", "w").write("".join(f'{{"{k}", runner({k})}},\n' for k in names))
PY
CXX=${CXX:-c++}
for lib in 1:libcuda.so.1 2:libcublas.so.13 3:libcurand.so.10 4:libcudart.so.13; do
  n=${lib%%:*} name=${lib#*:}
  if [ ! -f "$DIR/$name" ] || [ -n "$(find model/kernels -newer "$DIR/$name" -print -quit)" ]; then
    echo "$name { global: *; };" > "$DIR/$name.map"
    "$CXX" -std=c++20 -O3 -pthread -shared -fPIC -DFAKE_CUDA_LIB="$n" -I model/kernels/emu -I "$DIR" \
      -Wl,-soname,"$name" -Wl,--version-script="$DIR/$name.map" \
      model/kernels/emu/fake_cuda.cpp -o "$DIR/$name.new"
    mv "$DIR/$name.new" "$DIR/$name"  # a new file: a process still running keeps the old one
  fi
done
BIN=${FERRITE_CUDA_BIN:-target/cuda/release/ferrite}
if [ $# -eq 0 ]; then set -- gpu-check glue; fi
LD_LIBRARY_PATH=$PWD/$DIR exec "$BIN" "$@"
