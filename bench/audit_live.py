"""The audit on the real server: label-free calibration, then clean traffic, then drifted traffic.

Builds EfficientNet-Lite0 -> Lite2 with the audit on, serves it, and runs the real label-free calibration
(`calibrate --unlabelled --apply`: the 500 photos' labels withheld, T certified at 2 points on disagreement
with big, the promise installed in the gate). Then it sends photos drawn at random, first clean, then
drifted (bench/audit_probs.py's drifts), in base windows of ``--window`` rows; after each window it waits
for the audit's counts to settle and reads them (client/audit.py), so each window's counts hold exactly
its rows. Each window's true share of answers differing from big's comes from the served answers (ROUTE,
CLASS) and big's own answer on the same wire images (onnxruntime, the library the python runtime runs).

    flock /tmp/littlebig-cpu.lock .venv/bin/python bench/audit_live.py --little runs/lite/little.onnx \
        --big runs/lite/big.onnx --data ../shared/data/imagenet-sample --out bench/results/audit/live.json

Prints, per window, the audited counts, the exact bound, the window's true share; the coverage over base
windows and over sliding windows of ``--slide`` base windows (what the alert judges), and the rows from
the shift to the first alert (sliding bound above the promise) and whether any alert came before it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from littlebig.client.audit import exact_upper, read_snapshot, relaxed_upper
from littlebig.client.calibrate import calibrate
from littlebig.client.criterion import Criterion
from littlebig.client.datasets import load_image_set
from littlebig.client.images import to_wire_batch
from littlebig.client.infer import LittleBigClient
from littlebig.contract import CLASS, ROUTE
from littlebig.export import ort_session
from littlebig.model_repository.builder import build_repository
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.server import TritonServer

from audit_probs import drifted  # noqa: E402 - bench/ is the script's folder

LEVEL = 0.95


@dataclasses.dataclass
class Window:
    phase: str
    rows: int
    covered: float
    audited: float
    disagree: float
    skipped: float
    true_differ: int  # rows whose served answer differs from big's
    upper: float
    alert_upper: float


def big_classes(big_onnx: str, wire: np.ndarray) -> np.ndarray:
    session = ort_session(big_onnx)
    return np.concatenate([session.run(["CLASS"], {"IMAGE": wire[i:i + 25]})[0][:, 0] for i in range(0, len(wire), 25)])


def run_window(server, wire, big, rows, batch, rng, phase, rate) -> Window:
    before = read_snapshot(server.metrics_url, settle=False)
    differ = 0
    with LittleBigClient(server.grpc_url) as client:
        for _ in range(rows // batch):
            pick = rng.integers(0, len(wire), batch)
            answer = client.infer(wire[pick], outputs=[CLASS, ROUTE])
            kept = answer[ROUTE][:, 0] == 0
            differ += int((kept & (answer[CLASS][:, 0] != big[pick])).sum())
    window = read_snapshot(server.metrics_url).minus(before)  # settles: the audit calls of this window are in
    return Window(phase, rows, window.covered, window.audited, window.disagree, sum(window.skipped.values()), differ,
                  exact_upper(window.disagree, window.covered, rate, LEVEL), relaxed_upper(window.disagree, window.covered, rate, LEVEL))


def summarise(windows: list[Window], rate: float, promise: float, slide: int) -> dict:
    base = [w.upper >= w.true_differ / w.rows for w in windows]
    sliding, alerts = [], []
    for end in range(slide, len(windows) + 1):
        part = windows[end - slide:end]
        covered, disagree = sum(w.covered for w in part), sum(w.disagree for w in part)
        truth = sum(w.true_differ for w in part) / sum(w.rows for w in part)
        upper = exact_upper(disagree, covered, rate, LEVEL)
        sliding.append({"end": end, "phase_mix": sum(w.phase != "clean" for w in part) / slide, "truth": truth, "upper": upper,
                        "alert_upper": relaxed_upper(disagree, covered, rate, LEVEL), "covers": upper >= truth,
                        "alert": upper > promise})
        alerts.append(upper > promise)
    shift = next(i for i, w in enumerate(windows) if w.phase != "clean")
    fired = [s["end"] for s in sliding if s["alert"]]
    rows_per_window = windows[0].rows
    return {"base_windows": len(windows), "base_coverage": float(np.mean(base)),
            "sliding_windows": len(sliding), "sliding_coverage": float(np.mean([s["covers"] for s in sliding])),
            "alerts_before_shift": sum(1 for e in fired if e <= shift),
            "rows_from_shift_to_alert": next(((e - shift) * rows_per_window for e in fired if e > shift), None),
            "sliding": sliding}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--little", required=True)
    parser.add_argument("--big", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--drift", default="noise")
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--window", type=int, default=256, help="rows per base window")
    parser.add_argument("--windows", type=int, default=40, help="base windows per phase")
    parser.add_argument("--slide", type=int, default=4, help="base windows per sliding window (what the alert judges)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        options = RepositoryOptions(threshold=0.5, audit_rate=args.rate, audit_in_flight=4)
        repo = build_repository(args.little, args.big, Path(tmp) / "repository", options)
        with TritonServer(repo, log_file=Path(tmp) / "tritonserver.log") as server:
            report = calibrate(server.grpc_url, args.data, Path(tmp) / "calib", Criterion(), unlabelled=True, apply=True,
                               show_progress=False)
            with LittleBigClient(server.grpc_url) as client:
                info = client.gate_info()
            paths = load_image_set(args.data).paths
            clean = to_wire_batch(paths, info.wire_size, info.crop_pct)
            phases = {"clean": clean, args.drift: drifted(clean, args.drift)}
            bigs = {name: big_classes(args.big, wire) for name, wire in phases.items()}
            windows = []
            for name, wire in phases.items():
                for _ in range(args.windows):
                    windows.append(run_window(server, wire, bigs[name], args.window, args.batch, rng, name, args.rate))
                    w = windows[-1]
                    print(f"{name:>6} window {len(windows):>3}: covered {w.covered:.0f}, audited {w.audited:.0f}, differ "
                          f"{w.disagree:.0f} (true {w.true_differ}/{w.rows}), bound {w.upper:.3f}", flush=True)
    promise = report["applied"]["promise"]
    result = {"threshold": report["threshold"], "promise": promise, "calibration": {k: report[k] for k in ("criterion", "bound", "agreement")},
              "rate": args.rate, "drift": args.drift, "window_rows": args.window, "slide": args.slide,
              "wall_s": time.time() - started, **summarise(windows, args.rate, promise, args.slide),
              "windows": [dataclasses.asdict(w) for w in windows]}
    print(json.dumps({k: v for k, v in result.items() if k not in ("windows", "sliding", "calibration")}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
