"""Gears: a ladder of thresholds from the chosen T down, each with the accuracy it gives up (pure numpy).

Under overload the gate lowers T along the ladder (fewer rows go to big, so more images per second),
and raises it again one gear at a time when the load passes (model_repository/gate/gears.py, class
Gears; docs/gears.md).
What each step costs was measured at calibration: the drop of a gear is the chosen T's accuracy minus
the gear's, on the calibration images. Going down from the chosen T, the first threshold whose drop
exceeds the budget ends the ladder (a fixed-sequence scan, so a lucky low T below a bad one is never
taken); the gears are spread evenly in escalation share between the chosen T and that floor.

Each gear also states an exact upper bound on its drop at the calibration's confidence level: the
rows little keeps in the gear but not at the chosen T are the only ones whose answer changes, so the
drop is P(lost there) - P(gained there), bounded like the chosen T's drop against big
(thresholds.drop_upper_bound). With ``certified`` the bound, not the measured drop, must stay within
the budget (a few hundred images rarely certify less than a point, so the ladder is then short).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from littlebig.errors import UserError

from . import thresholds as th

DEFAULT_ACCURACY_BUDGET = 0.01  # one point of accuracy below the chosen T's
DEFAULT_GEARS = 4  # the chosen T and up to three lower thresholds


@dataclasses.dataclass(frozen=True)
class Gear:
    threshold: float
    escalation: float  # share of calibration images sent to big at this T
    gmacs: float  # expected GMACs per image (paper Eq. 5)
    accuracy: float
    drop: float  # the chosen T's accuracy minus this gear's, measured on the calibration images
    upper_drop: float  # exact upper bound on the true drop at the calibration's confidence level

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Ladder:
    gears: tuple[Gear, ...]  # gear 0 is the chosen T; thresholds strictly decreasing
    budget: float
    level: float
    certified: bool

    def as_dict(self) -> dict:
        return {"budget": self.budget, "level": self.level, "certified": self.certified,
                "gears": [g.as_dict() for g in self.gears]}

    @classmethod
    def from_dict(cls, block: dict) -> "Ladder":
        return cls(tuple(Gear(**g) for g in block["gears"]), block["budget"], block["level"], block["certified"])

    def config_value(self) -> str:
        """The gate's `gears` config parameter: [[T, expected drop], ...] from the chosen T down."""
        return gears_parameter([(g.threshold, g.drop) for g in self.gears])


def gears_parameter(pairs) -> str:
    return json.dumps([[float(t), float(d)] for t, d in pairs])


def _band_bound(s: th.Sweep, top: int, n: int, level: float) -> np.ndarray:
    """Upper bound on the drop from the sweep's threshold ``top`` to each lower threshold."""
    lost = np.maximum(s.lost - s.lost[top], 0)
    gained = np.maximum(s.gained - s.gained[top], 0)
    upper = th.drop_upper_bound(lost, gained, n, level)
    return np.where(s.escalation >= s.escalation[top], 0.0, np.maximum(upper, 0.0))


def ladder(
    outcomes: th.Outcomes, top: float, budget: float = DEFAULT_ACCURACY_BUDGET, level: float = 0.95,
    count: int = DEFAULT_GEARS, certified: bool = False,
) -> Ladder:
    """Gears from ``top`` (the chosen T) down to the lowest T within ``budget`` of its accuracy."""
    if not outcomes.has_labels:
        raise UserError("gears need labelled calibration images: their drops are measured against the labels")
    if not 0.0 <= budget <= 1.0:
        raise UserError(f"accuracy budget must be in [0, 1], got {budget}")
    if count < 1:
        raise UserError(f"a ladder needs at least one gear, got {count}")
    candidates = th.candidate_thresholds(outcomes.confidence)
    s = th.sweep(outcomes, np.unique(np.concatenate([candidates[candidates < top], [top]])))
    top_index = len(s.thresholds) - 1
    drop = s.accuracy[top_index] - s.accuracy
    upper = _band_bound(s, top_index, outcomes.n, level)
    limit = upper if certified else drop
    floor = top_index
    for index in range(top_index - 1, -1, -1):
        if limit[index] > budget + 1e-12:
            break
        floor = index
    chosen = [top_index]
    if floor < top_index and count > 1:
        floor = th.middle_of_class(s, floor)
        targets = np.linspace(s.escalation[top_index], s.escalation[floor], count)[1:]
        for target in targets:
            # The highest threshold at or below the target share, settled in the middle of its class.
            index = th.middle_of_class(s, int(np.flatnonzero(s.escalation <= target + 1e-12)[-1]))
            if s.escalation[index] < s.escalation[chosen[-1]] and index >= floor:
                chosen.append(index)
    gears = tuple(
        Gear(float(s.thresholds[i]), float(s.escalation[i]), float(s.gmacs[i]), float(s.accuracy[i]),
             float(drop[i]), float(upper[i]))
        for i in chosen
    )
    return Ladder(gears, budget, level, certified)


def describe(ladder_: Ladder) -> str:
    rule = "bound" if ladder_.certified else "measured drop"
    lines = [f"gears (accuracy budget {ladder_.budget:.1%} below the chosen T, limited by the {rule}):"]
    for k, g in enumerate(ladder_.gears):
        lines.append(
            f"  gear {k}: T={g.threshold:.4f}  p={g.escalation:.3f}  {g.gmacs:.3f} GMACs  accuracy {g.accuracy:.4f}  "
            f"drop {g.drop * 100:+.2f} pt (<= {g.upper_drop * 100:.2f} pt at {ladder_.level:.0%})"
        )
    return "\n".join(lines)
