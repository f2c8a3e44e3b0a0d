"""Reproduce bench/results/examples/: the multi-label (digits attributes) and text (Debian sections)
pairs trained here, and their cascade at a T chosen on the calibration split.

For each example: build it (`littlebig example NAME`, seeded), serve its little and big and ask
each model directly for PROBS on the calibration and test splits (as client/collect.py does for
images), choose T on calibration with client/kstage.py, the project's calibration (signal:
mean_abs_margin for multi-label, max_softmax for text): the fewest MACs with micro-F1 at most
--max-drop below big's (point estimate) or, for accuracy, the drop certified at --confidence-level
(Clopper-Pearson, Learn-then-Test). Then report on the test split little, big and the cascade at T:
the metric (micro-F1 or accuracy), the share escalated and the MACs saved against big alone. Plots
every T on the test split. Then serves each pair at its T through the real server and compares the
gate's answers with the offline cascade row by row (routes, classes or LABELS, CONFIDENCE and PROBS).

    flock /tmp/littlebig-cpu.lock .venv/bin/python bench/examples.py [--workdir runs/examples] [--reuse]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from littlebig.examples.build import EXAMPLES, build_example
from littlebig.examples.data import TensorSet
from littlebig.client import kstage
from littlebig.client.criterion import DEFAULT_CONFIDENCE_LEVEL, Criterion
from littlebig.client.kstage import StageOutcomes, choose, sweep_stages
from littlebig.examples.reference import cascade, stage_probs
from littlebig.gate.signals import DEFAULT_SIGNAL

RESULTS = Path(__file__).parent / "results" / "examples"


def collect_served(folder: Path, signal: str, work: Path) -> dict[str, list[np.ndarray]]:
    """Both stages' PROBS on the calibration and test rows, asked from the served little and big directly
    (as client/collect.py does for images; the gate's T here is a placeholder: it is not asked)."""
    from littlebig.examples.served import build_example_repository, served_stage_probs
    from littlebig.serving.server import TritonServer

    repository = build_example_repository(folder, work / "collect-repository", 0.5, signal)
    with TritonServer(repository, log_file=work / "collect-tritonserver.log") as server:
        return {split: served_stage_probs(server.grpc_url, TensorSet.load(folder / f"{split}.npz"))
                for split in ("calib", "test")}


def evaluate(folder: Path, criterion: Criterion, work: Path) -> tuple[dict, dict]:
    """The summary of one example and its test-split sweep over T (for the plot): T chosen by
    client/kstage.py on the served calibration probabilities, then the cascade at T on the test rows."""
    summary = json.loads((folder / "example.json").read_text())
    task, signal = summary["task"], DEFAULT_SIGNAL[summary["task"]]
    macs = [summary["models"][role]["macs"] for role in ("little", "big")]
    probs = collect_served(folder, signal, work)
    calib = StageOutcomes.from_probs(probs["calib"], TensorSet.load(folder / "calib.npz").labels, macs, signal, task)
    calib_sweep = sweep_stages(calib)
    choice = choose(calib, calib_sweep, criterion)
    chosen = kstage.summary(calib, calib_sweep, choice.index, choice.thresholds)
    test = StageOutcomes.from_probs(probs["test"], TensorSet.load(folder / "test.npz").labels, macs, signal, task)
    at_t = kstage.evaluate(test, choice.thresholds)
    result = {
        "example": summary["example"], "task": task, "metric": summary["metric"], "signal": signal, "source": summary["source"],
        "labels": summary["labels"], "rows": summary["rows"], "macs_little": macs[0], "macs_big": macs[1],
        "test": {
            "little": at_t["stage_metric"][0], "big": at_t["stage_metric"][1], "cascade": at_t["metric"],
            "escalated": at_t["answered"][1], "relative_macs": 1.0 - at_t["macs_reduction"], "macs_saved": at_t["macs_reduction"],
        },
        "threshold": choice.thresholds[0], "criterion": choice.criterion, "criterion_met": choice.met,
        "calib": {"rows": calib.n, "cascade": chosen["metric"], "big": chosen["reference_metric"],
                  "relative_macs": 1.0 - chosen["macs_reduction"], "bound": choice.bound},
        "probs_from": "the served little and big (Triton), asked directly",
    }
    test_sweep = sweep_stages(test)
    return result, {"relative_macs": test_sweep.relative_macs.tolist(), "metric": test_sweep.metric.tolist()}


def serve_and_compare(folder: Path, result: dict, work: Path) -> dict:
    """The pair at its T through the real Triton server, compared row by row with the offline cascade."""
    from littlebig.examples.served import build_example_repository, compare, served_answers
    from littlebig.serving.server import TritonServer

    task, signal = result["task"], result["signal"]
    repository = build_example_repository(folder, work / "repository", result["threshold"], signal)
    test = TensorSet.load(folder / "test.npz")
    expected = cascade(stage_probs([folder / "little.onnx", folder / "big.onnx"], test), [result["threshold"]], signal)
    with TritonServer(repository, log_file=work / "tritonserver.log") as server:
        return compare(served_answers(server.grpc_url, test, task), expected, task)


def plot(results: list[dict], sweeps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2))
    for ax, result, sweep in zip(np.atleast_1d(axes), results, sweeps):
        ax.plot(sweep["relative_macs"], sweep["metric"], ".", markersize=3, color="tab:gray", label="cascade, every T")
        test = result["test"]
        ax.plot([test["relative_macs"]], [test["cascade"]], "o", color="tab:red",
                label=f"cascade at T={result['threshold']:.3f} (chosen on calib)")
        ax.plot([1.0], [test["big"]], "s", color="tab:blue", label="big alone")
        ax.plot([result["macs_little"] / result["macs_big"]], [test["little"]], "^", color="tab:green", label="little alone")
        ax.set_xlabel("MACs per row / big's")
        ax.set_ylabel(f"test {result['metric']}")
        ax.set_title(f"{result['example']} ({result['signal']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _served(check: dict | None) -> str:
    if check is None:
        return "not run"
    same = check["route_mismatches"] == 0 and check["answer_mismatches"] == 0
    return (f"{check['rows'] - max(check['route_mismatches'], check['answer_mismatches'])}/{check['rows']} rows"
            f"{'' if same else ' (MISMATCH)'}, max abs dprob {check['max_abs_probs_diff']:.1e}")


def table(results: list[dict]) -> str:
    lines = ["| example | metric | little | big | cascade at T | T | criterion (calib) | escalated | MACs saved vs big | MACs little / big | served = offline |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["test"]
        lines.append(f"| {r['example']} | {r['metric']} | {t['little']:.4f} | {t['big']:.4f} | {t['cascade']:.4f} | "
                     f"{r['threshold']:.4f} | {r['criterion']}{'' if r['criterion_met'] else ' (NOT MET)'} | {t['escalated']:.1%} | {t['macs_saved']:.1%} | {r['macs_little']:,} / {r['macs_big']:,} | "
                     f"{_served(r.get('served'))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/examples", help="where the examples are built")
    parser.add_argument("--reuse", action="store_true", help="use examples already built in --workdir")
    parser.add_argument("--max-drop", type=float, default=0.005, help="largest metric drop below big's: certified at "
                        "--confidence-level for accuracy, the measured micro-F1 drop on calibration for multi-label")
    parser.add_argument("--confidence-level", type=float, default=DEFAULT_CONFIDENCE_LEVEL)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--no-serve", action="store_true", help="skip the row-by-row check through the server")
    args = parser.parse_args()
    results, sweeps = [], []
    for name in EXAMPLES:
        folder = Path(args.workdir) / name
        if not (args.reuse and (folder / "example.json").is_file()):
            build_example(name, folder)
        criterion = Criterion(max_acc_drop=args.max_drop, confidence_level=args.confidence_level)
        result, sweep = evaluate(folder, criterion, Path(args.workdir) / f"{name}-served")
        if not args.no_serve:
            result["served"] = serve_and_compare(folder, result, Path(args.workdir) / f"{name}-served")
            print(f"{name}: served vs offline {result['served']}")
        results.append(result)
        sweeps.append(sweep)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(table(results))
    plot(results, sweeps, out / "examples.png")
    print(table(results))


if __name__ == "__main__":
    main()
