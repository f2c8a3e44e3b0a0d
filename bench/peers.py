"""The littlebig gate against the cascades users would otherwise write, side by side on one server.

  gate        the littlebig BLS gate (batches rows across requests, early answers, big on escalated rows)
  bls         python_backend's BLS example style (bench/peers/bls_cascade/model.py): per request,
              little, then big on the whole request if any row is unsure; same config as the gate
  client      the client-side cascade: the client calls little, then big for the unsure images

All three are driven by the same closed-loop asyncio gRPC clients (one image per request), for
ROUNDS rounds at each concurrency, the order rotating per round (this machine drifts); the printed
ratios are medians of per-round ratios.

    .venv/bin/python bench/peers.py --little runs/lite/little.onnx --big runs/lite/big.onnx \
        --data DIR --threshold 0.36 --out bench/results/peers.json

With --little-in-gate the gate runs little in its own process (`littlebig repo --little-in-gate`);
the peers still call the served `little`, as a user's BLS model or client would.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpcaio

from littlebig.client.images import list_images, to_wire_batch
from littlebig.client.infer import LittleBigClient
from littlebig.model_repository.builder import GATE, RepositoryOptions, build_repository, read_config, write_config
from littlebig.server import TritonServer

PEER = "peer_bls"
VARIANTS = ("gate", "bls", "client")


@dataclasses.dataclass
class Run:
    variant: str
    concurrency: int
    requests: int
    seconds: float
    latencies_ms: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


def add_peer(repository: Path) -> None:
    """The BLS-example cascade beside the gate, with the gate's config under another name."""
    config = read_config(repository / GATE / "config.pbtxt")
    config.name = PEER
    (repository / PEER / "1").mkdir(parents=True, exist_ok=True)
    write_config(repository / PEER, config)
    shutil.copyfile(Path(__file__).parent / "peers" / "bls_cascade" / "model.py", repository / PEER / "1" / "model.py")
    for name in ("labels.txt",):  # the outputs' label_filename
        if (repository / GATE / name).is_file():
            shutil.copyfile(repository / GATE / name, repository / PEER / name)


def image_inputs(images: np.ndarray) -> list[grpcaio.InferInput]:
    inputs = []
    for img in images:
        tensor = grpcaio.InferInput("IMAGE", [1, *img.shape], "UINT8")
        tensor.set_data_from_numpy(img[None])
        inputs.append(tensor)
    return inputs


async def one_request(client, variant: str, image, threshold: float, outputs) -> None:
    if variant == "gate":
        await client.infer(GATE, [image], outputs=outputs)
    elif variant == "bls":
        await client.infer(PEER, [image], outputs=outputs)
    else:  # client-side cascade
        little = await client.infer("little", [image], outputs=[grpcaio.InferRequestedOutput("CONFIDENCE")])
        if float(little.as_numpy("CONFIDENCE")[0, 0]) < threshold:
            await client.infer("big", [image], outputs=[grpcaio.InferRequestedOutput("CLASS")])


async def closed_loop(url: str, variant: str, inputs, concurrency: int, seconds: float, threshold: float, warmup: float = 1.0) -> Run:
    client = grpcaio.InferenceServerClient(url)
    outputs = [grpcaio.InferRequestedOutput("CLASS"), grpcaio.InferRequestedOutput("ROUTE")]
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + seconds
    latencies: list[float] = []

    async def worker(offset: int) -> None:
        i = offset
        while loop.time() < end:
            sent = loop.time()
            await one_request(client, variant, inputs[i % len(inputs)], threshold, outputs)
            if sent >= start:
                latencies.append((loop.time() - sent) * 1000.0)
            i += concurrency

    try:
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    finally:
        await client.close()
    return Run(variant, concurrency, len(latencies), seconds, latencies)


def measure(url: str, images: np.ndarray, concurrencies: list[int], rounds: int, seconds: float, threshold: float) -> dict:
    inputs = image_inputs(images)
    runs: dict[int, dict[str, list[Run]]] = {c: {v: [] for v in VARIANTS} for c in concurrencies}
    for r in range(rounds):
        for c in concurrencies:
            order = VARIANTS[r % 3:] + VARIANTS[: r % 3]
            for variant in order:
                run = asyncio.run(closed_loop(url, variant, inputs, c, seconds, threshold))
                runs[c][variant].append(run)
            print(f"round {r + 1}/{rounds} c={c}: " + ", ".join(f"{v} {runs[c][v][-1].throughput:.1f}/s" for v in VARIANTS), flush=True)
    return runs


def summarise(runs: dict) -> list[dict]:
    rows = []
    for c, by_variant in runs.items():
        per_round = list(zip(*(by_variant[v] for v in VARIANTS)))
        row = {"concurrency": c}
        for v in VARIANTS:
            row[v] = {
                "throughput": statistics.median(run.throughput for run in by_variant[v]),
                "p50_ms": statistics.median(run.percentile(50) for run in by_variant[v]),
                "p99_ms": statistics.median(run.percentile(99) for run in by_variant[v]),
            }
        for peer in ("bls", "client"):
            row[f"gate_vs_{peer}_throughput"] = statistics.median(g.throughput / p.throughput for g, p in
                                                                  ((rr[0], rr[VARIANTS.index(peer)]) for rr in per_round))
            for q in ("p50", "p99"):
                row[f"gate_vs_{peer}_{q}"] = statistics.median(
                    g.percentile(int(q[1:])) / p.percentile(int(q[1:])) for g, p in ((rr[0], rr[VARIANTS.index(peer)]) for rr in per_round)
                )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--little", required=True)
    parser.add_argument("--big", required=True)
    parser.add_argument("--data", required=True, help="folder of real images")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--threshold", type=float, required=True)
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--out", required=True, help="JSON file for the figures")
    parser.add_argument("--little-in-gate", action="store_true", help="the gate runs little in its own process")
    parser.add_argument("--gate-instances", type=int, default=RepositoryOptions.gate_instances)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        options = RepositoryOptions(threshold=args.threshold, little_in_gate=args.little_in_gate, gate_instances=args.gate_instances)
        repo = build_repository(args.little, args.big, Path(tmp) / "repository", options)
        add_peer(repo)
        with TritonServer(repo, log_file=Path(tmp) / "tritonserver.log") as server:
            with LittleBigClient(server.grpc_url) as client:
                info = client.gate_info()
            images = to_wire_batch(list_images(args.data)[: args.images], info.wire_size, info.crop_pct)
            started = time.time()
            runs = measure(server.grpc_url, images, [int(c) for c in args.concurrency.split(",")], args.rounds,
                           args.seconds, args.threshold)
    rows = summarise(runs)
    for row in rows:
        print(f"c={row['concurrency']:>3}  throughput gate/bls {row['gate_vs_bls_throughput']:.2f}  gate/client "
              f"{row['gate_vs_client_throughput']:.2f}  p50 gate/bls {row['gate_vs_bls_p50']:.2f} gate/client "
              f"{row['gate_vs_client_p50']:.2f}  p99 gate/bls {row['gate_vs_bls_p99']:.2f} gate/client {row['gate_vs_client_p99']:.2f}  "
              f"(img/s gate {row['gate']['throughput']:.1f}, bls {row['bls']['throughput']:.1f}, client {row['client']['throughput']:.1f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threshold": args.threshold, "little_in_gate": args.little_in_gate, "gate_instances": args.gate_instances,
                                          "images": len(images), "rounds": args.rounds,
                                          "seconds_per_run": args.seconds, "wall_s": time.time() - started, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
