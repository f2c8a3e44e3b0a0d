"""Under overload: the gate at a fixed T against the gate with gears, on one server, open-loop load.

One gate serves both variants: it has the calibration report's gears and a latency target; the fixed
variant's requests pin the config T (request parameter `threshold`: a pinned request is never
adapted), the adaptive variant's do not. Same model, same instances, same code path otherwise.
The fixed gate's capacity is measured first: the open-loop rate it sustains with p99 within the
latency target (bisection over short runs, one image per request, two runs per step). Then Poisson
arrivals at 0.8x, 1.0x, 1.2x and 1.5x of it are sent for a bounded time to each gate in turn (the same
arrivals, order alternating per round; medians of rounds). Every run is kept in overload.json; per
load the script prints in how many rounds the fixed gate met the target and how many of the adaptive
gate's answers in those rounds came from a lower gear (the promise: the fixed T's answers while the
target is met). Every answer's THRESHOLD output says which gear answered it, so the client
counts the time in each gear and the expected accuracy drop (the gears' calibrated drops, per answer).
Both gates have Triton's bounded queue: what they cannot take is refused (UNAVAILABLE) and counted.
With --floor a third variant pins the ladder's last T: the p99 a gate in the last gear from the first
second would have, the floor for any controller moving along this ladder.

The steep pair of docs/gears.md (bench/results/overload/ keeps its ladder and the runs the docs cite):

    .venv/bin/python bench/overload.py --little runs/steep/little192.onnx --big runs/steep/big.onnx \\
        --report bench/results/overload/calibration_report.json --data ../shared/data/imagenet-sample \\
        --capacity-seconds 20 --lead-in-seconds 3 --rounds 3 --seconds 30 --loads 0.8,1.0,1.2 --traces --out runs/overload
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpcaio
from tqdm import tqdm

from littlebig.client.closed_loop import closed_loop, image_inputs
from littlebig.client.gears import Ladder
from littlebig.client.images import list_images, to_wire_batch
from littlebig.client.infer import LittleBigClient
from littlebig.client.metrics import read_samples
from littlebig.contract import GATE_MODEL
from littlebig.gate.config import parse_ladder
from littlebig.model_repository.builder import build_repository
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.server import TritonServer
from overload_plots import plot, plot_timeline  # beside this script

VARIANTS = ("fixed", "adaptive")
# --floor adds a third variant whose requests pin the ladder's last T: what the gate does when every row is
# answered in the last gear from the first second, the lowest p99 any schedule along the ladder can reach.
FLOOR = "last_gear"
SLOWEST = ("big", "little_at_config_t", "little_at_lower_gear")  # who gave an answer, for slowest()
# A request unanswered this long counts as failed, so a lost answer (a gate stub that died: the
# 2.51 python backend does not restart it) stops the run instead of hanging it.
ANSWER_TIMEOUT_S = 60.0
OUTPUTS = [grpcaio.InferRequestedOutput(name) for name in ("CLASS", "THRESHOLD", "ROUTE")]


async def send_to_gate(client, image) -> int:
    """One request to the gate at its config T (the closed-loop capacity probe)."""
    result = await client.infer(GATE_MODEL, [image], outputs=OUTPUTS)
    return int(result.as_numpy("ROUTE")[0, 0])


@dataclasses.dataclass
class Run:
    variant: str
    load: float
    rate: float  # requests per second sent
    seconds: float
    latencies_ms: list[float]  # of the answered requests
    thresholds: list[float]  # THRESHOLD of each answer, in send order
    send_times: list[float]
    images: list[int]  # image index of each answer, in send order
    classes: list[int]  # CLASS of each answer, in send order
    routes: list[int]  # ROUTE of each answer (0: little, 1: big), in send order
    refused: int  # UNAVAILABLE (queue full or timed out)
    failed: int  # any other error, or no answer within ANSWER_TIMEOUT_S
    round: int = 0
    errors: dict = dataclasses.field(default_factory=dict)  # message of each failure -> how many

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


@dataclasses.dataclass(frozen=True)
class LeadIn:
    """Load sent before each measured run and not counted: the burst then reaches a server that is
    already serving (its models warm, its gears at home), not one that sat idle between runs."""

    seconds: float = 0.0
    load: float = 0.0  # in multiples of the same capacity as the run's load


def poisson(rng, rate: float, start: float, end: float) -> np.ndarray:
    if rate <= 0 or end <= start:
        return np.zeros(0)
    arrivals = start + np.cumsum(rng.exponential(1.0 / rate, size=int(rate * (end - start) * 2) + 10))
    return arrivals[arrivals < end]


async def open_loop(url: str, variant: str, inputs, rate: float, seconds: float, load: float, seed: int,
                    pin: float | None, lead_in_rate: float = 0.0, lead_in_s: float = 0.0) -> Run:
    """Poisson arrivals at ``lead_in_rate`` for ``lead_in_s`` (not counted), then at ``rate`` for ``seconds``;
    waits for every answer (bounded by ANSWER_TIMEOUT_S). ``pin``: the T every request pins (None: adapted)."""
    client = grpcaio.InferenceServerClient(url)
    loop = asyncio.get_running_loop()
    rng = np.random.default_rng(seed)
    lead = poisson(rng, lead_in_rate, 0.0, lead_in_s)
    arrivals = np.concatenate([lead, poisson(rng, rate, lead_in_s, lead_in_s + seconds)])
    run = Run(variant, load, rate, seconds, [], [], [], [], [], [], 0, 0)
    parameters = {"threshold": pin} if pin is not None else None
    answered = []

    async def one(k: int, sent: float, counted: bool) -> None:
        index = k % len(inputs)
        try:
            result = await client.infer(GATE_MODEL, [inputs[index]], outputs=OUTPUTS, parameters=parameters,
                                        client_timeout=ANSWER_TIMEOUT_S)
        except grpcaio.InferenceServerException as err:
            if "UNAVAILABLE" in str(err.status()):
                run.refused += counted
            elif counted:
                run.failed += 1
                message = f"{err.status()}: {err.message()}"[:200]
                run.errors[message] = run.errors.get(message, 0) + 1
            return
        if counted:
            answered.append((sent, (loop.time() - sent) * 1000.0, float(result.as_numpy("THRESHOLD")[0, 0]), index,
                             int(result.as_numpy("CLASS")[0, 0]), int(result.as_numpy("ROUTE")[0, 0])))

    start = loop.time()
    tasks = []
    try:
        for k, at in enumerate(arrivals):
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(k, loop.time(), k >= len(lead))))
        await asyncio.gather(*tasks)
    finally:
        await client.close()
    answered.sort()
    run.send_times = [a[0] - start - lead_in_s for a in answered]
    run.latencies_ms = [a[1] for a in answered]
    run.thresholds = [a[2] for a in answered]
    run.images = [a[3] for a in answered]
    run.classes = [a[4] for a in answered]
    run.routes = [a[5] for a in answered]
    return run


def capacity_at_target(url: str, inputs, upper: float, target_ms: float, seconds: float, pause: float, steps: int,
                       repeats: int, pin: float, lead_in: LeadIn) -> float:
    """The highest open-loop rate at which the fixed gate keeps p99 <= target with nothing refused,
    by bisection between a quarter of its closed-loop throughput and all of it. Each step runs
    ``repeats`` short runs with different arrivals and judges their median p99: one run's p99 is a
    handful of answers, and one burst of arrivals decides it."""
    low, high = 0.25 * upper, upper
    for step in range(steps):
        rate = (low + high) / 2.0
        runs = [asyncio.run(open_loop(url, "fixed", inputs, rate, seconds, 0.0, 100 * step + k, pin, lead_in.load * rate,
                                      lead_in.seconds)) for k in range(repeats)]
        p99 = statistics.median(run.percentile(99) for run in runs)
        refused = sum(run.refused + run.failed for run in runs)
        met = refused == 0 and p99 <= target_ms
        print(f"capacity search: {rate:6.1f} req/s -> p99 {' '.join(f'{r.percentile(99):.0f}' for r in runs)} ms "
              f"(median {p99:.0f}), refused {refused}: {'met' if met else 'missed'}", flush=True)
        low, high = (rate, high) if met else (low, rate)
        time.sleep(pause)
    return low


def gear_seconds(run: Run, ladder: list[float]) -> list[float]:
    """Seconds of the run in each gear, as the answers saw it: each gap between sends goes to the gear
    of the answer sent at its start (a pinned T would not be a gear; the bench pins none)."""
    seconds = [0.0] * len(ladder)
    times = run.send_times + [run.seconds]
    for k, t in enumerate(run.thresholds):
        seconds[ladder.index(t)] += max(0.0, min(times[k + 1], run.seconds) - times[k])
    return seconds


def expected_drop(run: Run, ladder: list[float], drops: list[float]) -> float:
    """Mean calibrated drop (points) over the run's answers: what the gears are expected to have cost."""
    if not run.thresholds:
        return 0.0
    return 100.0 * float(np.mean([drops[ladder.index(t)] for t in run.thresholds]))


