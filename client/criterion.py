"""How calibration chooses T, and its defaults (kept free of heavy imports: the CLI reads them).

The default choice is certified: the cheapest T whose exact upper bound on the accuracy drop against
big, at DEFAULT_CONFIDENCE_LEVEL, is within DEFAULT_MAX_ACC_DROP (Learn-then-Test, see
thresholds.choose_with_bound). Measured on 40 splits of 500 ImageNet photos into 250 + 250
(bench/calibration_splits.py, bench/results/calibration/splits.json): the stated bound held on the
unseen half in at least 95% of splits and the mean MACs saving stayed above 20%. A 2-point tolerance
is the smallest round one that a few hundred images can certify at 95% (250 images cannot certify
less than about 1.5 points, whatever the models).
"""

from __future__ import annotations

import dataclasses

from littlebig.errors import UserError

DEFAULT_MAX_ACC_DROP = 0.02
DEFAULT_CONFIDENCE_LEVEL = 0.95


@dataclasses.dataclass
class Criterion:
    """How T is chosen.

    Default: certified, the cheapest T whose upper bound on the drop at ``confidence_level`` is within
    ``max_acc_drop``. ``point_estimate``: the cheapest T whose measured drop is within it (the paper's
    rule; on a few hundred images mostly noise, so the report warns). ``target_escalation`` and
    ``min_agreement`` are label-free alternatives. The level is also the one every report states.
    """

    max_acc_drop: float = DEFAULT_MAX_ACC_DROP
    confidence_level: float = DEFAULT_CONFIDENCE_LEVEL
    point_estimate: bool = False
    target_escalation: float | None = None
    min_agreement: float | None = None

    def validate(self) -> None:
        if self.target_escalation is not None and self.min_agreement is not None:
            raise UserError("choose one of --target-escalation and --min-agreement")
        if not 0.0 <= self.max_acc_drop <= 1.0:
            raise UserError(f"--max-acc-drop must be in [0, 1], got {self.max_acc_drop}")
        if not 0.0 < self.confidence_level < 1.0:
            raise UserError(f"--confidence-level must be in (0, 1), got {self.confidence_level}")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise UserError(f"--min-agreement must be in [0, 1], got {self.min_agreement}")

    @property
    def label_free(self) -> bool:
        return self.target_escalation is not None or self.min_agreement is not None

    def disagreement_tolerance(self, has_labels: bool) -> float | None:
        """Certified without labels (client/labelfree.py): the tolerance on the share of answers that differ
        from big's, which bounds the drop against big. ``--min-agreement A`` certifies 1 - A (with
        --point-estimate: the measured share, as before); unlabelled data under the default criterion
        certifies --max-acc-drop. None: not certified on disagreement."""
        if self.target_escalation is not None or (self.min_agreement is not None and self.point_estimate):
            return None
        if self.min_agreement is not None:
            return 1.0 - self.min_agreement
        return None if has_labels else self.max_acc_drop

    @property
    def promise(self) -> float | None:
        """The drop against big this criterion promises (the gate's audit_promise), if it promises one."""
        if self.target_escalation is not None:
            return None
        return 1.0 - self.min_agreement if self.min_agreement is not None else self.max_acc_drop
