"""`littlebig pairs`: Which little model for a big one: serve them all, rank the cascades."""

from __future__ import annotations

from .options import command, positive_int


def _criterion(args):
    from littlebig.client.criterion import Criterion

    return Criterion(
        max_acc_drop=args.max_acc_drop,
        confidence_level=args.confidence_level,
        point_estimate=args.point_estimate,
        min_agreement=args.min_agreement,
    )


def run(args) -> None:
    from littlebig.serving.pairs import pairs

    pairs(args.big, args.candidates, args.data, args.out, _criterion(args), signal=args.signal, labels_csv=args.labels_csv,
          classes=args.classes, refresh=args.recollect, batch_size=args.batch_size, concurrency=args.concurrency)


def add(sub) -> None:
    from littlebig.client.criterion import DEFAULT_CONFIDENCE_LEVEL, DEFAULT_MAX_ACC_DROP
    from littlebig.gate.signals import SIGNALS

    p = command(sub, "pairs", help="which little model for this big one: serve big and every candidate, rank every "
                       "cascade ending at big by MACs saved, all on one accuracy-vs-MACs plot")
    p.add_argument("--big", required=True, help="big model .onnx (from littlebig export)")
    p.add_argument("--candidates", required=True, nargs="+", help="candidate little models .onnx (same classes and wire size)")
    p.add_argument("--data", required=True, help="labelled image folder (as for calibrate)")
    p.add_argument("--labels-csv", help="CSV of file,label for --data")
    p.add_argument("--classes", help="class list to map label names to indices (default: the models' own labels)")
    p.add_argument("--out", required=True, help="folder for pairs.json, pairs.png, the repository and cached probabilities")
    p.add_argument("--max-acc-drop", type=float, default=DEFAULT_MAX_ACC_DROP, help="tolerated accuracy drop against big")
    p.add_argument("--confidence-level", type=float, default=DEFAULT_CONFIDENCE_LEVEL, help="level of the certified bound")
    p.add_argument("--point-estimate", action="store_true", help="choose by the measured drop alone")
    p.add_argument("--min-agreement", type=float, help="label-free: cheapest thresholds agreeing with big on this share")
    p.add_argument("--signal", choices=SIGNALS, default="max_softmax", help="gating signal")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per request")
    p.add_argument("--concurrency", type=positive_int, default=4, help="requests in flight")
    p.add_argument("--recollect", action="store_true", help="serve and ask again even if cached probabilities exist")
    p.set_defaults(func=run)
