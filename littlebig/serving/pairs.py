"""`littlebig pairs`: which little model for this big one (paper Table 2 and Figure 3).

Serves the big model and every candidate from one repository (classifiers only, no gate), collects
every model's probabilities on the data once, then calibrates every cascade that ends at big (each
candidate alone before big, and every chain of candidates in cost order) under the same criterion and
ranks them by MACs saved against big alone. Results: pairs.json and pairs.png (all on one
accuracy-vs-MACs plot).
"""

from __future__ import annotations

import re
from pathlib import Path

from littlebig.client import calibrate_stages as cs
from littlebig.client.collect import Collected, WireFormat, collect_stages
from littlebig.client.criterion import Criterion
from littlebig.client.datasets import load_image_set
from littlebig.client.report import write_json
from littlebig.contract import BIG_MODEL
from littlebig.errors import UserError
from littlebig.model_repository.builder import build_classifiers
from littlebig.model_repository.facts import ModelFacts, file_sha256
from littlebig.model_repository.options import RepositoryOptions

from .server import TritonServer


def served_names(candidates: list[Path]) -> list[str]:
    """A model name per candidate: its file stem made Triton-safe, numbered where two collide."""
    names = []
    for i, path in enumerate(candidates):
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem) or f"candidate{i}"
        if name == BIG_MODEL or name in names:
            name = f"{name}_{i}"
        names.append(name)
    return names


def rank(blocks: list[dict]) -> list[dict]:
    """Cascades that met the criterion first, then by MACs saved against big alone."""
    return sorted(blocks, key=lambda b: (not b["criterion_met"], -b["macs_reduction_vs_big"]))


def collect_served(big: Path, candidates: list[Path], images, work: Path, *, log=print, **kwargs) -> Collected:
    """Build the repository, serve it with tritonserver, and collect every model in cost order."""
    facts = [ModelFacts.from_onnx(p) for p in candidates]
    big_facts = ModelFacts.from_onnx(big)
    names = served_names(candidates)
    if any(f.macs >= big_facts.macs for f in facts):
        costly = [str(f.path) for f in facts if f.macs >= big_facts.macs]
        raise UserError(f"candidates cost at least as much as big ({big}): {', '.join(costly)}; they cannot save anything")
    order = sorted(range(len(facts)), key=lambda i: facts[i].macs)
    models = {names[i]: facts[i].path for i in order} | {BIG_MODEL: big_facts.path}
    repo = build_classifiers(models, work / "repository", RepositoryOptions(runtime="python", intra_op_threads=0))
    with TritonServer(repo, log_file=work / "tritonserver.log") as server:
        log(f"serving {', '.join(models)} from {repo}")
        return collect_stages(
            server.grpc_url, images, tuple(models), WireFormat(big_facts.wire_size, big_facts.crop_pct, big_facts.frames),
            macs=[facts[i].macs for i in order] + [big_facts.macs], model_labels=big_facts.labels, **kwargs,
        )


def pairs(
    big: str | Path, candidates: list[str | Path], data: str | Path, out: str | Path, criterion: Criterion = Criterion(),
    *, signal: str = "max_softmax", labels_csv=None, classes=None, refresh: bool = False, log=print, **kwargs,
) -> dict:
    big, candidates, out = Path(big), [Path(c) for c in candidates], Path(out)
    for path in [big, *candidates]:
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file {path} does not exist")
    if not Path(data).is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist")
    if not candidates:
        raise UserError("give at least one candidate little model")
    criterion.validate()
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "collected.npz"
    big_facts = ModelFacts.from_onnx(big)
    images = load_image_set(data, labels_csv=labels_csv, classes=classes, model_labels=big_facts.labels, clips=bool(big_facts.frames))
    if images.labels is None:
        raise UserError(f"{data} has no labels: ranking candidates needs labelled images")
    collected = None
    if cache.is_file() and not refresh:
        cached = Collected.load(cache)
        # the same files, by content: a candidate retrained in place is asked again
        wanted = dict(zip(served_names(candidates), map(file_sha256, candidates))) | {BIG_MODEL: file_sha256(big)}
        if cached.holds(images) and dict(zip(cached.models, cached.digests)) == wanted:
            log(f"using cached probabilities {cache} (--recollect to serve and ask again)")
            collected = cached
    if collected is None:
        collected = collect_served(big, candidates, images, out, log=log, **kwargs)
        collected.save(cache)
    report = ranking(collected, criterion, signal)
    write_json(out / "pairs.json", report)
    plot(out / "pairs.png", report, collected)
    log(describe(report))
    return report


def ranking(collected: Collected, criterion: Criterion, signal: str) -> dict:
    last = len(collected.stages) - 1
    blocks = rank(cs.chain_blocks(collected, criterion, signal, "multiclass", cs.chains(len(collected.stages), last=last)))
    singles = cs.single_points(collected)
    return {
        "big": cs.stage_names(collected)[-1],
        "images": len(collected.paths),
        "signal": signal,
        "criterion": blocks[0]["criterion"],
        "models": [{"name": n, "gmacs": g, "accuracy": a} for n, g, a in singles],
        "ranking": blocks,
    }


def describe(report: dict) -> str:
    lines = [f"{'rank':>4}  {'cascade':<48} {'saved':>7} {'accuracy':>9}  thresholds"]
    for i, block in enumerate(report["ranking"], 1):
        ts = ", ".join(f"{t:.4f}" for t in block["thresholds"])
        met = "" if block["criterion_met"] else "  (criterion NOT met)"
        lines.append(f"{i:>4}  {' -> '.join(block['stages']):<48} {block['macs_reduction_vs_big']:7.1%} "
                     f"{block['metric']:9.4f}  {ts}{met}")
    models = ", ".join(f"{m['name']} {m['accuracy']:.4f} @ {m['gmacs']:.3f} GMACs" for m in report["models"])
    lines.append(f"alone: {models}; criterion {report['criterion']}, signal {report['signal']}")
    return "\n".join(lines)


def plot(path: Path, report: dict, collected: Collected) -> None:
    from littlebig.client.report import _pyplot, plot_frontiers

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 6))
    singles = [(m["name"], m["gmacs"], m["accuracy"]) for m in report["models"]]
    plot_frontiers(ax, report["ranking"], singles, "accuracy")
    ax.set_title(f"Which little model for {report['big']}? ({report['images']} images; stars: {report['criterion']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