def below_config_t(run: Run, ladder: list[float]) -> int:
    """Answers given at a lower gear than the config T (a fixed T would have given none)."""
    return sum(t != ladder[0] for t in run.thresholds)


def differ_from_fixed(run: Run, reference: dict[int, int]) -> int:
    """Answers whose class differs from the fixed gate's class for the same image."""
    return sum(reference.get(i) not in (None, c) for i, c in zip(run.images, run.classes))


def late(run: Run, target_ms: float) -> int:
    """Answers over the latency target."""
    return int(np.sum(np.asarray(run.latencies_ms) > target_ms))


def slowest(run: Run, ladder: list[float], share: float = 0.01) -> dict[str, int]:
    """Who answered the slowest ``share`` of the run's answers (the ones its p99 is made of): big, little
    at the config T (the wait was the gate's own queue), or little at a lower gear (a step down or the
    deadline answered a row that had been waiting for big)."""
    count = max(1, int(round(share * len(run.latencies_ms))))
    top = np.argsort(run.latencies_ms)[::-1][:count]
    kinds = ["big" if run.routes[k] == 1 else "little_at_config_t" if run.thresholds[k] == ladder[0] else "little_at_lower_gear"
             for k in top]
    return {kind: kinds.count(kind) for kind in SLOWEST}


