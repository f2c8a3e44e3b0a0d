"""The served cascade, in each form littlebig builds, against the cascades users would otherwise write,
side by side on one server.

  in_gate    `littlebig` as built for the python runtime: an ensemble whose one step is the gate, which
             runs little in its own process and calls big over BLS for the unsure rows
  step       `littlebig_step`, as built for the native runtimes (`--no-little-in-gate`): an ensemble whose
             scheduler runs little, then the gate, which calls big over BLS for the unsure rows
  bls        python_backend's BLS-example style (bench/peers/bls_cascade/model.py): per request, little,
             then big on the whole request if any row is unsure
  client     the client-side cascade: the client asks little for CLASS and CONFIDENCE, then big for the
             unsure images

All four are driven by the same closed-loop asyncio gRPC clients (client/closed_loop.py: one image per
request, drawn at random, so the share escalated is the data's), for ROUNDS rounds at each concurrency,
the order rotating per round (this machine drifts); the printed ratios are medians of per-round ratios
against the client-side cascade. Then each form's own time per execution at batch 1, 8 and 32
(client/gate_cost.py), in rotating rounds too. Writes the figures as JSON and a plot beside it.

    .venv/bin/python bench/peers.py --little runs/lite/little.onnx --big runs/lite/big.onnx \\
        --data ../shared/data/imagenet-sample --threshold 0.36 --out bench/results/peers/peers.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpcaio

from littlebig.client.closed_loop import closed_loop, image_inputs
from littlebig.client.gate_cost import measure_gate_cost
from littlebig.client.images import list_images, to_wire_batch
from littlebig.client.infer import LittleBigClient
from littlebig.contract import BIG_MODEL, CLASS, CONFIDENCE, GATE_MODEL, GATE_STEP_MODEL, LITTLE_MODEL, ROUTE
from littlebig.model_repository.builder import build_repository
from littlebig.model_repository.configs import read_config, write_config
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.server import TritonServer

STEP, PEER = "littlebig_step", "peer_bls"
VARIANTS = ("in_gate", "step", "bls", "client")
MODEL = {"in_gate": GATE_MODEL, "step": STEP, "bls": PEER}
OUTPUTS = [grpcaio.InferRequestedOutput(name) for name in (CLASS, CONFIDENCE, ROUTE)]


@dataclasses.dataclass
class Run:
    variant: str
    concurrency: int
    requests: int
    seconds: float
    latencies_ms: list[float]
    escalated: float  # the share of requests sent to big

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


def add_variants(repository: Path, little: str, big: str, options: RepositoryOptions, work: Path) -> None:
    """Beside the default cascade (little in the gate): the cascade with little as the ensemble's step before
    the gate, and the BLS-example cascade (from the gate's config, whose inputs are the stages')."""
    built = build_repository(little, big, work / "step", dataclasses.replace(options, little_in_gate=False))
    for source, name in ((GATE_MODEL, STEP), (GATE_STEP_MODEL, "gate_step")):
        shutil.copytree(built / source, repository / name)
        config = read_config(repository / name / "config.pbtxt")
        config.name = name
        if name == STEP:
            config.ensemble_scheduling.step[-1].model_name = "gate_step"
        write_config(repository / name, config)
    shutil.copytree(repository / GATE_STEP_MODEL, repository / PEER)
    config = read_config(repository / PEER / "config.pbtxt")
    config.name = PEER
    write_config(repository / PEER, config)
    for module in (repository / PEER / "1").glob("*.py"):
        module.unlink()
    shutil.copyfile(Path(__file__).parent / "peers" / "bls_cascade" / "model.py", repository / PEER / "1" / "model.py")


def sender(variant: str, threshold: float):
    """The request of one variant: (client, image) -> 1 when big answered, else 0."""
    async def client_side(client, image) -> int:
        little = await client.infer(LITTLE_MODEL, [image], outputs=OUTPUTS[:2])
        if float(little.as_numpy(CONFIDENCE)[0, 0]) >= threshold:
            return 0
        await client.infer(BIG_MODEL, [image], outputs=OUTPUTS[:2])
        return 1

    async def served(client, image) -> int:
        result = await client.infer(MODEL[variant], [image], outputs=OUTPUTS)
        return int(result.as_numpy(ROUTE)[0, 0])

    return client_side if variant == "client" else served


def measure(url: str, images: np.ndarray, concurrencies: list[int], rounds: int, seconds: float, threshold: float) -> dict:
    inputs = image_inputs(images)
    runs: dict[int, dict[str, list[Run]]] = {c: {v: [] for v in VARIANTS} for c in concurrencies}
    for r in range(rounds):
        for c in concurrencies:
            for variant in VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]:
                answers = closed_loop(url, sender(variant, threshold), inputs, c, seconds, seed=r)
                runs[c][variant].append(Run(variant, c, len(answers), seconds, [a.latency_ms for a in answers],
                                            float(np.mean([a.route for a in answers]))))
            print(f"round {r + 1}/{rounds} c={c}: " + ", ".join(
                f"{v} {runs[c][v][-1].throughput:.1f}/s (p {runs[c][v][-1].escalated:.3f})" for v in VARIANTS), flush=True)
    return runs


def summarise(runs: dict) -> list[dict]:
    rows = []
    for c, by_variant in runs.items():
        row = {"concurrency": c}
        for v in VARIANTS:
            row[v] = {
                "throughput": statistics.median(run.throughput for run in by_variant[v]),
                "p50_ms": statistics.median(run.percentile(50) for run in by_variant[v]),
                "p99_ms": statistics.median(run.percentile(99) for run in by_variant[v]),
                "escalated": statistics.median(run.escalated for run in by_variant[v]),
            }
            if v != "client":
                pairs = list(zip(by_variant[v], by_variant["client"]))
                row[f"{v}_vs_client"] = statistics.median(a.throughput / b.throughput for a, b in pairs)
                row[f"{v}_minus_client_p50_ms"] = statistics.median(a.percentile(50) - b.percentile(50) for a, b in pairs)
        for v in ("in_gate", "step"):
            pairs = list(zip(by_variant[v], by_variant["bls"]))
            row[f"{v}_vs_bls"] = statistics.median(a.throughput / b.throughput for a, b in pairs)
        rows.append(row)
    return rows


def own_times(url: str, images: np.ndarray, metrics_url: str, batches: list[int], rounds: int) -> dict:
    """The gate's own time per execution in each form, at T = 0, medians of rotating rounds."""
    forms = {"in_gate": GATE_MODEL, "step": STEP}
    times = {form: {b: [] for b in batches} for form in forms}
    for r in range(rounds):
        for form in list(forms)[r % 2:] + list(forms)[: r % 2]:
            for b in batches:
                cost = measure_gate_cost(url, LITTLE_MODEL, images, b, gate_model=forms[form], metrics_url=metrics_url)
                times[form][b].append(cost.own_ms)
    return {form: {b: statistics.median(v) for b, v in by_batch.items()} for form, by_batch in times.items()}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [r["concurrency"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in VARIANTS:
        axes[0].plot(conc, [r[v]["throughput"] for r in rows], marker="o", label=v)
        axes[1].plot(conc, [r[v]["p50_ms"] for r in rows], marker="o", label=f"{v} p50")
    axes[0].set(xlabel="concurrency", ylabel="images / s", title="Throughput (medians of rounds)", xscale="log")
    axes[1].set(xlabel="concurrency", ylabel="ms", title="p50 latency", xscale="log", yscale="log")
    for ax in axes:
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--little", required=True)
    parser.add_argument("--big", required=True)
    parser.add_argument("--data", required=True, help="folder of real images")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--threshold", type=float, required=True)
    parser.add_argument("--concurrency", default="1,4,16,32", help="('' to measure only the own time)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--cost-batches", default="1,8,32", help="batch sizes of the own-time measurement ('' to skip)")
    parser.add_argument("--out", required=True, help="JSON file for the figures (a PNG beside it)")
    parser.add_argument("--gate-instances", type=int, default=RepositoryOptions.gate_instances)
    args = parser.parse_args()

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        options = RepositoryOptions(threshold=args.threshold, gate_instances=args.gate_instances)
        repo = build_repository(args.little, args.big, Path(tmp) / "repository", options)
        add_variants(repo, args.little, args.big, options, Path(tmp))
        with TritonServer(repo, log_file=Path(tmp) / "tritonserver.log") as server:
            with LittleBigClient(server.grpc_url) as client:
                info = client.gate_info()
                images = to_wire_batch(list_images(args.data)[: args.images], info.wire_size, info.crop_pct)
                routes = np.concatenate([client.infer(images[i : i + 16], outputs=[ROUTE])[ROUTE][:, 0] for i in range(0, len(images), 16)])
            data_share = float(np.mean(routes != 0))
            print(f"{len(images)} images; escalation share of the data at T={args.threshold}: {data_share:.3f}", flush=True)
            concurrencies = [int(c) for c in args.concurrency.split(",") if c]
            rows = summarise(measure(server.grpc_url, images, concurrencies, args.rounds, args.seconds, args.threshold))
            batches = [int(b) for b in args.cost_batches.split(",") if b]
            own = own_times(server.grpc_url, images, server.metrics_url, batches, args.rounds) if batches else {}
    for row in rows:
        print(f"c={row['concurrency']:>3}  throughput / client-side: in_gate {row['in_gate_vs_client']:.2f}, step "
              f"{row['step_vs_client']:.2f}, bls {row['bls_vs_client']:.2f}; / bls: in_gate {row['in_gate_vs_bls']:.2f}, step "
              f"{row['step_vs_bls']:.2f}; p50 minus client's: in_gate {row['in_gate_minus_client_p50_ms']:+.1f} ms, step "
              f"{row['step_minus_client_p50_ms']:+.1f} ms; served escalation share "
              + ", ".join(f"{v} {row[v]['escalated']:.3f}" for v in VARIANTS) + f" (data {data_share:.3f})")
    for form, by_batch in own.items():
        print(f"{form}: own time per execution " + ", ".join(f"batch {b} {ms:.2f} ms" for b, ms in by_batch.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threshold": args.threshold, "gate_instances": args.gate_instances, "images": len(images),
                               "data_escalation": data_share, "rounds": args.rounds, "seconds_per_run": args.seconds,
                               "wall_s": time.time() - started, "rows": rows, "own_ms_per_execution": own}, indent=2) + "\n")
    if rows:
        plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
