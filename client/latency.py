"""Latency by route, which perf_analyzer cannot split: closed-loop asyncio clients that record each
answer's ROUTE, probed alternately against little alone so drift between rounds cancels."""

from __future__ import annotations

import statistics

import numpy as np

from littlebig.contract import PROBS, ROUTE

from .closed_loop import closed_loop, image_inputs
from .infer import GATE_MODEL
from .perf import BenchmarkError


def route_latencies(
    url: str, model: str, images: np.ndarray, concurrency: int, seconds: float, warmup: float = 1.0, seed: int = 0
) -> dict[int, list[float]]:
    """Closed-loop clients (``concurrency`` of them, one random image per request, client/closed_loop.py)
    for ``warmup`` + ``seconds``; latency in ms of the requests sent after the warm-up, grouped by the
    ROUTE each answer reports (-1 for a model without ROUTE). perf_analyzer cannot split latency by route."""
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as grpcaio

    with grpcclient.InferenceServerClient(url) as client:
        has_route = any(o.name == ROUTE for o in client.get_model_metadata(model).outputs)
    output = grpcaio.InferRequestedOutput(ROUTE if has_route else PROBS)

    async def send(client, image) -> int:
        result = await client.infer(model, [image], outputs=[output])
        return int(result.as_numpy(ROUTE)[0, 0]) if has_route else -1

    try:
        answers = closed_loop(url, send, image_inputs(images), concurrency, seconds, warmup, seed)
    except Exception as err:  # a benchmark with failed requests is not valid
        raise BenchmarkError(f"a request failed during the latency probe of {model}: {err}") from err
    by_route: dict[int, list[float]] = {}
    for answer in answers:
        by_route.setdefault(answer.route, []).append(answer.latency_ms)
    return by_route


def median_of(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def alternating_probes(
    url: str, models: list[str], images: np.ndarray, concurrency: int, seconds: float, rounds: int, log=None
) -> dict[str, list[dict[int, list[float]]]]:
    """Probe every model back to back, ``rounds`` times, the order reversed on odd rounds (this
    machine's speed drifts, so models are compared within a round). Per model, one
    :func:`route_latencies` result per round."""
    probes: dict[str, list[dict[int, list[float]]]] = {model: [] for model in models}
    for r in range(rounds):
        for model in models if r % 2 == 0 else models[::-1]:
            probes[model].append(route_latencies(url, model, images, concurrency, seconds, seed=r))
        if log:
            p50s = (f"{m} {median_of([x for v in probes[m][-1].values() for x in v]):.1f} ms" for m in models)
            log(f"latency probe round {r + 1}/{rounds} at concurrency {concurrency}: p50 " + ", ".join(p50s))
    return probes


def route_latency_comparison(
    url: str, little_model: str, images: np.ndarray, concurrency: int, seconds: float, rounds: int, log=None
) -> dict:
    """p50 latency of little-answered gate requests against little alone, probed alternately. The
    excess is the median of the per-round differences, so drift between rounds cancels."""
    probes = alternating_probes(url, [GATE_MODEL, little_model], images, concurrency, seconds, rounds, log)
    gate, alone = probes[GATE_MODEL], probes[little_model]
    gate_little = [median_of(g.get(0, [])) for g in gate]
    gate_big = [median_of(g.get(1, [])) for g in gate]
    little_alone = [median_of(a.get(-1, [])) for a in alone]
    counts = {
        "gate_little": sum(len(g.get(0, [])) for g in gate),
        "gate_big": sum(len(g.get(1, [])) for g in gate),
        "little": sum(len(a.get(-1, [])) for a in alone),
    }
    return {
        "concurrency": concurrency,
        "gate_little_answered_p50_ms": median_of(gate_little),
        "gate_big_answered_p50_ms": median_of([x for x in gate_big if x == x]),
        "little_alone_p50_ms": median_of(little_alone),
        "excess_ms": median_of([g - a for g, a in zip(gate_little, little_alone)]),
        "per_round": {"gate_little_answered_p50_ms": gate_little, "little_alone_p50_ms": little_alone},
        "rounds": rounds,
        "requests": counts,
    }
