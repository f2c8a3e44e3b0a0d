"""Threshold analysis for a segmentation pair (paper Appendix A.1.3): pure numpy, no server.

Whole images are routed: little keeps an image when its image-level confidence >= T, else big answers
it (Eq. 4); the cost per image is MACs_little + p(T) MACs_big (Eq. 5). mIoU and pixel accuracy are
ratios of sums over images (per class: intersection / union), so the cascade at every T comes from
prefix sums over the images sorted by confidence, as the classifier sweep (thresholds.py).

mIoU is not a binomial rate, so its uncertainty is a paired bootstrap over images (each replicate
draws the N images with replacement and recomputes little, big and the cascade on the same draw). The
default choice is the cheapest T whose bootstrap upper bound on the drop against big, at the stated
level, is within the tolerance for mIoU and for pixel accuracy, tested from T = 1 downwards in a fixed
sequence (stopping at the first T that fails); a percentile bootstrap bound is approximate, not exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from littlebig.errors import UserError

from .segmentation import PixelCounts, mean_iou
from .thresholds import (
    Choice,
    candidate_thresholds,
    escalation_quantile,
    middle_of_class,
)

STATS = ("inter", "union", "correct")  # summed over the images each model answers


@dataclasses.dataclass(frozen=True)
class SegOutcomes:
    """Per-image facts the sweep needs: little's confidence, both models' counts, their agreement."""

    confidence: np.ndarray  # the image-level confidence gated on, float64 [N]
    little: PixelCounts | None
    big: PixelCounts | None
    agree: np.ndarray  # pixels where little's mask equals big's [N]
    pixels: np.ndarray  # pixels per image [N]
    macs_little: int
    macs_big: int

    @property
    def n(self) -> int:
        return len(self.confidence)

    @property
    def has_labels(self) -> bool:
        return self.little is not None

    def stat(self, model: str, name: str) -> np.ndarray:
        """float64 [N, C] (inter, union) or [N, 1] (correct) of ``model`` (little, big)."""
        values = getattr(getattr(self, model), name).astype(np.float64)
        return values if values.ndim == 2 else values[:, None]

    def metrics(self, weights: np.ndarray | None = None) -> dict:
        """mIoU and pixel accuracy of little and big alone (on a resample when ``weights`` [N] are given)."""
        w = np.ones(self.n) if weights is None else weights
        labelled = w @ self.little.labelled
        return {model: {"miou": float(mean_iou(w @ self.stat(model, "inter"), w @ self.stat(model, "union"))),
                        "pixel_accuracy": float(w @ self.stat(model, "correct")[:, 0] / labelled)}
                for model in ("little", "big")}


@dataclasses.dataclass
class SegSweep:
    """The cascade at each threshold, all arrays aligned with ``thresholds``."""

    thresholds: np.ndarray
    escalation: np.ndarray  # p(T)
    miou: np.ndarray | None
    pixel_accuracy: np.ndarray | None
    agreement: np.ndarray  # share of pixels whose answer equals big's
    gmacs: np.ndarray
    relative_macs: np.ndarray

    def at(self, index: int) -> dict:
        def value(array):
            return None if array is None else float(array[index])

        return {"threshold": float(self.thresholds[index]), "escalation": float(self.escalation[index]),
                "miou": value(self.miou), "pixel_accuracy": value(self.pixel_accuracy),
                "agreement": float(self.agreement[index]), "gmacs": float(self.gmacs[index]),
                "relative_macs": float(self.relative_macs[index])}


def _escalated_counts(outcomes: SegOutcomes, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows in confidence order, k: how many of them T escalates) for each T."""
    order = np.argsort(outcomes.confidence, kind="stable")
    return order, np.searchsorted(outcomes.confidence[order], thresholds, side="left")


