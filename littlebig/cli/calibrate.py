"""`littlebig calibrate`: Choose T on an image set through the running server."""

from __future__ import annotations

import argparse

from littlebig.errors import UsageError

from .options import command, positive_int, server_address
from .repo import repository_writer


def run(args) -> None:
    from littlebig.client.calibrate import Criterion, calibrate

    if args.repo and not args.apply:
        raise UsageError(f"T is written into the repository {args.repo} only when it is applied: add --apply")
    criterion = Criterion(
        max_acc_drop=args.max_acc_drop,
        confidence_level=args.confidence_level,
        point_estimate=args.point_estimate,
        target_escalation=args.target_escalation,
        min_agreement=args.min_agreement,
    )
    if args.from_audit is not None:
        return _from_audit(args, criterion)
    if args.data is None:
        raise UsageError("give --data DIR (images to calibrate on), or --from-audit (the live audit)")
    calibrate(
        args.url,
        args.data,
        args.out,
        criterion,
        labels_csv=args.labels_csv,
        classes=args.classes,
        eval_data=args.eval_data,
        eval_labels_csv=args.eval_labels_csv,
        apply=args.apply,
        accuracy_budget=args.accuracy_budget,
        write=repository_writer(args.repo),
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        refresh=args.recollect,
        signal=args.signal,
        models=tuple(args.models) if args.models else None,
        ensemble_weights=tuple(args.ensemble_weights) if args.ensemble_weights else None,
        unlabelled=args.unlabelled,
        unlabelled_data=args.unlabelled_data,
    )


def _from_audit(args, criterion) -> None:
    """T chosen on the audit recorded from live traffic (client/recalibrate.py)."""
    from littlebig.client.recalibrate import calibrate_from_audit

    from .audit import metrics_address

    if args.data is not None or args.unlabelled_data is not None:
        raise UsageError("--from-audit chooses T on the live audit alone: leave out --data and --unlabelled-data")
    calibrate_from_audit(args.url, args.out, criterion, source=None if args.from_audit == LIVE else args.from_audit,
                         metrics_url=metrics_address(args.url, args.metrics_url), apply=args.apply,
                         write=repository_writer(args.repo))


LIVE = "live"


def weight(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"an ensemble weight must be in (0, 1], got {text}")
    return value


def add_stage_arguments(parser) -> None:
    """Calibration options of K-stage cascades, gating signals and the ensemble (issue 11)."""
    from littlebig.gate.signals import SIGNALS

    parser.add_argument("--signal", choices=SIGNALS, help="gating signal to calibrate (default: max_softmax; another "
                        "signal or more stages choose the thresholds jointly)")
    parser.add_argument("--models", nargs="+", help="served stage models in cost order (default: the gate's stages)")
    parser.add_argument("--ensemble-weights", nargs="+", type=weight, metavar="W",
                        help="also sweep the ensemble weight w over these (paper Figure 5), e.g. 0.5 0.6 0.7 0.8 0.9 1.0")


def add(sub) -> None:
    from littlebig.client.criterion import DEFAULT_CONFIDENCE_LEVEL, DEFAULT_MAX_ACC_DROP

    p = command(sub, "calibrate", help="choose T on a labelled image set through the running server")
    p.add_argument("--url", type=server_address, default="127.0.0.1:8001", help="server gRPC address")
    p.add_argument("--data", help="image folder (ImageFolder, wnid files + classes.tsv, or with --labels-csv; unlabelled: "
                   "T is certified on disagreement with big, docs/calibration.md#without-labels)")
    p.add_argument("--unlabelled", action="store_true", help="do not use the labels of --data (certify on disagreement "
                   "with big: a bound on the drop against big, not against the truth)")
    p.add_argument("--unlabelled-data", metavar="DIR", help="more images whose labels are not used: their disagreement "
                   "with big joins the evidence (the error level is split between the sources)")
    p.add_argument("--from-audit", nargs="?", const=LIVE, metavar="FILE",
                   help="choose T on the audit of live traffic: the served gate's (no value), or a snapshot FILE from "
                   "`littlebig audit --save`")
    p.add_argument("--metrics-url", help="with --from-audit: server metrics URL (default http://HOST:8002/metrics)")
    p.add_argument("--labels-csv", help="CSV of file,label for --data")
    p.add_argument("--classes", help="class list (one name per line, or a classes.tsv) to map label names to indices "
                   "(default: the served model's own labels)")
    p.add_argument("--out", required=True, help="folder for report.json, table.txt, PNGs and cached probabilities")
    p.add_argument("--max-acc-drop", type=float, default=DEFAULT_MAX_ACC_DROP,
                   help="tolerated accuracy drop against big (0.02 = 2 points): the cheapest T whose "
                   "upper bound on the drop at --confidence-level is within it")
    p.add_argument("--confidence-level", type=float, default=DEFAULT_CONFIDENCE_LEVEL,
                   help="level of the bound the choice is certified at and every report states")
    p.add_argument("--point-estimate", action="store_true",
                   help="choose by the measured drop alone (the paper's rule; noisy on a few hundred images: the report "
                   "warns when its bound is far above the tolerance)")
    p.add_argument("--target-escalation", type=float, help="label-free: T = this quantile of little's confidence")
    p.add_argument("--min-agreement", type=float, help="label-free: cheapest T agreeing with big on this share")
    p.add_argument("--eval-data", help="second labelled set to check the chosen T on")
    p.add_argument("--eval-labels-csv", help="CSV of file,label for --eval-data")
    p.add_argument("--accuracy-budget", type=float,
                   help="gears: the ladder goes down from the chosen T to the lowest T within this accuracy drop of "
                   "it (default 0.01 = 1 point, measured on the calibration images; two-stage max_softmax only)")
    p.add_argument("--apply", action="store_true", help="switch the running server to the chosen T and its gears, and "
                   "write them to the repository")
    p.add_argument("--repo", help="with --apply, also write T into this repository folder (so a restart keeps it)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per request")
    p.add_argument("--concurrency", type=positive_int, default=4, help="requests in flight")
    p.add_argument("--recollect", action="store_true", help="ask the server again even if cached probabilities exist")
    add_stage_arguments(p)
    p.set_defaults(func=run)
