"""The gate's own time per execution, from Triton's statistics.

At T = 0 the gate calls only little, once per execution. Sent one request at a time, every gate
execution holds one request and causes one little execution, so per execution:

    own time = gate (compute input + infer + output) - little (queue + compute input + infer + output)
                                                      - little run inside the gate (--little-in-gate)

which is what the gate itself costs: parsing, concatenating, the BLS hop both ways (none with little
in the gate), reading little's answer, building the responses. A gate running little in its own
process counts those seconds in littlebig_in_gate_seconds_total (read from /metrics when
``metrics_url`` is given). Cumulative statistics are read before and after, so other traffic on the
server must be quiet while this runs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tritonclient.grpc as grpcclient

from littlebig.contract import CLASS, IMAGE

from .infer import GATE_MODEL
from .metrics import read_samples, sample_sum

STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


@dataclasses.dataclass(frozen=True)
class GateCost:
    batch_size: int
    executions: int
    gate_ms: float  # the gate's compute (input + infer + output) per execution
    little_ms: float  # little's queue + compute per gate execution (served, or run inside the gate)
    own_ms: float  # gate_ms - little_ms


def _totals(client: grpcclient.InferenceServerClient, model: str) -> dict[str, int]:
    stats = client.get_inference_statistics(model).model_stats[0]
    totals = {stage: getattr(stats.inference_stats, stage).ns for stage in STAGES}
    totals["executions"] = stats.execution_count
    return totals


def _in_gate_seconds(metrics_url: str | None, gate_model: str) -> float:
    if metrics_url is None:
        return 0.0
    return sample_sum(read_samples(metrics_url, "littlebig_in_gate", settle=True), "littlebig_in_gate_seconds_total", model=gate_model)


def measure_gate_cost(
    url: str, little_model: str, images: np.ndarray, batch_size: int, requests: int = 30, warmup: int = 3,
    gate_model: str = GATE_MODEL, metrics_url: str | None = None,
) -> GateCost:
    """Send ``requests`` gate requests of ``batch_size`` rows one at a time at T = 0 (per-request
    parameter), and split the gate's time from little's with the statistics of both models (and the
    gate's littlebig_in_gate_seconds_total from ``metrics_url``, when little runs inside it)."""
    rows = np.resize(images, (batch_size, *images.shape[1:]))
    with grpcclient.InferenceServerClient(url) as client:
        tensor = grpcclient.InferInput(IMAGE, list(rows.shape), "UINT8")
        tensor.set_data_from_numpy(rows)
        outputs = [grpcclient.InferRequestedOutput(CLASS)]
        for _ in range(warmup):
            client.infer(gate_model, [tensor], outputs=outputs, parameters={"threshold": 0.0})
        in_gate_before = _in_gate_seconds(metrics_url, gate_model)
        gate_before, little_before = _totals(client, gate_model), _totals(client, little_model)
        for _ in range(requests):
            client.infer(gate_model, [tensor], outputs=outputs, parameters={"threshold": 0.0})
        gate_after, little_after = _totals(client, gate_model), _totals(client, little_model)
        in_gate_ns = (_in_gate_seconds(metrics_url, gate_model) - in_gate_before) * 1e9
    executions = gate_after["executions"] - gate_before["executions"]
    gate_ns = sum(gate_after[s] - gate_before[s] for s in STAGES[1:])
    little_ns = sum(little_after[s] - little_before[s] for s in STAGES) + in_gate_ns
    gate_ms, little_ms = gate_ns / executions / 1e6, little_ns / executions / 1e6
    return GateCost(batch_size, executions, gate_ms, little_ms, gate_ms - little_ms)
