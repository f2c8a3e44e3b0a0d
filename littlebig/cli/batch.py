"""`littlebig batch`: An offline job over a folder, one model loaded at a time."""

from __future__ import annotations

import contextlib

from .options import command, positive_int, probability, server_address


def run(args) -> None:
    from littlebig.client.batch import run_batch
    from littlebig.serving.memory import MemorySampler

    sampler = MemorySampler(args.server_pid) if args.server_pid else None
    with sampler or contextlib.nullcontext():
        result = run_batch(args.url, args.data, args.out, threshold=args.threshold, labels=args.labels,
                           batch_size=args.batch_size, concurrency=args.concurrency)
    print(f"wrote {result.out}: {result.images} images, {result.escalated} answered by big "
          f"(inferred now: {result.inferred['little']} by little, {result.inferred['big']} by big)")
    for window in result.windows if sampler else ():
        print(f"  server memory during the {window.model} pass: peak {sampler.peak(window.start, window.end) / 2**20:.0f} MiB")


def add(sub) -> None:
    p = command(sub, "batch", help="offline job over a folder: little over all images, then big over the escalated "
                       "ones, one model loaded at a time (CSV out, resumable)")
    p.add_argument("--url", type=server_address, default="127.0.0.1:8001", help="server gRPC address (explicit model control)")
    p.add_argument("--data", required=True, help="image folder (searched recursively)")
    p.add_argument("--out", required=True, help="predictions CSV: file,class,label,confidence,route")
    p.add_argument("--threshold", type=probability, help="T (default: the served gate's)")
    p.add_argument("--labels", help="class names, one per line (default: the served model's own labels, else ImageNet names for 1000 classes)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per request")
    p.add_argument("--concurrency", type=positive_int, default=4, help="requests in flight")
    p.add_argument("--server-pid", type=int, help="tritonserver's pid on this machine: report its peak memory per pass")
    p.set_defaults(func=run)
