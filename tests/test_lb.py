"""Two `littlebig serve` replicas behind nginx: one replica's tritonserver is SIGKILLed under load at
concurrency 32 (HTTP and gRPC at once), restarted on the same ports and taken back.

About 15 s of load plus the replicas' start-up. Skipped where nginx is not installed
(scripts/setup.sh installs Debian's package).
"""

from __future__ import annotations

import pytest

from littlebig.serving.balancer import balanced_replicas, find_nginx
from littlebig.serving.failover import PHASES, PROTOCOLS, expected_classes, format_report, kill_and_restart

from .conftest import wire_images

pytestmark = pytest.mark.skipif(find_nginx() is None, reason="nginx is not installed (apt-get install nginx)")


def test_a_killed_replica_is_retried_around_and_taken_back(repository, tmp_path):
    images = wire_images(16, seed=5)
    with balanced_replicas(repository, 2, tmp_path) as (balancer, replicas):
        expected = expected_classes(f"127.0.0.1:{replicas[1].ports.grpc}", images)
        report = kill_and_restart(balancer, replicas, images, expected, concurrency=32,
                                  before_s=4, down_s=4, after_s=6, log=lambda *_: None)
    print(format_report(report))
    for protocol in PROTOCOLS:
        for phase in PHASES:
            figures = report.figures(protocol, phase)
            assert figures.requests > figures.errors, f"{protocol} {phase}: no request answered"
            assert figures.wrong == 0, f"{protocol} {phase}: answers differ from the replica's own"
    # HTTP: nginx buffers the request body, so with non_idempotent it resends what the dead replica
    # dropped, and clients see nothing.
    for phase in PHASES:
        assert report.figures("http", phase).errors == 0, report.figures("http", phase).error_kinds
    # gRPC: nginx streams request bodies to the upstream and cannot resend them; the requests in
    # flight on the killed replica fail with UNAVAILABLE (at most one per client), nothing after.
    grpc_errors = {kind: n for phase in PHASES for kind, n in report.figures("grpc", phase).error_kinds.items()}
    assert sum(grpc_errors.values()) <= report.concurrency
    assert all("UNAVAILABLE" in kind for kind in grpc_errors), grpc_errors
    assert report.figures("grpc", "after").errors == 0
    assert report.retried_requests > 0, "requests sent to the dead replica should have been retried on the other"
    assert report.first_request_after_ready_s is not None, "nginx never sent the restarted replica a request"
    assert report.restarted_inferences > 0
