"""`littlebig bench`: Benchmark the served cascade against its own models."""

from __future__ import annotations

from .options import command, positive_int, positive_int_list, probability, server_address


def run(args) -> None:
    from littlebig.client.benchmark import bench

    host = args.url.rsplit(":", 1)[0]
    bench(
        args.url,
        args.data,
        args.out,
        concurrencies=args.concurrency,
        metrics_url=args.metrics_url or f"http://{host}:8002/metrics",
        n_images=args.images,
        threshold=args.threshold,
        measurement_ms=args.measurement_ms,
        rounds=args.rounds,
    )


def add(sub) -> None:
    p = command(sub, "bench", help="perf_analyzer: big vs little vs the gate, ideal speedup S* and the achieved fraction")
    p.add_argument("--url", type=server_address, default="127.0.0.1:8001", help="server gRPC address")
    p.add_argument("--metrics-url", help="server metrics URL (default http://HOST:8002/metrics)")
    p.add_argument("--data", required=True, help="folder of real images (sent in the wire format)")
    p.add_argument("--images", type=positive_int, default=64, help="how many images perf_analyzer cycles through")
    p.add_argument("--concurrency", type=positive_int_list, default="1,4,16,32", help="comma-separated concurrency levels")
    p.add_argument("--threshold", type=probability, help="run the gate at this T (switched live, restored after)")
    p.add_argument("--measurement-ms", type=positive_int, default=3000, help="perf_analyzer measurement window")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved runs per model and concurrency (medians reported)")
    p.add_argument("--out", required=True, help="folder for bench.json, the table and bench.png")
    p.set_defaults(func=run)
