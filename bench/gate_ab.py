"""A/B-test gate implementations on one server: p50 latency of the requests little answers, against little alone.

Each variant is a copy of the gate whose model.py is replaced by the given file; they share little
and big. Every round probes each variant and little alone back to back (`alternating_probes`), and
the report gives the median of the per-round differences, because this machine's speed drifts more
between rounds than the effects being compared.

    git show 2c1c408:model_repository/littlebig/1/model.py > /tmp/blocking_gate.py
    .venv/bin/python bench/gate_ab.py --variant blocking=/tmp/blocking_gate.py --concurrency 32 --rounds 9

The current gate is always included as `current`. With --cost-batches, every round also measures
each variant's own time per execution at those batch sizes (client/gate_cost.py, T = 0), and the
report gives the median over rounds:

    .venv/bin/python bench/gate_ab.py --variant old=/tmp/old_gate.py --threshold 0 --concurrency 1 \
        --cost-batches 1,8,32 --rounds 5

A variant may also be the current gate with other config parameters (--param-variant), e.g. little
run inside the gate's process:

    .venv/bin/python bench/gate_ab.py --param-variant in_gate=little_onnx:little/1/model.onnx \
        --threshold 0 --concurrency 1 --cost-batches 1,8,32 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from littlebig.client.gate_cost import measure_gate_cost
from littlebig.client.latency import alternating_probes
from littlebig.client.images import list_images, to_wire_batch
from littlebig.client.infer import GATE_MODEL, LittleBigClient
from littlebig.model_repository.builder import RepositoryOptions, build_repository, read_config, write_config
from littlebig.server import TritonServer


def add_variant(repo: Path, name: str, model_file: Path | None = None, parameters: dict[str, str] | None = None) -> str:
    """A copy of the gate named gate_<name>, with ``model_file`` as its model.py and/or other config ``parameters``."""
    model = f"gate_{name}"
    shutil.copytree(repo / GATE_MODEL, repo / model)
    if model_file is not None:
        shutil.copy(model_file, repo / model / "1" / "model.py")
    config = read_config(repo / model / "config.pbtxt")
    config.name = model
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    write_config(repo / model, config)
    return model


def parse_parameters(text: str) -> dict[str, str]:
    """"key:value,key:value" -> {key: value}."""
    pairs = [item.partition(":") for item in text.split(",") if item]
    if not pairs or any(not key or not sep for key, sep, _ in pairs):
        raise SystemExit(f"--param-variant wants NAME=key:value[,key:value], got {text!r}")
    return {key: value for key, _, value in pairs}


def own_costs(url: str, metrics_url: str, little_model: str, images, variants: dict[str, str], batches: list[int], rounds: int) -> dict:
    """Per variant and batch size: the gate's own ms per execution, one value per round (order rotating)."""
    costs = {name: {b: [] for b in batches} for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for b in batches:
                costs[name][b].append(measure_gate_cost(url, little_model, images, b, gate_model=variants[name], metrics_url=metrics_url).own_ms)
        print(f"cost round {r + 1}/{rounds}: " + "; ".join(
            f"{n} " + "/".join(f"{costs[n][b][-1]:.2f}" for b in batches) for n in names))
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="folder with little.onnx and big.onnx")
    parser.add_argument("--data", default="../shared/data/imagenet-sample")
    parser.add_argument("--out", default="runs/gate_ab")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=MODEL_PY")
    parser.add_argument("--param-variant", action="append", default=[], metavar="NAME=KEY:VALUE[,KEY:VALUE]",
                        help="the current gate with these config parameters")
    parser.add_argument("--threshold", type=float, default=0.256272)
    parser.add_argument("--big-nice", type=int, default=RepositoryOptions.big_nice)
    parser.add_argument("--little-in-gate", action="store_true", help="build every gate variant with little in its process")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--cost-batches", default="", help="e.g. 1,8,32: also measure each variant's own time per execution")
    args = parser.parse_args()

    out = Path(args.out)
    shutil.rmtree(out / "repository", ignore_errors=True)
    options = RepositoryOptions(threshold=args.threshold, big_nice=args.big_nice, little_in_gate=args.little_in_gate)
    repo = build_repository(Path(args.demo) / "little.onnx", Path(args.demo) / "big.onnx", out / "repository", options)
    variants = {"current": GATE_MODEL}
    for spec in args.variant:
        name, _, path = spec.partition("=")
        variants[name] = add_variant(repo, name, Path(path))
    for spec in args.param_variant:
        name, _, text = spec.partition("=")
        variants[name] = add_variant(repo, name, parameters=parse_parameters(text))

    with TritonServer(repo, log_file=out / "tritonserver.log") as server:
        with LittleBigClient(server.grpc_url) as client:
            info = client.gate_info()
        images = to_wire_batch(list_images(args.data)[:64], info.wire_size, info.crop_pct)
        models = list(variants.values()) + [info.little_model]
        probes = alternating_probes(server.grpc_url, models, images, args.concurrency, args.seconds, args.rounds, log=print)
        batches = [int(b) for b in args.cost_batches.split(",") if b]
        costs = own_costs(server.grpc_url, server.metrics_url, info.little_model, images, variants, batches, args.rounds) if batches else {}

    # Per model and round: p50 of the requests little answered (route 0; -1 for little alone),
    # p50 of the escalated ones, and requests per second.
    p50 = {m: [statistics.median(by_route[-1 if m == info.little_model else 0]) for by_route in probes[m]] for m in models}
    big_p50 = {m: [statistics.median(by_route[1]) for by_route in probes[m] if 1 in by_route] for m in models}
    rate = {m: [sum(len(v) for v in by_route.values()) / args.seconds for by_route in probes[m]] for m in models}
    alone = p50[info.little_model]
    report = {"concurrency": args.concurrency, "threshold": args.threshold, "big_nice": args.big_nice, "rounds": args.rounds,
              "little_alone_p50_ms": statistics.median(alone), "variants": {}}
    for name, model in variants.items():
        excess = [g - a for g, a in zip(p50[model], alone)]
        report["variants"][name] = {
            "little_answered_p50_ms": statistics.median(p50[model]),
            "excess_ms": statistics.median(excess),
            "excess_per_round_ms": [round(x, 1) for x in excess],
            "big_answered_p50_ms": statistics.median(big_p50[model]) if big_p50[model] else None,
            "throughput_vs_little_alone": statistics.median(g / a for g, a in zip(rate[model], rate[info.little_model])),
        }
        if costs:
            report["variants"][name]["own_ms_per_execution"] = {b: statistics.median(v) for b, v in costs[name].items()}
            report["variants"][name]["own_ms_per_round"] = costs[name]
            print(f"{name:12s} own time per execution (median of {args.rounds}): "
                  + ", ".join(f"batch {b}: {statistics.median(v):.2f} ms" for b, v in costs[name].items()))
        print(f"{name:12s} little-answered p50 minus little alone: median {statistics.median(excess):+.1f} ms "
              f"(per round {', '.join(f'{x:+.0f}' for x in excess)}); requests/s vs little alone "
              f"{report['variants'][name]['throughput_vs_little_alone']:.2f}")
    (out / "gate_ab.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
