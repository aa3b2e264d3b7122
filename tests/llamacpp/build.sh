#!/usr/bin/env bash
# Build a real llama.cpp `llama-server` from the llama.cpp source vendored in
# PyPI's llama-cpp-python sdist, and generate a tiny random-weight model for it.
#
#   bash tests/llamacpp/build.sh CACHE_DIR
#
# Produces (idempotent; a second run with both present exits at once):
#   CACHE_DIR/bin/llama-server    the server binary (CPU only, Release)
#   CACHE_DIR/tiny-qwen3.gguf     tiny random-weight qwen3-arch model + Qwen3 template
# Also keeps CACHE_DIR/src (unpacked sdist), CACHE_DIR/build (cmake tree, so a
# rebuild is incremental) and CACHE_DIR/venv (numpy + pyyaml for gguf-py).
# Concurrent runs on the same CACHE_DIR wait for each other (flock).
#
# Only PyPI / Debian registries are reachable, so the source comes from PyPI
# and nothing else is downloaded (no model, no curl/openssl at runtime).
set -euo pipefail

LLAMA_CPP_PY_VERSION="${LLAMA_CPP_PY_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"

log() { printf '[llamacpp-build %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 CACHE_DIR"
mkdir -p "$1"
CACHE="$(cd "$1" && pwd)"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="$CACHE/bin/llama-server"
MODEL="$CACHE/tiny-qwen3.gguf"
SRC="$CACHE/src"
LLAMA="$SRC/vendor/llama.cpp"
BUILD="$CACHE/build"
VENV="$CACHE/venv"

if [ -x "$BIN" ] && [ -s "$MODEL" ]; then
    log "already built: $BIN and $MODEL (delete them to rebuild)"
    exit 0
fi
T0=$SECONDS

# One build per CACHE_DIR at a time (e.g. parallel test workers): wait for the
# lock, then re-check, since the other run may have finished the job.
if command -v flock >/dev/null; then
    exec 9>"$CACHE/.build.lock"
    flock -n 9 || { log "another build.sh holds $CACHE/.build.lock: waiting"; flock 9; }
    if [ -x "$BIN" ] && [ -s "$MODEL" ]; then
        log "built meanwhile by another run: $BIN and $MODEL"
        exit 0
    fi
fi

# --- a python3 for pip / the venv: the machine's, else any pyenv version ---
PYTHON=""
for c in python3 python3.13 python3.12 python3.11 "$HOME"/.pyenv/versions/3.1[1-3]*/bin/python3; do
    p="$(command -v "$c" 2>/dev/null)" || continue
    # gguf-py needs >= 3.10; resolve pyenv shims to the real interpreter.
    real="$("$p" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 10); print(sys.executable)' 2>/dev/null)" \
        && [ -x "$real" ] && { PYTHON="$real"; break; }
done
[ -n "$PYTHON" ] || die "no usable python3 (>= 3.10 with venv/ensurepip) found"
log "python: $PYTHON ($("$PYTHON" --version 2>&1))"

# --- 1. source: the llama-cpp-python sdist from PyPI, unpacked to CACHE/src ---
if [ ! -f "$LLAMA/CMakeLists.txt" ]; then
    DL="$CACHE/dl"
    mkdir -p "$DL"
    SDIST="$(ls "$DL"/llama_cpp_python-"$LLAMA_CPP_PY_VERSION".tar.gz 2>/dev/null || true)"
    if [ -z "$SDIST" ]; then
        log "downloading llama-cpp-python==$LLAMA_CPP_PY_VERSION sdist from PyPI (~75 MB, ~1 min)"
        # --no-binary forces the sdist; pip prepares its metadata in an isolated
        # build env (scikit-build-core), which is slow-ish but needs no compiler.
        "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps \
            --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PY_VERSION" -d "$DL" \
            || die "pip download of llama-cpp-python==$LLAMA_CPP_PY_VERSION failed"
        SDIST="$DL/llama_cpp_python-$LLAMA_CPP_PY_VERSION.tar.gz"
    fi
    [ -f "$SDIST" ] || die "sdist not found after download in $DL"
    log "unpacking $(basename "$SDIST") -> $SRC"
    rm -rf "$SRC" "$SRC.tmp"
    mkdir -p "$SRC.tmp"
    tar -xzf "$SDIST" -C "$SRC.tmp" --strip-components=1 || die "could not unpack $SDIST"
    mv "$SRC.tmp" "$SRC"
    [ -f "$LLAMA/CMakeLists.txt" ] || die "sdist has no vendor/llama.cpp/CMakeLists.txt"
    rm -rf "$DL"
fi
log "llama.cpp source: $LLAMA"

# --- 2. build tools: cmake, ninja, a C/C++ compiler ---
need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v c++ >/dev/null || command -v g++ >/dev/null || need_apt+=(g++)
if ! command -v ninja >/dev/null && [ ! -x "$CACHE/tools/bin/ninja" ]; then
    log "ninja missing: installing it from PyPI into $CACHE/tools"
    "$PYTHON" -m venv "$CACHE/tools" && "$CACHE/tools/bin/pip" install -q --disable-pip-version-check ninja \
        || need_apt+=(ninja-build)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing with apt: ${need_apt[*]}"
    command -v apt-get >/dev/null || die "missing ${need_apt[*]} and no apt-get"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null \
        || die "apt-get install ${need_apt[*]} failed"
fi
[ -x "$CACHE/tools/bin/ninja" ] && export PATH="$CACHE/tools/bin:$PATH"
command -v ninja >/dev/null || die "ninja not available"
command -v cmake >/dev/null || die "cmake not available"

# --- 3. build llama-server only ---
if [ ! -x "$BIN" ]; then
    log "configuring (cmake $(cmake --version | head -1 | awk '{print $3}'), ninja $(ninja --version))"
    # GGML_NATIVE=OFF: portable binary (the cache may move between machines).
    # No CURL / OpenSSL: nothing to download at runtime, fewer dependencies.
    # LLAMA_USE_PREBUILT_UI=OFF: the web UI would otherwise be fetched from a
    # Hugging Face bucket at build time (unreachable here); the API needs no UI.
    # Tests/examples are off; only the llama-server target is built below.
    cmake -S "$LLAMA" -B "$BUILD" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DBUILD_SHARED_LIBS=OFF \
        >"$CACHE/cmake-configure.log" 2>&1 \
        || { tail -30 "$CACHE/cmake-configure.log" >&2; die "cmake configure failed (log: $CACHE/cmake-configure.log)"; }
    log "building llama-server with -j$JOBS (206 steps, ~8 min on 2 idle cores, longer under load; log: $CACHE/build.log)"
    TB=$SECONDS
    # Progress: ninja prints "[n/N] ..." lines; show every 25th so the log stays short.
    set +e
    cmake --build "$BUILD" --target llama-server -j "$JOBS" 2>&1 | tee "$CACHE/build.log" \
        | awk '/^\[[0-9]+\/[0-9]+\]/ { gsub(/[][]/, "", $1); split($1, a, "/"); n = a[1] + 0; N = a[2] + 0;
                if (n % 25 == 0 || n == N) { printf "[llamacpp-build]   compiled %d/%d\n", n, N; fflush() } }'
    rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" -eq 0 ] || { grep -E 'error|FAILED' "$CACHE/build.log" | head -20 >&2; die "build failed (log: $CACHE/build.log)"; }
    found="$(find "$BUILD" -type f -name llama-server -perm -u+x | head -1)"
    [ -n "$found" ] || die "build finished but no llama-server binary under $BUILD"
    mkdir -p "$CACHE/bin"
    cp "$found" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
    log "built $BIN in $((SECONDS - TB)) s"
