"""`littlebig repo`: Write a Triton model repository for a pair or a K-stage cascade."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from littlebig.contract import parse_threshold
from littlebig.errors import UsageError

from .options import command, probability


def _repository_options(args):
    from littlebig.model_repository.options import RepositoryOptions

    gears, threshold = _gears(args.gears), args.threshold
    if threshold is None:  # the ladder's top when gears are given (its drops are measured from it)
        threshold = gears[1] if gears else 0.5
    return RepositoryOptions(
        runtime=args.runtime,
        gpu=args.gpu,
        max_batch_size=args.max_batch_size,
        threshold=threshold,
        thresholds=getattr(args, "thresholds", None),
        signal=getattr(args, "signal", None),
        ensemble_weight=args.ensemble_weight,
        gate_instances=args.gate_instances,
        little_instances=args.little_instances,
        big_instances=args.big_instances,
        big_queue_delay_us=args.big_queue_delay_us,
        intra_op_threads=args.intra_op_threads,
        big_nice=args.big_nice,
        on_big_failure=args.on_big_failure,
        child_timeout_ms=args.child_timeout_ms,
        gears=gears[0] if gears else None,
        latency_target_ms=args.latency_target_ms,
        gear_interval_ms=args.gear_interval_ms,
        gear_deadline_ms=args.gear_deadline_ms,
        max_queue_size=args.max_queue_size,
        queue_timeout_ms=args.queue_timeout_ms,
        little_in_gate=args.little_in_gate,
        **{name: getattr(args, name) for name in AUDIT_OPTIONS if getattr(args, name, None) is not None},
    )


def _gears(report_path: str | None):
    """(the gate's gears parameter, the ladder's top T) from a calibration report, or None."""
    if report_path is None:
        return None
    from littlebig.client.gears import Ladder

    path = Path(report_path)
    path = path / "report.json" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"--gears: {path} does not exist (give the report.json of `littlebig calibrate`, or its folder)")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"--gears: {path} is not a calibration report (not JSON: {err})") from None
    if not isinstance(report, dict) or "gears" not in report:
        raise UsageError(f"--gears: {path} holds no gears (calibrate with labelled images writes them)")
    ladder = Ladder.from_dict(report["gears"])
    return ladder.config_value(), ladder.gears[0].threshold


def _onnx_facts(path: str, role: str):
    from google.protobuf.message import DecodeError

    from littlebig.model_repository.facts import ModelFacts

    try:
        return ModelFacts.from_onnx(path)
    except DecodeError:
        raise UsageError(f"--{role} {path} is not an ONNX file: pass the .onnx file `littlebig export` wrote") from None


def _warn_if_little_is_not_cheaper(little, big) -> None:
    if little.macs >= big.macs:
        print(
            f"warning: little ({little.path}, {little.macs / 1e9:.3f} GMACs) costs at least as much as big "
            f"({big.path}, {big.macs / 1e9:.3f} GMACs): the cascade cannot save anything. "
            "Were --little and --big swapped?",
            file=sys.stderr,
        )


def _stage_files(args) -> list[str]:
    """The models in cost order: --models, or --little and --big."""
    if args.models and (args.little or args.big):
        raise UsageError("give either --models (K stages) or --little and --big (two), not both")
    if args.models:
        if len(args.models) < 2:
            raise UsageError(f"--models needs at least two models in cost order, got {len(args.models)}")
        if args.little_plan or args.big_plan:
            raise UsageError("--little-plan/--big-plan go with --little/--big")
        return list(args.models)
    if not (args.little and args.big):
        raise UsageError("name the models: --little L.onnx --big B.onnx, or --models M0.onnx M1.onnx ... (cost order)")
    return [args.little, args.big]


def _parse_thresholds(text: str) -> tuple[float, ...]:
    try:  # each by the gate's own rule (the count is checked against the models later)
        return tuple(parse_threshold(part, "T1,T2,...") for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1] (T1,T2,...), got {text!r}") from None


def run(args) -> None:
    from littlebig.contract import stage_models
    from littlebig.model_repository.builder import build_cascade

    files = _stage_files(args)
    roles = ["models"] * len(files) if args.models else ["little", "big"]
    facts = [_onnx_facts(path, role) for path, role in zip(files, roles)]
    for cheaper, dearer in zip(facts, facts[1:]):
        _warn_if_little_is_not_cheaper(cheaper, dearer)
    options = _repository_options(args)
    out = build_cascade(files, args.out, options, plans=[args.little_plan, args.big_plan] if not args.models else None)
    where = "little inside the gate" if options.in_gate else "little as its first step"
    print(f"wrote model repository {out} ({', '.join(stage_models(len(files)))}, gate, and the ensemble littlebig with "
          f"{where}; runtime {args.runtime})")


AUDIT_OPTIONS = ("audit_rate", "audit_in_flight", "audit_timeout_ms", "audit_promise")


def add_audit_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    """The audit's options (docs/operating.md#the-audit)."""
    parser.add_argument("--audit-rate", type=probability, default=defaults.audit_rate,
                        help="share of the rows little answers that also go to big after their answer left, to bound "
                        "live how often little's answers differ from big's (e.g. 0.01; default 0: off)")
    parser.add_argument("--audit-in-flight", type=int, default=defaults.audit_in_flight,
                        help="audit calls in flight per gate instance; batches beyond it are not audited")
    parser.add_argument("--audit-timeout-ms", type=float, default=defaults.audit_timeout_ms,
                        help="an audit call waiting this long in big's queue is dropped (escalations wait up to "
                        "--child-timeout-ms)")
    parser.add_argument("--audit-promise", type=probability, default=defaults.audit_promise,
                        help="the drop against big the live bound is checked against (calibrate --apply sets it)")


