"""Show or switch the served threshold with no downtime.

Switching reloads the gate through Triton's repository API with a config override (explicit model
control): Triton keeps serving with the old gate until the new one is ready, then swaps. This only
changes the running server; writing T into a repository on disk is a separate step
(`model_repository.builder.set_threshold`), so a restart keeps it. The two are called side by side by
`littlebig threshold` and `littlebig calibrate --apply`; nothing the server says decides where the
client writes.
"""

from __future__ import annotations

import dataclasses
import json

import tritonclient.grpc as grpcclient

from littlebig.admin import admin_headers
from littlebig.contract import GateConfig
from littlebig.errors import UserError
from littlebig.gate.config import parse_ladder

from .infer import GATE_MODEL, LittleBigClient
from .retry import Retrier


def served_threshold(url: str, model: str = GATE_MODEL) -> float:
    return served_thresholds(url, model)[0]


def served_thresholds(url: str, model: str = GATE_MODEL) -> tuple[float, ...]:
    """T_0 .. T_{K-2} of the served gate (two stages: its one T)."""
    with LittleBigClient(url, model=model) as client:
        return client.gate_info().thresholds


def switch_threshold(url: str, threshold: float, *, gears: str | None = None, model: str = GATE_MODEL,
                     audit_promise: float | None = None) -> None:
    """Switch a running two-stage gate to ``threshold`` (a reload with a config override; no downtime), and to
    ``gears`` (the gate's ladder parameter, starting at ``threshold``) when given; without, a ladder made
    for another T is dropped (GateConfig.with_thresholds)."""
    with LittleBigClient(url, model=model) as client:
        stages = client.gate_config().stage_models
    if len(stages) != 2:
        raise UserError(f"the gate serves {len(stages)} stages ({', '.join(stages)}): it takes "
                         f"{len(stages) - 1} thresholds, not one (calibrate --apply, or switch_thresholds)")
    switch_thresholds(url, [threshold], gears=gears, model=model, audit_promise=audit_promise)


def switch_thresholds(url: str, thresholds: list[float], *, gears: str | None = None, model: str = GATE_MODEL,
                      audit_promise: float | None = None) -> GateConfig:
    """Switch a running gate to ``thresholds`` (T_0 .. T_{K-2}; and ``gears`` when given; the drop the audit
    checks, ``audit_promise``, when given) by reloading the model that holds its parameters (the ensemble's
    gate step, or the gate). Returns its parameters as served before the switch."""
    with LittleBigClient(url, model=model) as client:
        holder = client.gate_model()
        config = client.model_config(holder)
    before = GateConfig.from_parameters({k: v["string_value"] for k, v in config.get("parameters", {}).items()})
    count = len(before.stage_models)
    if len(thresholds) != count - 1:
        raise UserError(f"the gate serves {count} stages ({', '.join(before.stage_models)}): give {count - 1} thresholds, "
                         f"got {len(thresholds)}")
    for value in thresholds:
        if not 0.0 <= value <= 1.0:
            raise UserError(f"threshold must be in [0, 1], got {value}")
    after = before.with_thresholds(thresholds, parse_ladder(gears) if gears else None)
    if audit_promise is not None:
        after = dataclasses.replace(after, audit_promise=float(audit_promise))
    config["parameters"] = {key: {"string_value": value} for key, value in after.parameters().items()}
    with grpcclient.InferenceServerClient(url) as client:
        _reload(client, url, holder, config, f"thresholds {list(thresholds)}")
    return before


def _reload(client: grpcclient.InferenceServerClient, url: str, model: str, config: dict, what: str) -> None:
    """Load ``model`` with ``config`` as an override (it replaces the whole config; everything else
    stays as served) and check it is ready."""
    Retrier(reached=True).call(lambda: client.load_model(model, config=json.dumps(config), headers=admin_headers(url)), f"reload of {model}")
    if not client.is_model_ready(model):
        raise RuntimeError(f"model {model!r} is not ready after switching to {what}")
