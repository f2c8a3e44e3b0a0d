"""The cascade served on a GPU: torch-runtime stages on CUDA, big alone, little alone and the cascade.

For each pair: exports both models here (random init through timm, heads sharpened so confidences
spread: timing needs no weights, and an artifact made elsewhere may not load on this torch), serves
them (`--runtime torch --gpu`), checks the served answers against the same TorchScript run offline on
the device, sets T as the quantile of little's confidences that escalates the pair's share, then
measures big, little and the cascade at each concurrency (closed-loop gRPC clients, one image per
request, the order rotating per round), the gate's own time per execution, and GPU memory.

Pairs: EfficientNet-B0 -> B7 and B4 -> B7 at the paper's resolutions (Table 9; the share escalated is
the one that gives the paper's GMACs of the pair, p = 1 + dGMACs - M_little / M_big), Lite0 -> Lite2
at 0.125 (what the real Lite0 escalates at T = 0.36 on the sample photos). S*_macs = M_big / (M_little +
p M_big) (Eq. 5); S*_served the same with the served costs of big and little alone (1 / throughput);
achieved = (cascade / big throughput) / S*_served.

On the GPU machine (docs/gpu.md; the bundle travels as a carried path; about 6 minutes):

    bash scripts/gpu_unpack.sh bundle/littlebig-gpu.tar.xz /tmp/lb && . /tmp/lb/env.sh && \\
        timeout 330 python3 bench/gpu.py --out $OUT/gpu

Here, a dry run with tiny models on the CPU (tests/test_gpu_bench.py): bench/gpu.py --dry-run --out DIR.
Writes DIR/gpu.json after each pair (what finished survives a timeout) and the server logs' tails;
`--plot DIR/gpu.json` draws DIR/gpu.png where matplotlib is (the GPU machine has none).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpcaio
from littlebig.client.closed_loop import closed_loop, image_inputs
from littlebig.client.gate_cost import measure_gate_cost
from littlebig.client.infer import LittleBigClient
from littlebig.export import export_onnx, load_model
from littlebig.export.metadata import torchscript_path
from littlebig.model_repository.builder import build_repository
from littlebig.model_repository.options import RepositoryOptions

from littlebig.contract import (
    BIG_MODEL,
    CLASS,
    CONFIDENCE,
    GATE_MODEL,
    LITTLE_MODEL,
    PROBS,
    ROUTE,
)
from littlebig.serving.server import TritonServer


@dataclasses.dataclass(frozen=True)
class Model:
    spec: str
    resolution: int


@dataclasses.dataclass(frozen=True)
class Pair:
    name: str
    little: Model
    big: Model
    paper_dgmacs: float | None  # the pair's GMACs against big alone (Table 9); None: share given
    share: float | None = None


B7 = Model("timm:tf_efficientnet_b7", 600)
PAIRS = (
    Pair("b0_b7", Model("timm:tf_efficientnet_b0", 224), B7, -0.25),
    Pair("b4_b7", Model("timm:tf_efficientnet_b4", 380), B7, -0.81),
    Pair("lite0_lite2", Model("timm:tf_efficientnet_lite0", 224), Model("timm:tf_efficientnet_lite2", 260), None, 0.125),
)
DRY_PAIRS = (Pair("tiny", Model("timm:mobilenetv3_small_050", 64), Model("timm:resnet10t", 64), None, 0.3),)
HEAD_GAIN = 100.0  # random heads give near-uniform softmax; a gain spreads confidences as training does


class Offline:
    """The pair's TorchScript modules, run in this process on the device, as the reference."""

    def __init__(self, onnx_files: list[Path], device: str):
        import torch

        self.device = torch.device(device)
        self.modules = [torch.jit.load(str(torchscript_path(f)), map_location=self.device).eval() for f in onnx_files]

    def probs(self, stage: int, images: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return np.concatenate([self.modules[stage](torch.from_numpy(images[i : i + 8]).to(self.device))[0].cpu().numpy()
                                   for i in range(0, len(images), 8)])

    def release(self) -> None:
        import torch

        self.modules = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def answers_agree(url: str, images: np.ndarray, offline: Offline, threshold: float) -> dict:
    """Served CLASS, CONFIDENCE, ROUTE and PROBS against Eq. 4 on the offline probabilities. Rows whose
    little confidence is within 1e-4 of T, or whose top two are within 1e-3, may round either way
    (kernels differ with the batch) and are counted apart."""
    little, big = offline.probs(0, images), offline.probs(1, images)
    route = (little.max(1) < threshold).astype(np.int32)
    probs = np.where(route[:, None] == 1, big, little)
    with LittleBigClient(url) as client:
        served = [client.infer(images[i : i + 8], outputs=[CLASS, CONFIDENCE, ROUTE, PROBS]) for i in range(0, len(images), 8)]
    got = {name: np.concatenate([s[name] for s in served]) for name in (CLASS, CONFIDENCE, ROUTE, PROBS)}
    near_t = np.abs(little.max(1) - threshold) < 1e-4
    top2 = np.sort(probs, axis=1)[:, -2:]
    tie = (top2[:, 1] - top2[:, 0]) < 1e-3
    firm = ~near_t & ~tie
    return {
        "rows": len(images), "uncertain_rows": int((~firm).sum()),
        "route_mismatches": int((got[ROUTE][:, 0] != route)[~near_t].sum()),
        "class_mismatches": int((got[CLASS][:, 0] != probs.argmax(1))[firm].sum()),
        "max_abs_prob_diff": float(np.abs(got[PROBS] - probs)[firm].max()) if firm.any() else None,
        "max_abs_confidence_diff": float(np.abs(got[CONFIDENCE][:, 0] - probs.max(1))[firm].max()) if firm.any() else None,
    }


def gpu_memory_mib(dry_run: bool) -> int | None:
    """Memory in use on GPU 0, all processes (the server's stubs hold the served models)."""
    if dry_run:
        return None
    import torch

    free, total = torch.cuda.mem_get_info()
    return (total - free) // 2**20


def sender(variant: str, threshold: float):
    """The request of one variant: (client, image) -> 1 when big answered it, else 0."""
    model = {"big": BIG_MODEL, "little": LITTLE_MODEL, "cascade": GATE_MODEL}[variant]
    outputs = [grpcaio.InferRequestedOutput(name) for name in ((CLASS, ROUTE) if variant == "cascade" else (CLASS,))]
    parameters = {"threshold": threshold} if variant == "cascade" else None

    async def send(client, image) -> int:
        result = await client.infer(model, [image], outputs=outputs, parameters=parameters)
        return int(result.as_numpy(ROUTE)[0, 0]) if variant == "cascade" else int(variant == "big")

    return send


def measure_points(url: str, images: np.ndarray, threshold: float, args, started: float) -> list[dict]:
    """Throughput, latency and the share escalated of each variant at each concurrency, rotating rounds."""
    inputs, variants = image_inputs(images), ("big", "little", "cascade")
    points = []
    for c in args.concurrency:
        point = {"concurrency": c} | {v: {"throughput": [], "p50_ms": [], "p99_ms": [], "escalated": None} for v in variants}
        for r in range(args.rounds):
            if time.time() - started > args.budget_s:
                point["skipped"] = f"budget of {args.budget_s:g} s spent before round {r + 1}"
                break
            for v in variants[r % 3:] + variants[: r % 3]:
                answers = closed_loop(url, sender(v, threshold), inputs, c, args.seconds, warmup=0.5, seed=r)
                latencies = [a.latency_ms for a in answers]
                point[v]["throughput"].append(len(answers) / args.seconds)
                point[v]["p50_ms"].append(float(np.percentile(latencies, 50)))
                point[v]["p99_ms"].append(float(np.percentile(latencies, 99)))
                point[v]["escalated"] = float(np.mean([a.route for a in answers]))
        if point["big"]["throughput"]:
            points.append(point)
    return points


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = result["pairs"]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
    for ax, (name, record) in zip(axes[0], pairs.items()):
        conc = [p["concurrency"] for p in record["points"]]
        for v in ("big", "little", "cascade"):
            ax.plot(conc, [p["summary"]["throughput"][v] for p in record["points"]], marker="o", label=v)
        ax.set(xlabel="concurrency", ylabel="images / s", xscale="log", yscale="log",
               title=f"{name}: p {record['share']:.2f} ({result['device']['device']})")
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def device_info(dry_run: bool) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "dry_run": dry_run}
    if dry_run:
        return info | {"device": "cpu"}
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch: this benchmark is for the GPU machine (--dry-run on a CPU)")
    free, total = torch.cuda.mem_get_info()
    return info | {"device": torch.cuda.get_device_name(0), "memory_mib": total // 2**20, "free_mib": free // 2**20}


def export(model: Model, wire: int, out: Path, num_classes: int | None, parity: np.ndarray) -> dict:
    """ONNX (the builder reads its facts) and its TorchScript twin, made on this machine's torch."""
    import torch

    torch.manual_seed(0)
    loaded = load_model(model.spec, random_init=True, num_classes=num_classes, resolution=model.resolution)
    with torch.no_grad():
        loaded.module.get_classifier().weight.mul_(HEAD_GAIN)
    path = out / f"{model.spec.split(':')[1]}_{model.resolution}_w{wire}.onnx"
    if not path.exists():
        export_onnx(loaded, path, wire_size=wire, parity_images=parity, torchscript=True, log=lambda *_: None)
    return {"onnx": path, "macs": int(json.loads(path.with_suffix(".json").read_text())["macs"])}


def share_of(pair: Pair, little_macs: int, big_macs: int) -> float:
    if pair.paper_dgmacs is None:
        return float(pair.share)
    return float(np.clip(1.0 + pair.paper_dgmacs - little_macs / big_macs, 0.0, 1.0))


def own_times(url: str, images: np.ndarray, batches: tuple[int, ...]) -> dict[int, float]:
    return {b: measure_gate_cost(url, LITTLE_MODEL, images, b, requests=10, warmup=2).own_ms for b in batches}


def run_pair(pair: Pair, work: Path, args, started: float, log_tails: dict) -> dict:
    wire = pair.big.resolution
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.images, wire, wire, 3), dtype=np.uint8)
    num_classes = 10 if args.dry_run else None
    t0 = time.time()
    little, big = (export(m, wire, work, num_classes, images[:2]) for m in (pair.little, pair.big))
    record = {"little": pair.little.spec, "little_px": pair.little.resolution, "big": pair.big.spec, "big_px": wire,
              "little_macs": little["macs"], "big_macs": big["macs"], "export_s": round(time.time() - t0, 1)}
    print(f"{pair.name}: exported in {record['export_s']} s", flush=True)
    offline = Offline([little["onnx"], big["onnx"]], "cpu" if args.dry_run else "cuda")
    conf = offline.probs(0, images).max(1)
    share = share_of(pair, little["macs"], big["macs"])
    threshold = float(np.quantile(conf, share))
    record |= {"share": share, "threshold": threshold}
    options = RepositoryOptions(runtime="torch", gpu=not args.dry_run, threshold=threshold, max_batch_size=64)
    repo = build_repository(little["onnx"], big["onnx"], work / pair.name / "repository", options)
    before = gpu_memory_mib(args.dry_run)
    with TritonServer(repo, log_file=work / pair.name / "tritonserver.log", startup_timeout_s=240) as server:
        log_tails[pair.name] = server.log_file
        record["server_start_s"] = round(time.time() - t0 - record["export_s"], 1)
        record["gpu_memory_mib"] = {"before": before, "served": gpu_memory_mib(args.dry_run)}
        record["answers"] = answers_agree(server.grpc_url, images[: args.check_images], offline, threshold)
        offline.release()
        print(f"{pair.name}: served answers vs offline: {record['answers']}", flush=True)
        record["points"] = measure_points(server.grpc_url, images, threshold, args, started)
        record["gate_own_ms"] = own_times(server.grpc_url, images, args.cost_batches)
        record["gpu_memory_mib"]["after_load"] = gpu_memory_mib(args.dry_run)
    summarise(record)
    return record


