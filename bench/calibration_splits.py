"""Does a T calibrated on a few hundred images keep its promise on images it has not seen?

Splits a labelled image set many times into a calibration half and an evaluation half (by class
parity, both ways, then at random) and runs `calibrate` on each split with `--eval-data` set to the
other half: the real command, its report and its stated bound. Both models' probabilities are
collected through the server once (or read from a calibration.npz cache) and handed to each split
as its cache, so the 40 splits need no more server time.

    .venv/bin/python bench/calibration_splits.py --url 127.0.0.1:8001 --data ../shared/data/imagenet-sample \
        --out bench/results/calibration

Prints, per criterion, in how many splits the unseen half's drop stayed within what the choice
promised (the certified default: its stated bound; a point estimate: its tolerance) and the mean MACs
saving on the unseen half; writes splits.json and splits.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from littlebig.client import thresholds as th
from littlebig.client.calibrate import calibrate, outcomes_of
from littlebig.client.collect import Collected, collect_cached
from littlebig.client.criterion import Criterion
from littlebig.client.datasets import load_image_set

CRITERIA = {
    "default (certified 2 pt @ 95%)": Criterion(),
    "point estimate, 0 pt (old default)": Criterion(max_acc_drop=0.0, point_estimate=True),
    "point estimate, 2 pt": Criterion(point_estimate=True),
}


@dataclasses.dataclass
class SplitResult:
    split: str
    threshold: float
    promise: float  # the drop the choice claims: its bound (certified) or the tolerance (point estimate)
    stated_bound: float  # the report's exact upper bound on the drop at this T
    eval_drop: float
    eval_macs_reduction: float

    @property
    def held(self) -> bool:
        return self.eval_drop <= self.promise + 1e-12


def split_indices(labels: np.ndarray, n_random: int, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    even = (labels // 2) % 2 == 0  # alternate classes (the sample holds every other ImageNet class)
    splits = [("class parity A", np.flatnonzero(even), np.flatnonzero(~even)),
              ("class parity B", np.flatnonzero(~even), np.flatnonzero(even))]
    rng = np.random.default_rng(seed)
    for i in range(n_random):
        order = rng.permutation(len(labels))
        half = len(labels) // 2
        splits.append((f"random {i}", np.sort(order[:half]), np.sort(order[half:])))
    return splits


def subset_folder(root: Path, name: str, collected: Collected, rows: np.ndarray, data: Path) -> tuple[Path, Collected]:
    """A folder of links to ``rows``' images (and the class list), plus its probabilities as a cache."""
    folder = root / name
    folder.mkdir(parents=True)
    for extra in ("classes.tsv",):
        if (data / extra).is_file():
            (folder / extra).symlink_to((data / extra).resolve())
    links = []
    for i in rows:
        source = Path(collected.paths[i])
        (folder / source.name).symlink_to(source.resolve())
        links.append(str(folder / source.name))
    order = np.argsort(links)  # load_image_set lists files sorted
    cached = dataclasses.replace(
        collected, stages=[probs[rows][order] for probs in collected.stages],
        labels=collected.labels[rows][order], paths=[links[j] for j in order],
    )
    return folder, cached


def run_split(root: Path, data: Path, collected: Collected, name: str, calib: np.ndarray, evaluation: np.ndarray, criterion: Criterion) -> SplitResult:
    work = root / name.replace(" ", "_")
    calib_dir, calib_cache = subset_folder(work, "calib", collected, calib, data)
    eval_dir, eval_cache = subset_folder(work, "eval", collected, evaluation, data)
    out = work / "out"
    out.mkdir()
    calib_cache.save(out / "calibration.npz")
    eval_cache.save(out / "evaluation.npz")
    # The URL is never reached: both caches hold exactly these images.
    report = calibrate("127.0.0.1:1", calib_dir, out, criterion, eval_data=eval_dir, show_progress=False, log=lambda *_: None)
    ev, bound = report["eval"], report["uncertainty"]["upper_drop"]
    promise = criterion.max_acc_drop if criterion.point_estimate else bound
    return SplitResult(name, report["threshold"], promise, bound, ev["accuracy"]["big"] - ev["accuracy"]["cascade"], ev["macs_reduction"])