def must_act_by(run: Run, ratio: float = 0.5) -> float:
    """Seconds into the run by which more than 1% of its answers had been slower than ``ratio`` x its own
    p99. A gate that answers like this one until then (an adaptive gate in gear 0 does: same arrivals,
    same answers) cannot end with a p99 below ``ratio`` x this run's, whatever it does afterwards: the
    latest moment a controller could have acted, and the evidence it would have had (that many seconds
    of arrivals)."""
    latencies, sent = np.asarray(run.latencies_ms), np.asarray(run.send_times)
    slow = np.sort(sent[latencies > ratio * run.percentile(99)])
    allowed = len(latencies) // 100  # a p99 may have this many answers above it
    return float(slow[allowed]) if len(slow) > allowed else run.seconds


def met_target(run: Run, target_ms: float) -> bool:
    return run.refused == 0 and run.failed == 0 and run.percentile(99) <= target_ms


def variant_pin(variant: str, ladder: list[float]) -> float | None:
    return {"fixed": ladder[0], FLOOR: ladder[-1]}.get(variant)


def measure(url, inputs, rate0, loads, rounds, seconds, ladder, drops, pause, lead_in: LeadIn, variants) -> list[Run]:
    runs = []
    progress = tqdm(total=rounds * len(loads) * len(variants), desc="overload runs", unit="run")
    for r in range(rounds):
        for i, load in enumerate(loads):
            shift = (r + i) % len(variants)  # each variant goes first in turn
            for variant in variants[shift:] + variants[:shift]:
                run = asyncio.run(open_loop(url, variant, inputs, rate0 * load, seconds, load, 1000 * r + i,
                                            variant_pin(variant, ladder), rate0 * lead_in.load, lead_in.seconds))
                run.round = r
                runs.append(run)
                progress.update(1)
                progress.write(
                    f"round {r + 1} {load:.1f}x {variant:>8}: p50 {run.percentile(50):7.0f} ms  p99 {run.percentile(99):7.0f} ms  "
                    f"{run.throughput:5.1f} img/s  refused {run.refused:4d}  failed {run.failed}  gears(s) "
                    f"{' '.join(f'{s:.1f}' for s in gear_seconds(run, ladder))}  drop {expected_drop(run, ladder, drops):.2f} pt"
                )
                for message, count in run.errors.items():
                    progress.write(f"    failed x{count}: {message}")
                time.sleep(pause)  # queues drain; the adaptive gate climbs back to gear 0 when quiet
    progress.close()
    return runs