fi
"$BIN" --version >/dev/null 2>&1 || die "$BIN does not run (--version failed)"

# --- 4. tiny model: gguf-py (vendored) + numpy/pyyaml in a dedicated venv ---
if [ ! -s "$MODEL" ]; then
    if ! "$VENV/bin/python" -c 'import numpy, yaml' 2>/dev/null; then
        # gguf-py imports numpy and yaml at import time (tqdm/requests only lazily).
        log "creating $VENV with numpy and pyyaml"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV" || die "venv creation failed"
        "$VENV/bin/pip" install -q --disable-pip-version-check numpy pyyaml || die "pip install numpy pyyaml failed"
    fi
    log "writing tiny random-weight model $MODEL"
    PYTHONPATH="$LLAMA/gguf-py${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" "$HERE/make_tiny_model.py" \
        --vocab "$LLAMA/models/ggml-vocab-qwen2.gguf" \
        --template "$LLAMA/models/templates/Qwen-Qwen3-0.6B.jinja" \
        --out "$MODEL.tmp" || { rm -f "$MODEL.tmp"; die "make_tiny_model.py failed"; }
    mv "$MODEL.tmp" "$MODEL"
fi

log "done in $((SECONDS - T0)) s: $BIN ($("$BIN" --version 2>&1 | grep -m1 -i version || true)), $MODEL ($(du -h "$MODEL" | cut -f1))"
