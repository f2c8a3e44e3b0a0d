#!/usr/bin/env bash
# Pack what a GPU machine without a package registry lacks to serve and measure littlebig, from this
# machine's .venv (scripts/setup.sh): the tritonserver of the nvidia-pytriton wheel (binary, libraries,
# python backend, the stub for that machine's Python) in the wheel's own layout (its RPATHs find the
# libraries there), tritonclient's Python package, littlebig itself as a built wheel unpacked, and
# perf_analyzer with the two libraries it links. One tar.xz under bundle/ (git ignores it); prints its
# size beside the working tree's, which together must stay under the 64 MiB that travel.
#
#   bash scripts/gpu_bundle.sh [PYTHON_VERSION] [OUT_DIR]     # defaults: 3.12 (the GPU machine's), bundle
#   XZ_LEVEL (default 6) trades its size for time: 0 packs in a fraction of the time, larger.
#   there:  bash scripts/gpu_unpack.sh && . /tmp/littlebig-gpu/env.sh   # no network; see docs/gpu.md
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-3.12}
OUT=${2:-bundle}
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
SERVER="$SITE/pytriton/tritonserver"
[ -x "$SERVER/bin/tritonserver" ] || { echo "no tritonserver in $SERVER: run scripts/setup.sh first" >&2; exit 1; }
STUB="$SERVER/python_backend_stubs/$PY/triton_python_backend_stub"
[ -x "$STUB" ] || { echo "the nvidia-pytriton wheel has no python backend stub for Python $PY" >&2; exit 1; }

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
B="$STAGE/littlebig-gpu"
mkdir -p "$B/site/pytriton/tritonserver/bin" "$B/site/pytriton/tritonserver/backends/python" \
    "$B/site/pytriton/tritonserver/python_backend_stubs/$PY" "$B/site/nvidia_pytriton.libs" "$B/bin" "$B/lib"
echo "$PY" > "$B/PYTHON_VERSION"
cp "$SERVER/bin/tritonserver" "$B/site/pytriton/tritonserver/bin/"
cp "$SERVER/backends/python/libtriton_python.so" "$SERVER/backends/python/triton_python_backend_utils.py" \
    "$B/site/pytriton/tritonserver/backends/python/"
cp "$STUB" "$B/site/pytriton/tritonserver/python_backend_stubs/$PY/"
# The server's libraries but its libpython (3.13's, for the 3.13 stub): the stub of $PY links the
# machine's own libpython$PY.
for lib in "$SITE"/nvidia_pytriton.libs/*; do
    case "$(basename "$lib")" in libpython*) continue ;; esac
    cp "$lib" "$B/site/nvidia_pytriton.libs/"
done
cp -r "$SITE/tritonclient" "$B/site/"
# Compiled per Python version, as wheels for $PY at this venv's versions: python-rapidjson (tritonclient.grpc
# parses JSON with it) and numpy 1.x, which goes first on the machine's path: this server's python backend
# stub is built with a pybind11 that predates numpy 2 and, under numpy 2, hands Triton every tensor made
# from an array with 0 bytes (seen here: little's outputs came back empty, big got an empty IMAGE).
wheels=$(.venv/bin/python -c 'from importlib.metadata import version as v; print(*(f"{p}=={v(p)}" for p in ("numpy", "python-rapidjson")))')
# shellcheck disable=SC2086
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$STAGE/wheels" $wheels
for wheel in "$STAGE"/wheels/*.whl; do .venv/bin/python -m zipfile -e "$wheel" "$B/site/"; done
.venv/bin/python -m build --wheel --no-isolation --outdir "$STAGE/wheel" . >"$STAGE/build.log" 2>&1 ||
    { cat "$STAGE/build.log" >&2; exit 1; }
.venv/bin/python -m zipfile -e "$STAGE"/wheel/littlebig-*.whl "$B/site/"
# perf_analyzer links libb64 (Debian's libb64-0d) and CUDA 12's runtime (nvidia-cuda-runtime-cu12).
cp .venv/bin/perf_analyzer "$B/bin/"
cp "$(ldconfig -p | awk '/libb64.so.0d/ {print $NF; exit}')" "$B/lib/"
cp "$SITE/nvidia/cuda_runtime/lib/libcudart.so.12" "$B/lib/"
cp scripts/gpu_unpack.sh "$B/"
find "$B" -name __pycache__ -prune -exec rm -rf {} +

mkdir -p "$OUT"
tar -C "$STAGE" -c littlebig-gpu | xz -T0 "-${XZ_LEVEL:-6}" > "$OUT/littlebig-gpu.tar.xz"
size=$(stat -c %s "$OUT/littlebig-gpu.tar.xz")
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "bundle $OUT/littlebig-gpu.tar.xz (Python $PY): $(mib "$size") MiB; working tree $(mib "$tree") MiB;" \
    "together $(mib $((size + tree))) MiB of the 64 MiB that travel"
[ $((size + tree)) -lt $((64 * 1048576)) ] || { echo "too big to travel: trim bench/results or the bundle" >&2; exit 1; }
