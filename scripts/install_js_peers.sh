#!/usr/bin/env bash
# Install the JavaScript runtimes the tests run our exports on (tests/test_transformers_js.py,
# tests/test_web.py): transformers.js (with the onnxruntime-node, onnxruntime-web and
# @huggingface/tokenizers it brings) and puppeteer-core (drives a browser; downloads none), from
# npm, outside the repository.
#
#   scripts/install_js_peers.sh [DIR]
#
# DIR (default: $MOE_ONNX_JS_DIR, else ~/.cache/moe-onnx/js) receives node_modules/ (~475 MB).
# onnxruntime-node's postinstall would download from outside the npm registry: skipped (its CPU
# binaries ship in the package). Idempotent; needs node >= 18 and npm.
set -euo pipefail
DIR="${1:-${MOE_ONNX_JS_DIR:-$HOME/.cache/moe-onnx/js}}"
VERSION="${TRANSFORMERS_JS_VERSION:-4.3.2}"
PUPPETEER="${PUPPETEER_CORE_VERSION:-24}"
command -v npm >/dev/null || { echo "[install_js_peers] npm not found" >&2; exit 1; }
mkdir -p "$DIR"
if [[ -f "$DIR/node_modules/@huggingface/transformers/package.json" ]] &&
   grep -q "\"version\": \"$VERSION\"" "$DIR/node_modules/@huggingface/transformers/package.json" &&
   [[ -f "$DIR/node_modules/puppeteer-core/package.json" ]]; then
    echo "$DIR"
    exit 0
fi
ONNXRUNTIME_NODE_INSTALL=skip npm install --prefix "$DIR" --no-audit --no-fund --loglevel=error \
    "@huggingface/transformers@$VERSION" "puppeteer-core@$PUPPETEER" >&2
echo "$DIR"
