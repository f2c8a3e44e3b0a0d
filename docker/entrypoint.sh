#!/bin/sh
# Start tritonserver on the repository with explicit model control (live threshold changes, batch
# jobs) and the admin APIs locked: load/unload (which can upload and run code), shared memory, log and
# trace settings need the header littlebig-admin-key: $LITTLEBIG_ADMIN_KEY (the name the littlebig
# client sends; over gRPC Triton reads it as triton-grpc-protocol-littlebig-admin-key). Without the
# variable a random key is drawn and never shown, so those APIs are closed. Stopping drains for up to
# 30 s. Extra arguments go to tritonserver.
set -eu
key=${LITTLEBIG_ADMIN_KEY:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}
exec tritonserver \
    --model-repository="${LITTLEBIG_REPOSITORY:-/models}" \
    --model-control-mode=explicit --load-model='*' \
    --backend-config=python,shm-default-byte-size=33554432 \
    --exit-timeout-secs=30 \
    --http-restricted-api="model-repository,shared-memory,logging,trace:littlebig-admin-key=${key}" \
    --grpc-restricted-protocol="model-repository,shared-memory,logging,trace:littlebig-admin-key=${key}" \
    "$@"
