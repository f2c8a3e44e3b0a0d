"""The gate's own time per execution, from Triton's statistics.

At T = 0 no row leaves stage 0. Sent one request at a time, every execution of the gate's own model
holds one request, so per execution:

    own time = the gate's model (compute input + infer + output) - little run inside it (in_gate form)

which is what the gate itself costs: the copy of the request into its process and back, parsing,
reading stage 0's answer, building the responses. In the ensemble form the gate's own model is the
gate step (stage 0 is the step before it); with little in the gate, that process also ran little and
counted those seconds in littlebig_in_gate_seconds_total (read from /metrics, so ``metrics_url`` is
needed there). Little's time per request (served, or inside the gate) is reported beside it.
Cumulative statistics are read before and after, so other traffic on the server must be quiet.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tritonclient.grpc as grpcclient

from littlebig.contract import CLASS, IMAGE
from littlebig.errors import UserError

from .infer import GATE_MODEL, LittleBigClient
from .metrics import read_samples, sample_sum

STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


@dataclasses.dataclass(frozen=True)
class GateCost:
    batch_size: int
    executions: int
    gate_ms: float  # the gate's own model's compute (input + infer + output) per execution
    little_ms: float  # little's queue + compute per execution (served, or run inside the gate)
    own_ms: float  # gate_ms less little run inside it


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
    parameter), and read the gate's own time from the statistics of its own model (and of little)."""
    rows = np.resize(images, (batch_size, *images.shape[1:]))
    with LittleBigClient(url, model=gate_model) as gate:
        own_model = gate.gate_model()
        in_gate = gate.gate_config().little_in_gate
    if in_gate and metrics_url is None:
        raise UserError("little runs inside this gate: its own time needs the metrics URL (littlebig_in_gate_seconds_total)")
    with grpcclient.InferenceServerClient(url) as client:
        tensor = grpcclient.InferInput(IMAGE, list(rows.shape), "UINT8")
        tensor.set_data_from_numpy(rows)
        outputs = [grpcclient.InferRequestedOutput(CLASS)]
        for _ in range(warmup):
            client.infer(gate_model, [tensor], outputs=outputs, parameters={"threshold": 0.0})
        in_gate_before = _in_gate_seconds(metrics_url, own_model) if in_gate else 0.0
        own_before, little_before = _totals(client, own_model), _totals(client, little_model)
        for _ in range(requests):
            client.infer(gate_model, [tensor], outputs=outputs, parameters={"threshold": 0.0})
        own_after, little_after = _totals(client, own_model), _totals(client, little_model)
        in_gate_ns = (_in_gate_seconds(metrics_url, own_model) - in_gate_before) * 1e9 if in_gate else 0.0
    executions = own_after["executions"] - own_before["executions"]
    gate_ns = sum(own_after[s] - own_before[s] for s in STAGES[1:])
    little_ns = sum(little_after[s] - little_before[s] for s in STAGES) + in_gate_ns
    gate_ms, little_ms = gate_ns / executions / 1e6, little_ns / executions / 1e6
    return GateCost(batch_size, executions, gate_ms, little_ms, gate_ms - in_gate_ns / executions / 1e6)
