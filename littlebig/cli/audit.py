"""`littlebig audit`: the live bound on how often the answers little keeps differ from big's."""

from __future__ import annotations

import json
import time

from littlebig.errors import UsageError

from .options import command, positive_float, server_address


def metrics_address(url: str, metrics_url: str | None) -> str:
    """The server's /metrics: the one given, else port 8002 on the gRPC address's host."""
    return metrics_url or f"http://{url.rsplit(':', 1)[0]}:8002/metrics"


def run(args) -> None:
    from littlebig.client.audit import describe_live, live_bound, read_snapshot
    from littlebig.client.infer import LittleBigClient

    if not 0.0 < args.level < 1.0:
        raise UsageError(f"--level must be in (0, 1), got {args.level}")
    with LittleBigClient(args.url) as client:
        config = client.gate_config()
    metrics_url = metrics_address(args.url, args.metrics_url)
    snapshot = read_snapshot(metrics_url)
    if args.window:
        time.sleep(args.window)
        snapshot = read_snapshot(metrics_url).minus(snapshot)
    snapshot.threshold, snapshot.macs = config.thresholds[0], list(config.stage_macs)
    if args.save:
        snapshot.save(args.save)
    block = live_bound(snapshot, args.level)
    print(json.dumps(block, indent=1) if args.json else describe_live(block, snapshot.threshold))
    if args.check and block["holds"] is False:
        raise SystemExit(1)


def add(sub) -> None:
    p = command(sub, "audit", help="the live bound on how often little's answers differ from big's (the audit)")
    p.add_argument("--url", type=server_address, default="127.0.0.1:8001", help="server gRPC address")
    p.add_argument("--metrics-url", help="server metrics URL (default http://HOST:8002/metrics)")
    p.add_argument("--level", type=float, default=0.95, help="level of the exact upper bound")
    p.add_argument("--window", type=positive_float, help="bound the rows of the next WINDOW seconds (default: every row "
                   "since the gate loaded)")
    p.add_argument("--save", metavar="FILE", help="write the audit's counts to FILE (JSON), for calibrate --from-audit FILE")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--check", action="store_true", help="exit with status 1 when the bound is above the promised drop")
    p.set_defaults(func=run)
