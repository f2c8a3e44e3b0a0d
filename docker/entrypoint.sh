#!/bin/sh
# Start tritonserver on the repository with explicit model control (live threshold changes, batch
# jobs) and the repository API locked: load/unload (which can upload and run code) need the header
# admin-key: $LITTLEBIG_ADMIN_KEY on HTTP and gRPC. Without the variable a random key is drawn and
# never shown, so the repository API is closed. Extra arguments go to tritonserver.
set -eu
key=${LITTLEBIG_ADMIN_KEY:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}
exec tritonserver \
    --model-repository="${LITTLEBIG_REPOSITORY:-/models}" \
    --model-control-mode=explicit --load-model='*' \
    --backend-config=python,shm-default-byte-size=33554432 \
    --http-restricted-api="model-repository:admin-key=${key}" \
    --grpc-restricted-protocol="model-repository:admin-key=${key}" \
    "$@"
