"""Peak server memory of a two-pass batch job against serving big alone (paper Table 9's setting).

Each measurement runs on a fresh server (`littlebig serve`'s configuration: all three models loaded
at start) and samples the summed RSS of tritonserver and its python-backend stubs every 50 ms:

- big alone: the gate and little unloaded, big answering every image (the memory of serving big);
- batch: `run_batch` (little with big unloaded, then big on the escalated images), peak per pass;
- cascade: the gate serving every image with little and big loaded (what online serving holds).

Rounds alternate the order. "idle" is taken after the switches with nothing in flight; "peak" is
the highest sample while images are inferred (the server starts with everything loaded, which no
configuration keeps). On the CPU runtime most of a peak is onnxruntime's arena for activations,
which follows the largest batch a model executes: compare configurations at the same
--batch-size and --concurrency (1 keeps the dynamic batchers from merging requests).

    .venv/bin/python bench/batch_memory.py --models runs/lite --data ../shared/data/imagenet-sample --concurrency 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import tritonclient.grpc as grpcclient

from littlebig.client.batch import infer_files, keep_only, run_batch, settings_from_server
from littlebig.client.images import list_images
from littlebig.client.infer import LittleBigClient
from littlebig.serving.memory import MemorySampler, tree_rss
from littlebig.model_repository.builder import build_repository
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.server import TritonServer

MIB = 2**20


def idle_rss(server: TritonServer) -> float:
    """RSS once the loaded models have settled (no request in flight): weights and runtimes."""
    time.sleep(1.0)
    return tree_rss(server.process.pid) / MIB


def big_alone(server: TritonServer, folder: Path, files: list[str], batch_size: int, concurrency: int) -> dict[str, float]:
    headers = server.admin_headers()
    settings = settings_from_server(server.grpc_url, folder, None, headers)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        keep_only(client, settings, settings.big_model, headers)
    idle = idle_rss(server)
    with MemorySampler(server.process.pid) as sampler:
        asyncio.run(infer_files(server.grpc_url, settings.big_model, folder, files, settings, lambda *_: None, batch_size, concurrency))
    return {"idle": idle, "peak": sampler.peak() / MIB}


def batch(server: TritonServer, folder: Path, batch_size: int, concurrency: int, out: Path) -> dict[str, float]:
    with MemorySampler(server.process.pid) as sampler:
        result = run_batch(server.grpc_url, folder, out, batch_size=batch_size, concurrency=concurrency, show_progress=False)
    peaks = {f"peak_{w.model}_pass": sampler.peak(w.start, w.end) / MIB for w in result.windows}
    return {**peaks, "peak": max(peaks.values()), "escalated": result.escalated}


def cascade(server: TritonServer, folder: Path, files: list[str], batch_size: int) -> dict[str, float]:
    idle = idle_rss(server)
    with MemorySampler(server.process.pid) as sampler, LittleBigClient(server.grpc_url) as client:
        client.classify([folder / f for f in files], batch_size=batch_size)
    return {"idle": idle, "peak": sampler.peak() / MIB}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="runs/demo", help="folder with little.onnx and big.onnx")
    parser.add_argument("--data", default="../shared/data/imagenet-sample")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="images per request in every configuration")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight (the gate phase always sends one at a time; above 1 the dynamic "
                        "batchers merge requests into batches up to 64, and onnxruntime's memory grows with the batch)")
    parser.add_argument("--out", default="runs/batch_memory")
    return parser.parse_args()


def main() -> None:
    args = parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    repo = build_repository(Path(args.models) / "little.onnx", Path(args.models) / "big.onnx", out / "repository", RepositoryOptions())
    folder = Path(tempfile.mkdtemp(prefix="batch-memory-"))
    for path in list_images(args.data)[: args.images]:
        (folder / path.name).symlink_to(path.resolve())
    files = sorted(p.name for p in folder.iterdir())

    measured = {"big_alone": [], "batch": [], "cascade": []}
    for round_index in range(args.rounds):
        order = list(measured) if round_index % 2 == 0 else list(reversed(measured))
        for name in order:
            with TritonServer(repo, log_file=out / f"{name}-{round_index}.log") as server:
                if name == "big_alone":
                    measured[name].append(big_alone(server, folder, files, args.batch_size, args.concurrency))
                elif name == "batch":
                    measured[name].append(batch(server, folder, args.batch_size, args.concurrency, out / f"preds-{round_index}.csv"))
                else:
                    measured[name].append(cascade(server, folder, files, args.batch_size))
            print(f"round {round_index + 1} {name}: {measured[name][-1]}", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in measured[name])

    big = median("big_alone", "peak")
    print(f"\n{len(files)} images, requests of {args.batch_size}, {args.concurrency} in flight; server RSS (tritonserver + stubs) in MiB, "
          f"median of {args.rounds} rounds; ratio = peak / big alone's peak")
    print(f"  {'':<28} {'idle':>6} {'peak':>6} {'ratio':>6}")
    print(f"  {'big alone serving':<28} {median('big_alone', 'idle'):>6.0f} {big:>6.0f} {1:>6.2f}")
    for model in ("little", "big"):
        value = median("batch", f"peak_{model}_pass")
        print(f"  {'batch, ' + model + ' pass':<28} {'':>6} {value:>6.0f} {value / big:>6.2f}")
    job = median("batch", "peak")
    print(f"  {'batch, whole job':<28} {'':>6} {job:>6.0f} {job / big:>6.2f}")
    print(f"  {'cascade serving (all loaded)':<28} {median('cascade', 'idle'):>6.0f} {median('cascade', 'peak'):>6.0f} "
          f"{median('cascade', 'peak') / big:>6.2f}")
    (out / "batch_memory.json").write_text(json.dumps({"images": len(files), "batch_size": args.batch_size,
                                                      "concurrency": args.concurrency, "rounds": measured}, indent=1))
    shutil.rmtree(folder)


if __name__ == "__main__":
    main()