def add_repository_arguments(parser: argparse.ArgumentParser) -> None:
    from littlebig.model_repository.options import RUNTIMES, RepositoryOptions

    parser.add_argument("--runtime", choices=RUNTIMES, default="python",
                        help="how little/big run: python (onnxruntime in the python backend; the bundled CPU "
                        "server), onnxruntime (native backend, NGC container), tensorrt (plans built on a GPU), "
                        "torch (the TorchScript export --torchscript wrote, PyTorch in the python backend)")
    parser.add_argument("--gpu", action="store_true",
                        help="--runtime torch: little's and big's instances on the GPUs (KIND_GPU); without, on the CPU")
    parser.add_argument("--max-batch-size", type=int, default=64, help="largest batch Triton forms for each model")
    parser.add_argument("--threshold", type=probability,
                        help="confidence threshold T in [0, 1]: little answers when its max softmax >= T "
                        "(default 0.5, or the top of --gears)")
    parser.add_argument("--ensemble-weight", type=float, default=1.0,
                        help="w of the Little-Big ensemble (paper Eq. 8); 1 answers escalated rows with big alone")
    defaults = RepositoryOptions()
    parser.add_argument("--gate-instances", type=int, default=defaults.gate_instances, help="instances of the gate model")
    parser.add_argument("--little-instances", type=int, default=defaults.little_instances, help="instances of little")
    parser.add_argument("--big-instances", type=int, default=defaults.big_instances, help="instances of big")
    parser.add_argument("--big-queue-delay-us", type=int, default=0,
                        help="how long big's dynamic batcher waits to merge escalated rows of several gate batches")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="onnxruntime threads per python-runtime instance; 0: one per core")
    parser.add_argument("--big-nice", type=int, default=defaults.big_nice,
                        help="CPU priority increment (0..19) of big's python-runtime process: on a CPU server, "
                        "requests little answers go first (0 to treat both alike)")
    parser.add_argument("--on-big-failure", choices=["fail", "little"], default=defaults.on_big_failure,
                        help="when big fails: fail the escalated requests (default) or answer with little, ROUTE=2")
    parser.add_argument("--child-timeout-ms", type=int, default=defaults.child_timeout_ms,
                        help="bound on each gate call to little or big (0: none)")
    parser.add_argument("--gears", metavar="REPORT", help="calibration report.json (or its folder): install its ladder "
                        "of thresholds, along which the gate lowers T under overload (with --latency-target-ms)")
    parser.add_argument("--latency-target-ms", type=float, default=defaults.latency_target_ms,
                        help="latency (the gate's p99 estimate) the gate keeps by moving along --gears; 0: T stays fixed")
    parser.add_argument("--gear-interval-ms", type=int, default=defaults.gear_interval_ms,
                        help="the gate changes gear at most this often")
    parser.add_argument("--gear-deadline-ms", type=float, default=defaults.gear_deadline_ms,
                        help="an adaptive row still waiting for big this long is answered by little at the highest "
                        "gear T its signal clears (default: 0.9 x --latency-target-ms; 0: rows wait for big)")
    parser.add_argument("--max-queue-size", type=int, default=defaults.max_queue_size,
                        help="requests waiting for the gate beyond this are refused at once with UNAVAILABLE (0: no bound)")
    parser.add_argument("--queue-timeout-ms", type=int, default=defaults.queue_timeout_ms,
                        help="a request that waited this long for the gate is refused with UNAVAILABLE (0: no bound)")
    parser.add_argument("--little-in-gate", action=argparse.BooleanOptionalAction, default=None,
                        help="run little with onnxruntime inside the gate's process, or (--no-little-in-gate) as the "
                        "ensemble's step before the gate (default: inside with --runtime python, where a step would add "
                        "a second Python hop per request; a step with the native runtimes)")
    add_audit_arguments(parser, defaults)


def add(sub) -> None:
    p = command(sub, "repo", help="write a Triton model repository for a little/big pair or a K-stage cascade")
    p.add_argument("--little", help="little model .onnx (from littlebig export)")
    p.add_argument("--big", help="big model .onnx (from littlebig export)")
    p.add_argument("--models", nargs="+", metavar="ONNX",
                   help="K >= 2 models in cost order (instead of --little/--big): served as little, stage1, ..., big")
    p.add_argument("--thresholds", type=_parse_thresholds,
                   help="T1,T2,...: K-1 thresholds; stage k answers a row when its signal >= T_k (two stages: same as --threshold)")
    p.add_argument("--signal", choices=["max_softmax", "margin", "entropy", "mean_abs_margin"],
                   help="gating signal (default: max_softmax; mean_abs_margin for multi-label models)")
    p.add_argument("--out", required=True, help="repository folder")
    p.add_argument("--little-plan", help="TensorRT plan for little (--runtime tensorrt)")
    p.add_argument("--big-plan", help="TensorRT plan for big (--runtime tensorrt)")
    add_repository_arguments(p)
    p.set_defaults(func=run)


def repository_writer(repository: str | None):
    """What `--repo DIR` gives calibrate and threshold: writing applied thresholds into DIR (None without it)."""
    if repository is None:
        return None
    from functools import partial

    from littlebig.model_repository.builder import write_thresholds

    return partial(write_thresholds, repository)