def _cascade_sums(outcomes: SegOutcomes, order: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """For each k (0..N escalated first in ``order``): the cascade's weighted sums of each statistic,
    [B, N + 1, C]; ``weights`` [B, N] are bootstrap draws (ones: the data as it is)."""
    w = weights[:, order]
    out = {}
    for name in STATS:
        little, big = outcomes.stat("little", name)[order], outcomes.stat("big", name)[order]
        # escalated: the first k rows answered by big, the rest by little
        big_prefix = np.concatenate([np.zeros((len(w), 1, big.shape[1])), np.cumsum(w[:, :, None] * big[None], axis=1)], axis=1)
        little_prefix = np.concatenate([np.zeros((len(w), 1, little.shape[1])), np.cumsum(w[:, :, None] * little[None], axis=1)], axis=1)
        out[name] = big_prefix + (little_prefix[:, -1:, :] - little_prefix)
    return out


def _metrics_by_k(outcomes: SegOutcomes, order: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mIoU and pixel accuracy [B, N + 1] of the cascade escalating the first k rows of ``order``."""
    sums = _cascade_sums(outcomes, order, weights)
    labelled = weights @ outcomes.little.labelled.astype(np.float64)
    return mean_iou(sums["inter"], sums["union"]), sums["correct"][:, :, 0] / labelled[:, None]


def sweep(outcomes: SegOutcomes, thresholds: np.ndarray | None = None) -> SegSweep:
    thresholds = candidate_thresholds(outcomes.confidence) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    order, k = _escalated_counts(outcomes, thresholds)
    miou = pixel_accuracy = None
    if outcomes.has_labels:
        by_k = _metrics_by_k(outcomes, order, np.ones((1, outcomes.n)))
        miou, pixel_accuracy = by_k[0][0, k], by_k[1][0, k]
    differ = np.concatenate([[0], np.cumsum((outcomes.pixels - outcomes.agree)[order])])  # kept rows' disagreeing pixels
    agreement = 1.0 - (differ[-1] - differ[k]) / outcomes.pixels.sum()
    escalation = k / outcomes.n
    gmacs = (outcomes.macs_little + escalation * outcomes.macs_big) / 1e9
    return SegSweep(thresholds, escalation, miou, pixel_accuracy, agreement, gmacs, gmacs * 1e9 / outcomes.macs_big)


def bootstrap_drops(outcomes: SegOutcomes, thresholds: np.ndarray, level: float, replicates: int = 1000, seed: int = 0,
                    block: int = 100) -> dict[str, np.ndarray]:
    """Paired percentile bootstrap at each threshold: [low, high] of the cascade's mIoU and pixel accuracy
    and of their drops against big on the same draw, and each drop's one-sided upper bound at ``level``."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    order, k = _escalated_counts(outcomes, thresholds)
    rng = np.random.default_rng(seed)
    draws = {name: [] for name in ("miou", "pixel_accuracy", "miou_drop", "pixel_accuracy_drop")}
    for start in range(0, replicates, block):
        weights = rng.multinomial(outcomes.n, np.full(outcomes.n, 1.0 / outcomes.n), size=min(block, replicates - start))
        weights = weights.astype(np.float64)
        miou, pixel = _metrics_by_k(outcomes, order, weights)
        draws["miou"].append(miou[:, k])
        draws["pixel_accuracy"].append(pixel[:, k])
        draws["miou_drop"].append(miou[:, -1:] - miou[:, k])  # k = N: every image to big
        draws["pixel_accuracy_drop"].append(pixel[:, -1:] - pixel[:, k])
    tail = (1.0 - level) / 2.0
    out = {}
    for name, parts in draws.items():
        values = np.concatenate(parts)
        out[name] = np.quantile(values, [tail, 1.0 - tail], axis=0)
        if name.endswith("_drop"):
            out[name + "_upper"] = np.quantile(values, level, axis=0)
    return out


def choose_with_bootstrap(s: SegSweep, outcomes: SegOutcomes, max_drop: float, level: float, replicates: int = 1000) -> Choice:
    """The cheapest T whose bootstrap upper bounds on the mIoU and pixel-accuracy drops are within
    ``max_drop``, in a fixed sequence from T = 1 down (stops at the first T that fails)."""
    if not outcomes.has_labels:
        raise UserError("choosing T on mIoU needs label masks")
    if not 0.0 < level < 1.0:
        raise UserError(f"confidence level must be in (0, 1), got {level}")
    drops = bootstrap_drops(outcomes, s.thresholds, level, replicates)
    ok = (drops["miou_drop_upper"] <= max_drop + 1e-12) & (drops["pixel_accuracy_drop_upper"] <= max_drop + 1e-12)
    chosen = None
    for index in range(len(s.thresholds) - 1, -1, -1):
        if s.escalation[index] >= 1.0 or ok[index]:
            chosen = index
        else:
            break
    bound = {"method": "paired percentile bootstrap over images (approximate) of the mIoU and pixel-accuracy drops "
                       "against big; fixed-sequence test from T=1 down", "level": level, "replicates": replicates}
    criterion = f"max_miou_drop={max_drop}@{level}"
    if chosen is None:
        return Choice(len(s.thresholds) - 1, criterion, False, bound)
    chosen = middle_of_class(s, chosen)
    bound |= {"miou_drop_upper": float(drops["miou_drop_upper"][chosen]),
              "pixel_accuracy_drop_upper": float(drops["pixel_accuracy_drop_upper"][chosen])}
    return Choice(chosen, criterion, bool(s.escalation[chosen] < 1.0 and s.relative_macs[chosen] < 1.0), bound)


def choose_point_estimate(s: SegSweep, outcomes: SegOutcomes, max_drop: float) -> Choice:
    """The cheapest T whose measured mIoU and pixel accuracy are within ``max_drop`` of big's."""
    if s.miou is None:
        raise UserError("choosing T on mIoU needs label masks")
    big = outcomes.metrics()["big"]
    ok = np.flatnonzero((s.miou >= big["miou"] - max_drop - 1e-12) & (s.pixel_accuracy >= big["pixel_accuracy"] - max_drop - 1e-12))
    criterion = f"max_miou_drop={max_drop} (point estimate)"
    if len(ok):
        index = middle_of_class(s, int(ok[0]))
        return Choice(index, criterion, bool(s.escalation[index] < 1.0 and s.relative_macs[index] < 1.0))
    return Choice(len(s.thresholds) - 1, criterion, False)


def choose_label_free(s: SegSweep, confidence: np.ndarray, target_escalation: float | None, min_agreement: float | None) -> Choice:
    """T = the quantile of little's confidence that sends ``target_escalation`` to big, or the cheapest T
    whose masks agree with big's on >= ``min_agreement`` of the pixels."""
    if target_escalation is not None:
        target = escalation_quantile(confidence, target_escalation)
        index = min(int(np.searchsorted(s.thresholds, target, side="left")), len(s.thresholds) - 1)
        return Choice(middle_of_class(s, index), f"target_escalation={target_escalation}", True)
    ok = np.flatnonzero(s.agreement >= min_agreement - 1e-12)
    if len(ok):
        return Choice(middle_of_class(s, int(ok[0])), f"min_pixel_agreement={min_agreement}", True)
    return Choice(len(s.thresholds) - 1, f"min_pixel_agreement={min_agreement}", False)


def summary(s: SegSweep, outcomes: SegOutcomes, index: int) -> dict:
    """The report block for one threshold."""
    point = s.at(index)
    alone = outcomes.metrics() if outcomes.has_labels else None
    block = {
        "threshold": point["threshold"], "escalation": point["escalation"], "images": outcomes.n,
        "gmacs": {"little": outcomes.macs_little / 1e9, "big": outcomes.macs_big / 1e9, "cascade": point["gmacs"]},
        "macs_reduction": 1.0 - point["relative_macs"], "pixel_agreement_with_big": point["agreement"],
    }
    for metric in ("miou", "pixel_accuracy"):
        block[metric] = {"little": alone and alone["little"][metric], "big": alone and alone["big"][metric], "cascade": point[metric]}
    return block


def evaluate_at(outcomes: SegOutcomes, threshold: float) -> dict:
    """The report block for a fixed T on another set."""
    return summary(sweep(outcomes, np.array([threshold])), outcomes, 0)


def uncertainty(outcomes: SegOutcomes, threshold: float, level: float, replicates: int = 1000) -> dict:
    """Bootstrap intervals at ``threshold``: the cascade's mIoU and pixel accuracy, their drops against big
    (with the one-sided upper bounds), the escalation share and the MACs saving."""
    block = {"images": outcomes.n, "level": level, "replicates": replicates, "method": "paired percentile bootstrap over images"}
    escalated = (outcomes.confidence < threshold).astype(np.float64)
    rng = np.random.default_rng(1)
    weights = rng.multinomial(outcomes.n, np.full(outcomes.n, 1.0 / outcomes.n), size=replicates) / outcomes.n
    tail = (1.0 - level) / 2.0
    share = np.quantile(weights @ escalated, [tail, 1.0 - tail])
    block["escalation"] = [float(v) for v in share]
    block["macs_reduction"] = [float(1.0 - (outcomes.macs_little + p * outcomes.macs_big) / outcomes.macs_big) for p in share[::-1]]
    if outcomes.has_labels:
        drops = bootstrap_drops(outcomes, np.array([threshold]), level, replicates)
        for name in ("miou", "pixel_accuracy", "miou_drop", "pixel_accuracy_drop"):
            block[name] = [float(drops[name][0, 0]), float(drops[name][1, 0])]
        block["miou_drop_upper"] = float(drops["miou_drop_upper"][0])
        block["pixel_accuracy_drop_upper"] = float(drops["pixel_accuracy_drop_upper"][0])
    return block
