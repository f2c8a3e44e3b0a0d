#!/usr/bin/env bash
# Unpack the GPU bundle (scripts/gpu_bundle.sh) on a machine without network, check that this machine's
# Python can run the bundled python backend stub, and write DEST/env.sh, which puts the bundled server,
# tritonclient, littlebig and perf_analyzer in reach of that Python.
#
#   bash scripts/gpu_unpack.sh [BUNDLE] [DEST] && . DEST/env.sh
#   defaults: bundle/littlebig-gpu.tar.xz, /tmp/littlebig-gpu; PYTHON (default python3) is the Python
#   that will serve: the stub embeds it, so its version must be the bundle's and its torch is used.
set -euo pipefail
BUNDLE=${1:-bundle/littlebig-gpu.tar.xz}
DEST=${2:-/tmp/littlebig-gpu}
PYTHON=${PYTHON:-python3}
fail() { echo "gpu_unpack: $*" >&2; exit 1; }

[ -f "$BUNDLE" ] || fail "no bundle at $BUNDLE (make it with scripts/gpu_bundle.sh where .venv is set up)"
mkdir -p "$DEST"
tar -C "$DEST" --strip-components=1 -xJf "$BUNDLE"
DEST=$(cd "$DEST" && pwd)
want=$(cat "$DEST/PYTHON_VERSION")
PYTHON=$(command -v "$PYTHON") || fail "no $PYTHON on PATH"
have=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
[ "$have" = "$want" ] || fail "the bundle's python backend stub is for Python $want, but $PYTHON is $have: make the bundle with 'scripts/gpu_bundle.sh $have'"

# The stub links libpython$want.so.1.0: this Python's own, where it was built with --enable-shared.
libdir=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')
lib="libpython$want.so.1.0"
if [ -f "$libdir/$lib" ]; then
    pylib=$libdir
elif found=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l {print $NF; exit}') && [ -n "$found" ]; then
    pylib=$(dirname "$found")
else
    fail "the python backend stub needs $lib, which $PYTHON does not have (it is built without a shared libpython): use a Python $want built with --enable-shared, or install the libpython$want package"
fi

# A venv of $PYTHON whose path is the bundle's packages, then $PYTHON's own (torch, ...): the python
# backend stub takes its packages from the first python on PATH and does not read PYTHONPATH, and the
# bundle's numpy 1.x must come before the machine's (the stub's pybind11 predates numpy 2).
rm -rf "$DEST/venv"
"$PYTHON" -m venv --without-pip "$DEST/venv"
site=$("$DEST/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$DEST/site" > "$site/a_littlebig_bundle.pth"
"$PYTHON" -c 'import sys, sysconfig; std = {sysconfig.get_path(k) for k in ("stdlib", "platstdlib")}
print("\n".join(p for p in sys.path if p and p not in std and not p.endswith((".zip", "lib-dynload"))))' > "$site/b_machine.pth"

cat > "$DEST/env.sh" <<EOF
export LITTLEBIG_TRITON_HOME=$DEST/site/pytriton/tritonserver
export PATH=$DEST/venv/bin:$DEST/bin:\$PATH
export LD_LIBRARY_PATH=$DEST/lib:$pylib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
EOF

# What is imported from the bundle must come from it (not from an older copy on the machine).
# From / so that a littlebig/ folder in the current directory cannot stand in for the bundle's.
(cd / && . "$DEST/env.sh" && python3 -c '
import sys, numpy, littlebig, littlebig.gate, tritonclient.grpc
assert numpy.__file__.startswith(sys.argv[1]), f"numpy {numpy.__version__} from {numpy.__file__}, not the bundle'"'"'s 1.x"
from littlebig.serving.server import find_tritonserver
install = find_tritonserver()
assert littlebig.__file__.startswith(sys.argv[1]), littlebig.__file__
assert str(install.binary).startswith(sys.argv[1]), install.binary
print(f"littlebig {littlebig.__version__} and tritonserver {install.binary} ready")' "$DEST") ||
    fail "the unpacked bundle does not import with $DEST/venv/bin/python3 (above)"
echo "unpacked into $DEST; now: . $DEST/env.sh"