def summarise(record: dict) -> None:
    """Speedups against big alone, S* and the achieved fraction, per concurrency."""
    m_l, m_b = record["little_macs"], record["big_macs"]
    for point in record["points"]:
        thr = {v: statistics.median(point[v]["throughput"]) for v in ("big", "little", "cascade")}
        p = point["cascade"]["escalated"]
        speedup = thr["cascade"] / thr["big"]
        s_served = (1 / thr["big"]) / (1 / thr["little"] + p / thr["big"])
        point["summary"] = {"throughput": thr, "speedup": speedup, "s_star_macs": m_b / (m_l + p * m_b),
                            "s_star_served": s_served, "achieved": speedup / s_served}
        print(f"  c={point['concurrency']}: " + ", ".join(f"{v} {t:.1f}/s" for v, t in thr.items())
              + f"; speedup {speedup:.2f}, S*_served {s_served:.2f}, achieved {speedup / s_served:.2f} (p {p:.3f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for gpu.json and the server logs' tails")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, short points (the test)")
    parser.add_argument("--pairs", help="names of the pairs to run, comma-separated (default: all)")
    parser.add_argument("--concurrency", help="default 1,4,16,64 (dry run: 1,4)")
    parser.add_argument("--rounds", type=int, help="default 2 (dry run: 1)")
    parser.add_argument("--seconds", type=float, help="per variant, concurrency and round; default 1.5 (dry run: 1)")
    parser.add_argument("--images", type=int, default=64, help="random images drawn by the load")
    parser.add_argument("--check-images", type=int, default=32, help="images whose served answers are checked")
    parser.add_argument("--budget-s", type=float, help="points not started by then are skipped, said so in gpu.json; "
                        "default 270 (dry run: 60)")
    parser.add_argument("--plot", help="draw the PNG of a gpu.json (where matplotlib is) and stop")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return
    if not args.out:
        parser.error("--out is required")
    defaults = {"concurrency": "1,4", "rounds": 1, "seconds": 1.0, "budget_s": 60.0} if args.dry_run else \
        {"concurrency": "1,4,16,64", "rounds": 2, "seconds": 1.5, "budget_s": 270.0}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.cost_batches = (1, 8) if args.dry_run else (1, 8, 32)
    pairs = DRY_PAIRS if args.dry_run else PAIRS
    if args.pairs:
        pairs = tuple(p for p in pairs if p.name in args.pairs.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, log_tails = time.time(), {}
    result = {"device": device_info(args.dry_run), "concurrency": args.concurrency, "rounds": args.rounds,
              "seconds": args.seconds, "pairs": {}}
    print(f"device: {result['device']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for pair in pairs:
                result["pairs"][pair.name] = run_pair(pair, Path(tmp), args, started, log_tails)
                result["wall_s"] = round(time.time() - started, 1)
                (out / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")
        finally:
            for name, log in log_tails.items():  # what the server said, for a run that went wrong
                lines = Path(log).read_text(errors="replace").splitlines() if Path(log).exists() else []
                (out / f"{name}_tritonserver_tail.log").write_text("\n".join(lines[-60:]) + "\n")
    print(f"wrote {out / 'gpu.json'} in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
