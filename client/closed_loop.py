"""Closed-loop load: ``concurrency`` asyncio workers on one gRPC client, each sending one request at a
time; every request's image is drawn at random from the pool.

Random draws keep the served mix the data's. Workers that walk a fixed order each own a fixed subset
of the images, and a worker holding images that escalate completes fewer requests: at T = 0.36 the
share of rows a gate sent to big fell from 0.12 at concurrency 1 to 0.03 at 16 that way, an easier
mix than the data's. One event loop keeps the client's own CPU use small.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from typing import Awaitable, Callable

import numpy as np
import tritonclient.grpc.aio as grpcaio

from littlebig.contract import IMAGE

from .retry import Retrier


@dataclasses.dataclass(frozen=True)
class Answer:
    sent: float  # seconds after the recording started
    latency_ms: float
    route: int  # the ROUTE the answer reports (-1: none)


# (client, input tensor of one image) -> the answer's route
Send = Callable[[grpcaio.InferenceServerClient, grpcaio.InferInput], Awaitable[int]]


def image_inputs(images: np.ndarray) -> list[grpcaio.InferInput]:
    """One single-row IMAGE tensor per image, made once."""
    inputs = []
    for img in images:
        tensor = grpcaio.InferInput(IMAGE, [1, *img.shape], "UINT8")
        tensor.set_data_from_numpy(img[None])
        inputs.append(tensor)
    return inputs


async def _run(url: str, send: Send, inputs, concurrency: int, seconds: float, warmup: float, seed: int,
               timeout_s: float, retrier: Retrier) -> list[Answer]:
    client = grpcaio.InferenceServerClient(url)
    loop = asyncio.get_running_loop()
    recording = loop.time() + warmup
    deadline = recording + seconds
    answers: list[Answer] = []

    async def worker(k: int) -> None:
        draw = random.Random(seed * 1_000_003 + k)
        while loop.time() < deadline:
            start = loop.time()
            try:
                image = inputs[draw.randrange(len(inputs))]
                route = await asyncio.wait_for(retrier.call_async(lambda: send(client, image)), timeout_s)
            except asyncio.TimeoutError:
                raise RuntimeError(f"a request got no answer within {timeout_s:g} s") from None
            if start >= recording:
                answers.append(Answer(start - recording, (loop.time() - start) * 1000.0, route))

    try:
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    finally:
        await client.close()
    return answers


def closed_loop(url: str, send: Send, inputs, concurrency: int, seconds: float, warmup: float = 1.0, seed: int = 0,
                timeout_s: float = 120.0, retrier: Retrier | None = None) -> list[Answer]:
    """The answers to requests sent after ``warmup`` seconds, over ``seconds`` (all workers start at
    once, so the first requests meet a burst). A request the server could not answer is sent again
    (``retrier``, which counts them; client/retry.py); one that fails otherwise raises, and so does one
    not answered within ``timeout_s``."""
    return asyncio.run(_run(url, send, inputs, concurrency, seconds, warmup, seed, timeout_s, retrier or Retrier()))