def run_record(run: Run, ladder, drops, reference, target_ms) -> dict:
    return {
        "round": run.round + 1, "load": run.load, "variant": run.variant, "p50_ms": run.percentile(50),
        "p99_ms": run.percentile(99), "throughput": run.throughput, "refused": run.refused, "failed": run.failed,
        "met_target": met_target(run, target_ms), "gear_seconds": gear_seconds(run, ladder),
        "expected_drop_pt": expected_drop(run, ladder, drops), "answers": len(run.thresholds),
        "below_config_t": below_config_t(run, ladder), "differ_from_fixed": differ_from_fixed(run, reference),
        "late": late(run, target_ms), "slowest_1pct": slowest(run, ladder), "errors": run.errors,
    }


def summarise(runs: list[Run], loads, ladder, drops, reference: dict[int, int], target_ms: float) -> list[dict]:
    rows = []
    for load in loads:
        row = {"load": load}
        by = {v: [r for r in runs if r.load == load and r.variant == v] for v in variants_in(runs)}
        for variant, mine in by.items():
            slowest_runs = [slowest(r, ladder) for r in mine]
            row[variant] = {
                "rate": mine[0].rate,
                "p50_ms": statistics.median(r.percentile(50) for r in mine),
                "p99_ms": statistics.median(r.percentile(99) for r in mine),
                "throughput": statistics.median(r.throughput for r in mine),
                "refused": statistics.median(r.refused for r in mine),
                "failed": sum(r.failed for r in mine),
                "gear_seconds": [statistics.mean(g) for g in zip(*(gear_seconds(r, ladder) for r in mine))],  # sums to the run
                "expected_drop_pt": statistics.median(expected_drop(r, ladder, drops) for r in mine),
                "differ_from_fixed": sum(differ_from_fixed(r, reference) for r in mine),
                "slowest_1pct": {kind: sum(counts[kind] for counts in slowest_runs) for kind in SLOWEST},
            }
        pairs = list(zip(by["adaptive"], by["fixed"]))  # same round, same arrival times
        row["adaptive_vs_fixed_p99"] = statistics.median(a.percentile(99) / f.percentile(99) for a, f in pairs)
        row["adaptive_vs_fixed_p99_per_round"] = [a.percentile(99) / f.percentile(99) for a, f in pairs]
        if FLOOR in by:
            floor = [lg.percentile(99) / f.percentile(99) for lg, f in zip(by[FLOOR], by["fixed"])]
            row[f"{FLOOR}_vs_fixed_p99"], row[f"{FLOOR}_vs_fixed_p99_per_round"] = statistics.median(floor), floor
        # A gate that keeps the target and does not move while it is met ends near the target, so the ratio
        # can reach 0.5 only in rounds where the fixed gate's p99 is at least twice the target.
        row["fixed_p99_over_target_per_round"] = [f.percentile(99) / target_ms for _, f in pairs]
        row["must_act_by_s_per_round"] = [must_act_by(f) for _, f in pairs]
        # p99 of a short run is mostly its worst burst, which both gates meet in gear 0 (the same arrivals);
        # how many answers were late tells what the gears took off after it.
        row["late_per_round"] = {"fixed": [late(f, target_ms) for _, f in pairs], "adaptive": [late(a, target_ms) for a, _ in pairs]}
        # The promise: while the target is met, the answers of the fixed T. Judged per round, by the
        # fixed gate's own run (same arrivals): did it meet the target, and did the adaptive one move?
        met = [a for a, f in pairs if met_target(f, target_ms)]
        row["fixed_met_rounds"] = len(met)
        row["adaptive_answers_where_fixed_met"] = sum(len(a.thresholds) for a in met)
        row["adaptive_below_config_t_where_fixed_met"] = sum(below_config_t(a, ladder) for a in met)
        rows.append(row)
    return rows


