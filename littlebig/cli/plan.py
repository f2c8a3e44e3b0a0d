"""`littlebig plan`: Replicas and GPUs for a request rate, from a bench."""

from __future__ import annotations

from pathlib import Path

from .options import command


def run(args) -> None:
    from littlebig.client.capacity import format_plan, load_bench, plan

    path = Path(args.bench)
    bench = load_bench(path / "bench.json" if path.is_dir() else path)
    print(format_plan(plan(bench, args.rate, utilisation=args.utilisation, replicas_per_gpu=args.replicas_per_gpu,
                           escalation=args.escalation, max_p99_ms=args.max_p99_ms)))


def add(sub) -> None:
    p = command(sub, "plan", help="replicas and GPUs for a request rate, cascade vs big alone, from a bench.json")
    p.add_argument("--bench", required=True, help="bench.json written by `littlebig bench` (or its folder)")
    p.add_argument("--rate", type=float, required=True, help="images per second to serve")
    p.add_argument("--utilisation", type=float, default=0.7, help="fraction of a replica's measured peak to plan for")
    p.add_argument("--replicas-per-gpu", type=int, default=1, help="server replicas that share one GPU")
    p.add_argument("--escalation", type=float, help="expected escalation share p (default: the one measured in the bench)")
    p.add_argument("--max-p99-ms", type=float, help="only concurrency levels whose p99 latency is within this budget")
    p.set_defaults(func=run)
