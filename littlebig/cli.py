"""The `littlebig` command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


def _parity_images(data: str | None, wire_size: int, crop_pct: float):
    from littlebig.client.images import list_images, sample_photos, to_wire_batch

    if data:
        paths = list_images(data)[:32]
        if not paths:
            raise SystemExit(f"no images found under {data}")
        return to_wire_batch(paths, wire_size, crop_pct)
    return to_wire_batch(list(sample_photos().values()), wire_size, crop_pct)


def cmd_export(args) -> None:
    from littlebig.export import export_onnx, load_model

    loaded = load_model(
        args.spec,
        weights=args.weights,
        random_init=args.random_init,
        num_classes=args.num_classes,
        resolution=args.resolution,
    )
    wire_size = args.wire_size or loaded.info.resolution
    images = _parity_images(args.parity_data, wire_size, loaded.info.crop_pct)
    result = export_onnx(loaded, args.out, wire_size=wire_size, parity_images=images)
    print(f"wrote {result.path} (wire size {wire_size}, {result.info.num_classes} classes, {result.macs / 1e9:.3f} GMACs)")


def _repository_options(args):
    from littlebig.model_repository.builder import RepositoryOptions

    return RepositoryOptions(
        runtime=args.runtime,
        max_batch_size=args.max_batch_size,
        threshold=args.threshold,
        ensemble_weight=args.ensemble_weight,
        gate_instances=args.gate_instances,
        little_instances=args.little_instances,
        big_instances=args.big_instances,
        big_queue_delay_us=args.big_queue_delay_us,
        intra_op_threads=args.intra_op_threads,
        big_nice=args.big_nice,
        on_big_failure=args.on_big_failure,
        child_timeout_ms=args.child_timeout_ms,
    )


def cmd_repo(args) -> None:
    from littlebig.model_repository.builder import build_repository

    out = build_repository(
        args.little, args.big, args.out, _repository_options(args), little_plan=args.little_plan, big_plan=args.big_plan
    )
    print(f"wrote model repository {out} (little, big, littlebig; runtime {args.runtime})")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _wait_forever(server, supervisor=None) -> None:
    # SIGTERM ends the wait like Ctrl-C does, so the server is always stopped in order (drained).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while supervisor is not None or server.process.poll() is None:
            time.sleep(0.5)  # with a supervisor, a dead server is restarted, not the end
        print(f"tritonserver exited with code {server.process.returncode}; log {server.log_file}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        if supervisor is not None:
            supervisor.stop()
        print("draining and stopping tritonserver ...", flush=True)


def cmd_serve(args) -> None:
    from littlebig.client import admin
    from littlebig.server import TritonServer

    server = TritonServer(
        args.repo,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_file=args.log_file,
        admin_key=args.admin_key or os.environ.get(admin.KEY_ENV) or None,
        allow_remote=args.allow_remote,
    )
    print(f"starting tritonserver on {args.repo} (log {server.log_file}) ...", flush=True)
    with server:
        print(f"ready\n  HTTP    {server.http_url}\n  gRPC    {server.grpc_url}\n  metrics {server.metrics_url}")
        print(f"  admin   repository/shared-memory APIs locked; key in {admin.keys_file()} (or ${admin.KEY_ENV})")
        supervisor = None
        if not args.no_supervise:
            from littlebig.supervisor import Supervisor, SupervisorOptions

            metrics_file = server.log_file.with_name("supervisor.prom")
            supervisor = Supervisor(server, SupervisorOptions(interval_s=args.canary_interval, metrics_file=metrics_file))
            supervisor.start()
            print(f"  supervisor canary every {args.canary_interval:g}s; recoveries counted in {metrics_file}")
        print("Ctrl-C to stop", flush=True)
        _wait_forever(server, supervisor)


def print_predictions(names, predictions, labels) -> None:
    width = max([len(str(n)) for n in names] + [5])
    print(f"{'image':<{width}}  {'class':>5}  {'name':<32}  {'conf':>6}  route")
    for name, p in zip(names, predictions):
        print(f"{str(name):<{width}}  {p.class_index:>5}  {labels[p.class_index][:32]:<32}  {p.confidence:6.3f}  {p.route_name}")


def cmd_classify(args) -> None:
    from littlebig.client.infer import LittleBigClient
    from littlebig.client.labels import load_labels

    with LittleBigClient(args.url, "http" if args.http else "grpc") as client:
        info = client.gate_info()
        predictions = client.classify(args.images, threshold=args.threshold, batch_size=args.batch_size, info=info)
        print_predictions(args.images, predictions, load_labels(args.labels, info.num_classes))


def cmd_demo(args) -> None:
    from littlebig.client.images import list_images, sample_photos
    from littlebig.client.infer import LittleBigClient
    from littlebig.client.labels import load_labels
    from littlebig.export import export_onnx, load_model
    from littlebig.model_repository.builder import RepositoryOptions, build_repository
    from littlebig.server import TritonServer

    work = Path(args.workdir)
    wire = args.wire_size
    onnx_files = {}
    for role, spec in (("little", "efficientnet-lite:0"), ("big", "efficientnet-lite:2")):
        path = work / f"{role}.onnx"
        onnx_files[role] = path
        if path.exists() and not args.force:
            print(f"[demo] {role}: reusing {path} (--force to export again)")
            continue
        print(f"[demo] exporting {role} = {spec} -> {path}")
        loaded = load_model(spec)
        export_onnx(loaded, path, wire_size=wire, parity_images=_parity_images(None, wire, loaded.info.crop_pct))
    repo = build_repository(
        onnx_files["little"], onnx_files["big"], work / "repository", RepositoryOptions(runtime="python", threshold=args.threshold)
    )
    print(f"[demo] model repository {repo} (threshold T={args.threshold})")

    if args.data:
        paths = list_images(args.data)
        if not paths:
            raise SystemExit(f"no images found under {args.data}")
        names, images = [p.name for p in paths], paths
    else:
        photos = sample_photos()
        names, images = list(photos), list(photos.values())

    with TritonServer(repo, log_file=work / "tritonserver.log") as server:
        print(f"[demo] tritonserver ready: gRPC {server.grpc_url}, HTTP {server.http_url}, log {server.log_file}")
        with LittleBigClient(server.grpc_url) as client:
            info = client.gate_info()
            predictions = client.classify(images, info=info)
        print_predictions(names, predictions, load_labels(None, info.num_classes))
        escalated = sum(p.route for p in predictions)
        share = escalated / len(predictions)
        gmacs = (info.macs_little + share * info.macs_big) / 1e9
        print(
            f"[demo] {len(predictions)} images, {escalated} escalated to big (p={share:.2f}); "
            f"{gmacs:.3f} GMACs per image against {info.macs_big / 1e9:.3f} for big alone"
        )


def cmd_calibrate(args) -> None:
    from littlebig.client.calibrate import Criterion, calibrate

    criterion = Criterion(
        max_acc_drop=args.max_acc_drop,
        target_escalation=args.target_escalation,
        min_agreement=args.min_agreement,
        confidence_level=args.confidence_level,
    )
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
        repository=args.repo,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        refresh=args.recollect,
    )


def cmd_threshold(args) -> None:
    from littlebig.client.control import apply_threshold, served_threshold

    if args.value is None:
        print(f"{served_threshold(args.url):.6f}")
        return
    written = apply_threshold(args.url, args.value, repository=args.repo)
    print(f"server now runs T={served_threshold(args.url):.6f}" + (f"; wrote {written}" if written else
          "; repository not found on this machine (pass --repo to update its config.pbtxt)"))


def cmd_bench(args) -> None:
    from littlebig.client.benchmark import bench

    host = args.url.rsplit(":", 1)[0]
    bench(
        args.url,
        args.data,
        args.out,
        concurrencies=[int(c) for c in args.concurrency.split(",")],
        metrics_url=args.metrics_url or f"http://{host}:8002/metrics",
        n_images=args.images,
        threshold=args.threshold,
        measurement_ms=args.measurement_ms,
        rounds=args.rounds,
    )


def add_repository_arguments(parser: argparse.ArgumentParser) -> None:
    from littlebig.model_repository.builder import RepositoryOptions

    parser.add_argument("--runtime", choices=["python", "onnxruntime", "tensorrt"], default="python",
                        help="how little/big run: python (onnxruntime in the python backend; the bundled CPU "
                        "server), onnxruntime (native backend, NGC container), tensorrt (plans built on a GPU)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.5, help="confidence threshold T in [0, 1]")
    parser.add_argument("--ensemble-weight", type=float, default=1.0,
                        help="w of the Little-Big ensemble (paper Eq. 8); 1 answers escalated rows with big alone")
    defaults = RepositoryOptions()
    parser.add_argument("--gate-instances", type=int, default=defaults.gate_instances)
    parser.add_argument("--little-instances", type=int, default=defaults.little_instances)
    parser.add_argument("--big-instances", type=int, default=defaults.big_instances)
    parser.add_argument("--big-queue-delay-us", type=int, default=0,
                        help="how long big's dynamic batcher waits to merge escalated rows of several gate batches")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="onnxruntime threads (python runtime)")
    parser.add_argument("--big-nice", type=int, default=defaults.big_nice,
                        help="CPU priority increment (0..19) of big's python-runtime process: on a CPU server, "
                        "requests little answers go first (default %(default)s; 0 to treat both alike)")
    parser.add_argument("--on-big-failure", choices=["fail", "little"], default=defaults.on_big_failure,
                        help="when big fails: fail the escalated requests (default) or answer with little, ROUTE=2")
    parser.add_argument("--child-timeout-ms", type=int, default=defaults.child_timeout_ms,
                        help="bound on each gate call to little or big (0: none; default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="littlebig", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a classifier to a serving ONNX file")
    p.add_argument("spec", help="timm:<name> | torchvision:<name> | efficientnet-lite:<0|1|2>")
    p.add_argument("--out", required=True, help="output .onnx path (a .json report is written beside it)")
    p.add_argument("--wire-size", type=int, help="side S of the uint8 [N,S,S,3] input (default: model resolution); "
                   "both models of a pair must share it")
    p.add_argument("--weights", help="local state dict (.pth) to load instead of downloading weights")
    p.add_argument("--random-init", action="store_true", help="export untrained weights on purpose")
    p.add_argument("--num-classes", type=int, help="replace the classifier head with this many classes")
    p.add_argument("--resolution", type=int, help="feed the model this resolution instead of its own")
    p.add_argument("--parity-data", help="folder of real images for the PyTorch parity check "
                   "(default: photographs bundled with scikit-image)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("repo", help="write a Triton model repository for a little/big pair")
    p.add_argument("--little", required=True, help="little model .onnx (from littlebig export)")
    p.add_argument("--big", required=True, help="big model .onnx (from littlebig export)")
    p.add_argument("--out", required=True, help="repository folder")
    p.add_argument("--little-plan", help="TensorRT plan for little (--runtime tensorrt)")
    p.add_argument("--big-plan", help="TensorRT plan for big (--runtime tensorrt)")
    add_repository_arguments(p)
    p.set_defaults(func=cmd_repo)

    p = sub.add_parser("serve", help="serve a model repository with Triton")
    p.add_argument("--repo", required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; others need --allow-remote)")
    p.add_argument("--allow-remote", action="store_true", help="allow --host to be a non-loopback address")
    p.add_argument("--admin-key", help="key that unlocks the repository/shared-memory APIs (default: $LITTLEBIG_ADMIN_KEY, "
                   "else a new one, stored in ~/.config/littlebig/admin-keys.json for this user's admin commands)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log-file", help="server log (default: a new temporary file)")
    p.add_argument("--no-supervise", action="store_true", help="no watchdog (canaries, restore of dead models/server)")
    p.add_argument("--canary-interval", type=float, default=1.0, help="seconds between the watchdog's canary rounds")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("classify", help="classify images through the served gate")
    p.add_argument("images", nargs="+")
    p.add_argument("--url", default="127.0.0.1:8001", help="server address (gRPC port, or HTTP port with --http)")
    p.add_argument("--http", action="store_true", help="use HTTP instead of gRPC")
    p.add_argument("--threshold", type=float, help="override T for these requests")
    p.add_argument("--labels", help="class names, one per line (default: ImageNet names for 1000 classes)")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("calibrate", help="choose T on a labelled image set through the running server")
    p.add_argument("--url", default="127.0.0.1:8001", help="server gRPC address")
    p.add_argument("--data", required=True, help="image folder (ImageFolder, wnid files + classes.tsv, or with --labels-csv)")
    p.add_argument("--labels-csv", help="CSV of file,label for --data")
    p.add_argument("--classes", help="class list (one name per line, or a classes.tsv) to map names to indices")
    p.add_argument("--out", required=True, help="folder for report.json, table.txt, PNGs and cached probabilities")
    p.add_argument("--max-acc-drop", type=float, default=0.0, help="cheapest T with accuracy >= big's minus this (default 0)")
    p.add_argument("--target-escalation", type=float, help="label-free: T = this quantile of little's confidence")
    p.add_argument("--min-agreement", type=float, help="label-free: cheapest T agreeing with big on this share")
    p.add_argument("--confidence-level", type=float, help="use an upper bound on the drop at this level (e.g. 0.95)")
    p.add_argument("--eval-data", help="second labelled set to check the chosen T on")
    p.add_argument("--eval-labels-csv", help="CSV of file,label for --eval-data")
    p.add_argument("--apply", action="store_true", help="switch the running server to the chosen T and write it to the repository")
    p.add_argument("--repo", help="repository folder to update with --apply (default: the one the gate records)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--recollect", action="store_true", help="ask the server again even if cached probabilities exist")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("threshold", help="show or set the served threshold T (no downtime)")
    p.add_argument("value", nargs="?", type=float, help="new T in [0, 1]; omit to show the current one")
    p.add_argument("--url", default="127.0.0.1:8001", help="server gRPC address")
    p.add_argument("--repo", help="repository folder to update (default: the one the gate records)")
    p.set_defaults(func=cmd_threshold)

    p = sub.add_parser("bench", help="perf_analyzer: big vs little vs the gate, ideal speedup S* and the achieved fraction")
    p.add_argument("--url", default="127.0.0.1:8001", help="server gRPC address")
    p.add_argument("--metrics-url", help="server metrics URL (default http://HOST:8002/metrics)")
    p.add_argument("--data", required=True, help="folder of real images (sent in the wire format)")
    p.add_argument("--images", type=int, default=64, help="how many images perf_analyzer cycles through")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated concurrency levels")
    p.add_argument("--threshold", type=float, help="run the gate at this T (switched live, restored after)")
    p.add_argument("--measurement-ms", type=int, default=3000, help="perf_analyzer measurement window")
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs per model and concurrency (medians reported)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="EfficientNet-Lite0 -> Lite2 end to end: export, repository, serve, classify")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--data", help="folder of your images (default: photographs bundled with scikit-image)")
    p.add_argument("--threshold", type=float, default=0.26,
                   help="T (default: the zero-loss T that `littlebig calibrate` picked on 500 ImageNet photos)")
    p.add_argument("--wire-size", type=int, default=260)
    p.add_argument("--force", action="store_true", help="export again even if the ONNX files exist")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    from littlebig.client.benchmark import BenchmarkError
    from littlebig.export import ExportError
    from littlebig.model_repository.builder import RepositoryError
    from littlebig.server import ServerError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ExportError, RepositoryError, ServerError, BenchmarkError, FileNotFoundError, ValueError) as err:
        print(f"littlebig {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