def variants_in(runs: list[Run]) -> list[str]:
    return [v for v in VARIANTS + (FLOOR,) if any(r.variant == v for r in runs)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--little", required=True)
    parser.add_argument("--big", required=True)
    parser.add_argument("--report", required=True, help="calibration report.json with gears")
    parser.add_argument("--data", required=True, help="folder of real images")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--loads", default="0.8,1.0,1.2,1.5", help="offered loads, in multiples of the fixed gate's capacity")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each open-loop run")
    parser.add_argument("--capacity-concurrency", type=int, default=16)
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--target-ms", type=float, default=500.0, help="p99 latency target: the fixed gate's capacity "
                        "is the rate it sustains within it, and the adaptive gate's latency_target_ms")
    parser.add_argument("--capacity-steps", type=int, default=5, help="bisection steps of the capacity search")
    parser.add_argument("--capacity-repeats", type=int, default=2, help="runs per bisection step (their median p99 decides)")
    parser.add_argument("--gear-deadline-ms", type=float, default=None, help="the adaptive gate's gear_deadline_ms "
                        "(default: the repository builder's, 0.9 x the target; 0: rows wait for big)")
    parser.add_argument("--gear-interval-ms", type=int, default=RepositoryOptions.gear_interval_ms,
                        help="how often the adaptive gate reconsiders its gear")
    parser.add_argument("--max-queue-size", type=int, default=64, help="Triton queue bound on both gates")
    parser.add_argument("--gate-instances", type=int, default=RepositoryOptions.gate_instances)
    parser.add_argument("--little-in-gate", action=argparse.BooleanOptionalAction, default=None,
                        help="little inside the gate, or as the ensemble step before it (default: the builder's)")
    parser.add_argument("--pause", type=float, default=3.0, help="seconds of quiet between runs")
    parser.add_argument("--lead-in-seconds", type=float, default=0.0, help="load sent before each run (and each capacity "
                        "probe) and not counted, so a burst reaches a server already serving instead of an idle one")
    parser.add_argument("--lead-in-load", type=float, default=0.5, help="its rate, in multiples of the capacity "
                        "(of the probed rate during the capacity search)")
    parser.add_argument("--out", required=True, help="folder for overload.json and overload.png")
    parser.add_argument("--floor", action="store_true", help="also run every request pinned at the ladder's last T "
                        f"(variant {FLOOR}): the lowest p99 any gear schedule reaches, beside fixed and adaptive")
    parser.add_argument("--traces", action="store_true", help="also write every answer (send time, latency, T, ROUTE) of every "
                        "run to traces.json, to see when the gears moved")
    args = parser.parse_args()
    # The deadline as the builder resolves it (default 0.9 x the target), once for the repository and the gate.
    args.gear_deadline_ms = RepositoryOptions(latency_target_ms=args.target_ms, gear_deadline_ms=args.gear_deadline_ms).deadline_ms()
    return args


