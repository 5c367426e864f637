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
# ferrite.cu with its shared memory as the emulator's race-checked arrays (kernels.inc) and its
# kernels' registry (registry.inc), as the kernel emulation tests generate them: their test of this
# stand-in writes both (into target/tmp/kernel-emulation) and compiles the stand-in against them
cargo test -q -p ferrite-model --test kernel_emulation the_fake_cuda_libraries_compile >/dev/null
INC=target/tmp/kernel-emulation
CXX=${CXX:-c++}
for lib in 1:libcuda.so.1 2:libcublas.so.13 3:libcurand.so.10 4:libcudart.so.13; do
  n=${lib%%:*} name=${lib#*:}
  if [ ! -f "$DIR/$name" ] || [ -n "$(find model/kernels -newer "$DIR/$name" -print -quit)" ]; then
    echo "$name { global: *; };" > "$DIR/$name.map"
    "$CXX" -std=c++20 -O3 -pthread -shared -fPIC -DFAKE_CUDA_LIB="$n" -I model/kernels/emu -I "$INC" \
      -Wl,-soname,"$name" -Wl,--version-script="$DIR/$name.map" \
      model/kernels/emu/fake_cuda.cpp -o "$DIR/$name.new"
    mv "$DIR/$name.new" "$DIR/$name"  # a new file: a process still running keeps the old one
  fi
done
BIN=${FERRITE_CUDA_BIN:-target/cuda/release/ferrite}
if [ $# -eq 0 ]; then set -- gpu-check glue; fi
LD_LIBRARY_PATH=$PWD/$DIR exec "$BIN" "$@"