def full_set_figures(collected: Collected) -> dict:
    """The default on the whole set, and what a 0.5-point guarantee would take."""
    default = Criterion()
    level = default.confidence_level
    outcomes = outcomes_of(collected)
    s = th.sweep(outcomes)
    choice = th.choose_with_bound(s, outcomes.n, default.max_acc_drop, level)
    block = th.uncertainty(outcomes, float(s.thresholds[choice.index]), level, 0.005)
    minimum = next(n for n in range(100, 10**6, 10) if th.certifiable_drop(n, level) <= 0.005)
    return {
        "images": outcomes.n,
        "threshold": float(s.thresholds[choice.index]),
        "upper_drop": block["upper_drop"],
        "measured_drop": block["measured_drop"],
        "macs_reduction": float(1.0 - s.relative_macs[choice.index]),
        "images_for_half_point_guarantee_at_least": minimum,
        "images_for_half_point_guarantee_at_this_T_rates": block["images_to_certify_tolerance"],
    }


def plot(path: Path, results: dict[str, list[SplitResult]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True)
    for ax, (name, rows) in zip(np.atleast_1d(axes), results.items()):
        x = np.arange(len(rows))
        ax.bar(x, [r.eval_drop * 100 for r in rows], color=["tab:green" if r.held else "tab:red" for r in rows],
               label="drop on the unseen half")
        ax.plot(x, [r.promise * 100 for r in rows], "k_", markersize=10, label="promised drop")
        held = sum(r.held for r in rows)
        ax.set(title=f"{name}\nheld in {held}/{len(rows)} splits", xlabel="split", ylabel="accuracy drop vs big (points)")
        ax.axhline(0, color="grey", lw=0.6)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8001", help="server gRPC address (only to collect)")
    parser.add_argument("--data", required=True, help="labelled image set")
    parser.add_argument("--out", required=True, help="folder for splits.json, splits.png and the probability cache")
    parser.add_argument("--random-splits", type=int, default=38, help="random halvings on top of the two by class parity")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    collected, _ = collect_cached(args.url, lambda labels, clips: load_image_set(data, model_labels=labels, clips=clips), out / "calibration.npz")
    splits = split_indices(collected.labels, args.random_splits, args.seed)
    results: dict[str, list[SplitResult]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for c_index, (name, criterion) in enumerate(CRITERIA.items()):
            results[name] = [run_split(Path(tmp) / str(c_index), data, collected, *split, criterion) for split in splits]
            rows = results[name]
            held = sum(r.held for r in rows)
            print(f"{name}: its promise held on the unseen half in {held}/{len(rows)} splits ({held / len(rows):.0%}); "
                  f"mean MACs saving there {np.mean([r.eval_macs_reduction for r in rows]):.1%}; "
                  f"median T {np.median([r.threshold for r in rows]):.3f}, median bound {np.median([r.stated_bound for r in rows]):.2%}")
    full = full_set_figures(collected)
    print(f"default on all {full['images']} images: T = {full['threshold']:.4f}, drop <= {full['upper_drop']:.2%} at 95% "
          f"(measured {full['measured_drop']:+.2%}), {full['macs_reduction']:.1%} fewer MACs; a 0.5-point guarantee needs "
          f">= {full['images_for_half_point_guarantee_at_least']} images, about "
          f"{full['images_for_half_point_guarantee_at_this_T_rates']} at this T's rates")
    summary = {
        "data": str(data), "images": len(collected.labels), "splits": len(splits),
        "criteria": {
            name: {
                "held": int(sum(r.held for r in rows)),
                "mean_eval_macs_reduction": float(np.mean([r.eval_macs_reduction for r in rows])),
                "splits": [dataclasses.asdict(r) | {"held": r.held} for r in rows],
            }
            for name, rows in results.items()
        },
        "full_set_default": full,
    }
    (out / "splits.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(out / "splits.png", results)


if __name__ == "__main__":
    main()