def main() -> None:
    args = parse_args()
    ladder_ = Ladder.from_dict(json.loads(Path(args.report).read_text())["gears"])
    ladder, drops = [g.threshold for g in ladder_.gears], [g.drop for g in ladder_.gears]
    loads = [float(x) for x in args.loads.split(",")]
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        # Built with the ladder and the deadline so that big's queue honours the deadline's timeouts, but no
        # target yet: T stays fixed until install_gears gives the gate its target for the measured runs.
        options = RepositoryOptions(threshold=ladder[0], max_queue_size=args.max_queue_size, gate_instances=args.gate_instances,
                                    little_in_gate=args.little_in_gate, gears=ladder_.config_value(),
                                    gear_deadline_ms=args.gear_deadline_ms)
        repo = build_repository(args.little, args.big, Path(tmp) / "repository", options)
        with TritonServer(repo, log_file=Path(tmp) / "tritonserver.log") as server:
            with LittleBigClient(server.grpc_url) as client:
                info = client.gate_info()
            images = to_wire_batch(list_images(args.data)[: args.images], info.wire_size, info.crop_pct)
            inputs = image_inputs(images)
            # The gate at fixed T (no target yet): closed-loop throughput, one image per request, then
            # its capacity at the target: the open-loop rate it sustains within it.
            answers = closed_loop(server.grpc_url, send_to_gate, inputs, args.capacity_concurrency, args.capacity_seconds)
            closed_rate = len(answers) / args.capacity_seconds
            print(f"fixed gate (T={ladder[0]:.4f}) closed loop at concurrency {args.capacity_concurrency}: {closed_rate:.1f} img/s, "
                  f"p99 {np.percentile([a.latency_ms for a in answers], 99):.0f} ms", flush=True)
            lead_in = LeadIn(args.lead_in_seconds, args.lead_in_load)
            rate0 = capacity_at_target(server.grpc_url, inputs, closed_rate, args.target_ms, args.capacity_seconds / 2,
                                       args.pause, args.capacity_steps, args.capacity_repeats, ladder[0], lead_in)
            print(f"fixed gate capacity within p99 <= {args.target_ms:.0f} ms: {rate0:.1f} req/s", flush=True)
            install_gears(server, ladder_.config_value(), args.target_ms, args.gear_interval_ms, args.gear_deadline_ms)
            variants = VARIANTS + ((FLOOR,) if args.floor else ())
            runs = measure(server.grpc_url, inputs, rate0, loads, args.rounds, args.seconds, ladder, drops, args.pause, lead_in,
                           variants)
            metrics = read_samples(server.metrics_url, "littlebig_gear")
    reference = {}  # the fixed T's class of each image (every fixed answer is at the config T)
    for run in runs:
        if run.variant == "fixed":
            reference.update(zip(run.images, run.classes))
    rows = summarise(runs, loads, ladder, drops, reference, args.target_ms)
    records = [run_record(r, ladder, drops, reference, args.target_ms) for r in runs]
    report(rows, records, runs, args, ladder_, rate0, closed_rate, metrics, time.time() - started)


def install_gears(server: TritonServer, gears: str, target_ms: float, interval_ms: int, deadline_ms: float) -> None:
    """Reload the gate with the gears and the target: back in gear 0 for the measured runs."""
    import tritonclient.grpc as grpcclient

    with LittleBigClient(server.grpc_url) as gate:
        model = gate.gate_model()
        settings = gate.gate_config()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        config = client.get_model_config(model, as_json=True)["config"]
        settings = dataclasses.replace(settings, gears=parse_ladder(gears), latency_target_ms=float(target_ms),
                                       gear_interval_ms=float(interval_ms), gear_deadline_ms=float(deadline_ms))
        config["parameters"] = {key: {"string_value": value} for key, value in settings.parameters().items()}
        client.load_model(model, config=json.dumps(config), headers=server.admin_headers())


