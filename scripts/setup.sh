#!/usr/bin/env bash
# Set up .venv with everything littlebig needs, on a fresh Debian machine with Python 3.11 (root).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# perf_analyzer (from the tritonclient 2.48.0 wheel) links against libb64.
if ! dpkg -s libb64-0d >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq libb64-0d >/dev/null
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first with exact pins (the CPU machines here serve these two from local disk).
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
"${PIP[@]}" -e ".[test]"
# Only the tritonserver binary and python backend inside this wheel are used; its own Python
# dependencies (tritonclient~=2.50, numpy<2, ...) would fight the pinned tritonclient 2.48.0.
"${PIP[@]}" --no-deps nvidia-pytriton==0.7.0
echo "littlebig set up in .venv ($(.venv/bin/python -c 'import littlebig; print(littlebig.__version__)'))"
