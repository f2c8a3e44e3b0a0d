#!/usr/bin/env bash
# Set up .venv with everything littlebig needs, on a fresh Debian machine with Python 3.11 (root).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# perf_analyzer (from the tritonclient 2.48.0 wheel) links against libb64. nginx: the load balancer
# in front of replicas (tests/test_lb.py); prometheus: promtool checks and unit-tests the alert
# rules; docker-compose: validates docker/compose.yaml (its `config` needs no Docker engine).
# --no-install-recommends keeps out the node exporter. On a host with systemd Debian also starts the
# nginx and prometheus services; the tests use neither (they run their own nginx on free ports).
DEBS=(libb64-0d nginx prometheus docker-compose)
missing=()
for deb in "${DEBS[@]}"; do dpkg -s "$deb" >/dev/null 2>&1 || missing+=("$deb"); done
if [ ${#missing[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first with exact pins (the CPU machines here serve these two from local disk).
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
"${PIP[@]}" -e ".[export,clip,test]"
# Only the tritonserver binary and python backend inside this wheel are used; its own Python
# dependencies (tritonclient~=2.50, numpy<2, ...) would fight the pinned tritonclient 2.48.0.
"${PIP[@]}" --no-deps nvidia-pytriton==0.7.0
echo "littlebig set up in .venv ($(.venv/bin/python -c 'import littlebig; print(littlebig.__version__)'))"