def report(rows, records, runs, args, ladder_: Ladder, rate0, closed_loop_rate, metrics, wall_s) -> None:
    ladder = [g.threshold for g in ladder_.gears]
    variants = variants_in(runs)
    print(f"{'load':>5} {'variant':>9} {'p50 ms':>8} {'p99 ms':>8} {'img/s':>6} {'refused':>7}  seconds per gear "
          f"({', '.join(f'T={t:.3f}' for t in ladder)})  expected drop  answers != fixed")
    for row in rows:
        for variant in variants:
            v = row[variant]
            print(f"{row['load']:5.1f} {variant:>9} {v['p50_ms']:8.0f} {v['p99_ms']:8.0f} {v['throughput']:6.1f} {v['refused']:7.0f}  "
                  f"{' '.join(f'{s:5.1f}' for s in v['gear_seconds']):<28} {v['expected_drop_pt']:6.2f} pt  {v['differ_from_fixed']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "ladder": ladder_.as_dict(), "capacity_req_s": rate0, "closed_loop_img_s": closed_loop_rate, "target_ms": args.target_ms,
        "gear_interval_ms": args.gear_interval_ms, "gear_deadline_ms": args.gear_deadline_ms, "gate_instances": args.gate_instances, "little_in_gate": args.little_in_gate,
        "rounds": args.rounds, "seconds_per_run": args.seconds, "max_queue_size": args.max_queue_size,
        "lead_in": dataclasses.asdict(LeadIn(args.lead_in_seconds, args.lead_in_load)),
        "images": args.images, "wall_s": wall_s, "rows": rows, "runs": records,
        "gate_gear_metrics": [{"name": n, "labels": labels, "value": v} for n, labels, v in metrics],
    }
    (out / "overload.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.traces:
        (out / "traces.json").write_text(json.dumps([
            {"round": r.round + 1, "load": r.load, "variant": r.variant, "send_s": r.send_times, "latency_ms": r.latencies_ms,
             "threshold": r.thresholds, "route": r.routes} for r in runs]) + "\n")
    plot(rows, ladder, out / "overload.png")
    plot_timeline(runs, args.target_ms, out / "timeline.png")
    for row in rows:
        print(f"{row['load']:.1f}x: the fixed T met the target in {row['fixed_met_rounds']} of {args.rounds} rounds; in those the "
              f"adaptive gate answered {row['adaptive_below_config_t_where_fixed_met']} of "
              f"{row['adaptive_answers_where_fixed_met']} requests below the config T")
    for row in rows:
        print(f"{row['load']:.1f}x per round: fixed p99 / target {' '.join(f'{x:.2f}' for x in row['fixed_p99_over_target_per_round'])}; "
              f"adaptive / fixed p99 {' '.join(f'{x:.2f}' for x in row['adaptive_vs_fixed_p99_per_round'])}; answers over the "
              f"target, fixed {' '.join(map(str, row['late_per_round']['fixed']))}, adaptive {' '.join(map(str, row['late_per_round']['adaptive']))}")
    for row in rows:
        print(f"{row['load']:.1f}x slowest 1% of answers, all rounds: " + "; ".join(
            f"{variant} " + ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in row[variant]["slowest_1pct"].items()) for variant in variants))
    for row in rows:
        print(f"{row['load']:.1f}x: for a p99 half the fixed gate's, a gate answering like it must act within "
              f"{' '.join(f'{x:.1f}' for x in row['must_act_by_s_per_round'])} s of the run's start (per round)")
    for row in rows:
        if FLOOR in row:
            print(f"{row['load']:.1f}x the last gear pinned / fixed p99 per round "
                  f"{' '.join(f'{x:.2f}' for x in row[f'{FLOOR}_vs_fixed_p99_per_round'])} (median {row[f'{FLOOR}_vs_fixed_p99']:.2f}): "
                  f"the lowest any schedule along the ladder reaches, at {row[FLOOR]['expected_drop_pt']:.2f} pt")
    at = next(r for r in rows if r["load"] == 1.2) if any(r["load"] == 1.2 for r in rows) else rows[len(rows) // 2]
    print(f"adaptive/fixed p99 at {at['load']:.1f}x: {at['adaptive_vs_fixed_p99']:.2f}; expected drop: "
          f"{at['adaptive']['expected_drop_pt']:.2f} pt")


if __name__ == "__main__":
    main()
