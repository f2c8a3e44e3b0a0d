"""Reproduce bench/results/segmentation/: the shapes segmentation pair trained here, served, calibrated
through the server on its calibration images, evaluated on its test images, and the served masks
compared with the offline cascade (onnxruntime) image by image.

`littlebig example segmentation` (seeded) builds the pair; the repository serves it with little in the
gate; `calibrate` (the certified default criterion, mIoU at most --max-drop below big's) chooses T on
DIR/calib with DIR/test as the evaluation set and applies it; then the test images go through the gate at
that T and every route and mask is compared with the offline rule. Writes report.json, table.txt,
curves.png and signals.png (calibrate's) and summary.json.

    flock /tmp/littlebig-cpu.lock .venv/bin/python bench/segmentation.py [--workdir runs/segmentation] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from littlebig.client.calibrate import calibrate
from littlebig.client.criterion import Criterion
from littlebig.client.images import to_wire_batch
from littlebig.client.infer import LittleBigClient
from littlebig.client.segmentation import load_segmentation_set
from littlebig.examples import shapes
from littlebig.examples.segpair import build_segmentation_pair, cascade, stage_outputs
from littlebig.model_repository.builder import build_repository
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.server import TritonServer

RESULTS = Path(__file__).parent / "results" / "segmentation"


def served_against_offline(url: str, example: Path, threshold: float) -> dict:
    """The gate's answers on the test images against the offline cascade at ``threshold``."""
    wire = to_wire_batch(list(load_segmentation_set(example / "test").paths), shapes.WIRE, 1.0)
    with LittleBigClient(url) as client:
        predictions = client.classify(wire, batch_size=32)
    little, big = (stage_outputs(example / f"{role}.onnx", wire) for role in ("little", "big"))
    expected = cascade(little, big, threshold)
    masks = np.stack([p.mask for p in predictions])
    routes = np.array([p.route for p in predictions])
    confidence = np.array([p.confidence for p in predictions])
    return {"images": len(wire), "routes_equal": int((routes == expected.route).sum()),
            "masks_equal": int(np.all(masks == expected.mask, axis=(1, 2)).sum()),
            "max_abs_confidence_diff": float(np.abs(confidence - expected.confidence).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/segmentation", help="folder for the example, repository and logs")
    parser.add_argument("--reuse", action="store_true", help="reuse an example already built in the workdir")
    parser.add_argument("--max-drop", type=float, default=0.01, help="mIoU drop against big allowed (certified at 95%%)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the results")
    args = parser.parse_args()
    work, out = Path(args.workdir), Path(args.out)
    example = work / "example"
    if not (args.reuse and (example / "example.json").is_file()):
        build_segmentation_pair(example, seed=0)
    repo = build_repository(example / "little.onnx", example / "big.onnx", work / "repository",
                            RepositoryOptions(runtime="python", threshold=0.5, intra_op_threads=1))
    with TritonServer(repo, log_file=work / "tritonserver.log") as server:
        report = calibrate(server.grpc_url, example / "calib", work / "calibration", Criterion(max_acc_drop=args.max_drop),
                           eval_data=example / "test", apply=True, show_progress=False)
        agreement = served_against_offline(server.grpc_url, example, report["threshold"])
    out.mkdir(parents=True, exist_ok=True)
    for name in ("report.json", "table.txt", "curves.png", "signals.png"):
        shutil.copyfile(work / "calibration" / name, out / name)
    summary = {"example": json.loads((example / "example.json").read_text()), "threshold": report["threshold"],
               "calibration": {k: report[k] for k in ("escalation", "macs_reduction", "miou", "pixel_accuracy", "uncertainty")},
               "test": report["eval"], "served_vs_offline_on_test": agreement}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["served_vs_offline_on_test"]))


if __name__ == "__main__":
    main()
