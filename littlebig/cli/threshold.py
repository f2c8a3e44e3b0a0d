"""`littlebig threshold`: Show or set the served threshold with no downtime."""

from __future__ import annotations

from .options import command, probability, server_address
from .repo import repository_writer


def run(args) -> None:
    from littlebig.client.calibrate import apply_choice
    from littlebig.client.control import served_threshold, served_thresholds

    if args.value is None:
        print(",".join(f"{t:.6f}" for t in served_thresholds(args.url)))  # K stages: T_0,T_1,... as --thresholds takes them
        return
    applied = apply_choice(args.url, args.value, repository_writer(args.repo))
    print(f"server now runs T={served_threshold(args.url):.6f}" + (f"; wrote {applied['config']}" if applied["config"] else
          "; the repository on disk keeps its old T (pass --repo DIR to write it there too)"))


def add(sub) -> None:
    p = command(sub, "threshold", help="show or set the served threshold T (no downtime)")
    p.add_argument("value", nargs="?", type=probability, help="new T in [0, 1]; omit to show the current one (K stages: all K-1)")
    p.add_argument("--url", type=server_address, default="127.0.0.1:8001", help="server gRPC address")
    p.add_argument("--repo", help="also write T into this repository folder (so a restart keeps it)")
    p.set_defaults(func=run)
