#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-quantize and llama-batched-bench from the llama.cpp tree vendored in the
# llama-cpp-python sdist (the only source of llama.cpp on this machine: PyPI), for the
# `moe-onnx bench --llama-cpp DIR` peer.
#
#   scripts/build_llama_cpp.sh [CACHE_DIR]
#
# CACHE_DIR (default: $MOE_ONNX_LLAMA_CPP_DIR, else ~/.cache/moe-onnx/llama.cpp) receives the
# sdist, the unpacked tree and the build; it should lie outside the repository. The last line
# printed is the llama.cpp tree to pass as --llama-cpp (it holds build/bin/llama-bench,
# convert_hf_to_gguf.py and gguf-py/). Idempotent: a finished build is reused as is.
# Environment: LLAMA_CPP_PYTHON_VERSION pins the sdist version (default: the newest);
# LLAMA_CPP_CLI=1 also builds llama-cli; LLAMA_CPP_EXTRA_TARGETS="llama-debug ..." builds more
# (llama-debug saves a prompt's logits: how the converted models were checked against transformers);
# JOBS sets the build's parallelism (default 2); LLAMA_CPP_AMX=1 keeps llama.cpp's AMX code on a
# CPU with AMX (see below).
set -euo pipefail

CACHE_DIR="${1:-${MOE_ONNX_LLAMA_CPP_DIR:-$HOME/.cache/moe-onnx/llama.cpp}}"
JOBS="${JOBS:-2}"
TARGETS=(llama-bench llama-quantize llama-batched-bench)
if [[ "${LLAMA_CPP_CLI:-0}" == "1" ]]; then TARGETS+=(llama-cli); fi
read -r -a EXTRA <<<"${LLAMA_CPP_EXTRA_TARGETS:-}"
TARGETS+=("${EXTRA[@]}")

log() { echo "[build_llama_cpp] $*" >&2; }

mkdir -p "$CACHE_DIR"
CACHE_DIR="$(cd "$CACHE_DIR" && pwd)"
TREE="$CACHE_DIR/src/vendor/llama.cpp"

# -march=native, less AMX where the CPU has it (unless LLAMA_CPP_AMX=1): on a 2-core Sapphire Rapids
# (2026-12-04) llama.cpp's AMX buffer type crashed llama-bench on every Q4_0 and Q8_0 model of the
# bench (segmentation fault after "amx repack tensor output.weight of type q6_K"; SIGILL on Q8_0),
# while f32 ran. Without it llama.cpp keeps its AVX-512 repacked kernels, its best working CPU set-up.
# GCC lets an explicit -mno-* flag win over what -march=native implies, in whatever order.
CMAKE_ARGS=(-DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release)
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null && [[ "${LLAMA_CPP_AMX:-0}" != "1" ]]; then
    CMAKE_ARGS+=("-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
                 "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
fi
CONFIG="${CMAKE_ARGS[*]}"

built() {
    local t
    for t in "${TARGETS[@]}"; do
        [[ -x "$TREE/build/bin/$t" ]] || return 1
    done
    # a build made with other cmake arguments is rebuilt
    [[ "$(cat "$TREE/build/moe-onnx-cmake-args" 2>/dev/null)" == "$CONFIG" ]] || return 1
    [[ -f "$TREE/convert_hf_to_gguf.py" && -d "$TREE/gguf-py/gguf" ]]
}

if built; then
    log "already built in $TREE/build/bin"
    echo "$TREE"
    exit 0
fi

# Tools: cmake, a C/C++ compiler, make.
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v cc >/dev/null || missing+=(gcc)
command -v c++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
if ((${#missing[@]})); then
    log "installing ${missing[*]} with apt-get"
    SUDO=""
    [[ "$(id -u)" == "0" ]] || SUDO="sudo"
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi

# The sdist, downloaded once.
SDIST_DIR="$CACHE_DIR/sdist"
mkdir -p "$SDIST_DIR"
shopt -s nullglob
sdists=("$SDIST_DIR"/llama_cpp_python-*.tar.gz)
if ((${#sdists[@]} == 0)); then
    spec="llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}"
    log "downloading the $spec sdist"
    PIP="pip"
    command -v pip >/dev/null || PIP="python3 -m pip"
    $PIP download --no-deps --no-binary :all: "$spec" -d "$SDIST_DIR" >&2
    sdists=("$SDIST_DIR"/llama_cpp_python-*.tar.gz)
fi
if ((${#sdists[@]} == 0)); then
    log "no llama_cpp_python-*.tar.gz in $SDIST_DIR after pip download"
    exit 1
fi
SDIST="${sdists[-1]}"

# Unpacked once (into src/, via a temporary directory so a killed unpack leaves nothing half done).
if [[ ! -f "$TREE/CMakeLists.txt" ]]; then
    log "unpacking $(basename "$SDIST")"
    rm -rf "$CACHE_DIR/src" "$CACHE_DIR/src.tmp"
    mkdir -p "$CACHE_DIR/src.tmp"
    tar -xzf "$SDIST" -C "$CACHE_DIR/src.tmp" --strip-components=1
    mv "$CACHE_DIR/src.tmp" "$CACHE_DIR/src"
fi
[[ -f "$TREE/CMakeLists.txt" ]] || { log "no vendor/llama.cpp in $SDIST"; exit 1; }

log "configuring and building ${TARGETS[*]} in $TREE/build (-j$JOBS)"
cd "$TREE"
log "cmake ${CONFIG}"
rm -f build/moe-onnx-cmake-args
cmake -B build "${CMAKE_ARGS[@]}" >&2
cmake --build build -j"$JOBS" --target "${TARGETS[@]}" >&2
echo "$CONFIG" >build/moe-onnx-cmake-args
built || { log "build finished but ${TARGETS[*]} are not all in $TREE/build/bin"; exit 1; }
log "built: $(ls "$TREE/build/bin" | tr '\n' ' ')"
echo "$TREE"
