"""Show or switch the served threshold with no downtime.

Switching reloads the gate through Triton's repository API with a config override (explicit model
control): Triton keeps serving with the old gate until the new one is ready, then swaps. This only
changes the running server; writing T into a repository on disk is a separate step
(`model_repository.builder.set_threshold`), so a restart keeps it. The two are called side by side by
`littlebig threshold` and `littlebig calibrate --apply`; nothing the server says decides where the
client writes.
"""

from __future__ import annotations

import json

import tritonclient.grpc as grpcclient

from .admin import admin_headers
from littlebig.contract import GEARS, served_stages

from .infer import GATE_MODEL, LittleBigClient


def served_threshold(url: str, model: str = GATE_MODEL) -> float:
    return served_thresholds(url, model)[0]


def served_thresholds(url: str, model: str = GATE_MODEL) -> tuple[float, ...]:
    """T_0 .. T_{K-2} of the served gate (two stages: its one T)."""
    with LittleBigClient(url, model=model) as client:
        return client.gate_info().thresholds


def switch_threshold(url: str, threshold: float, *, gears: str | None = None, model: str = GATE_MODEL) -> None:
    """Switch the running gate to ``threshold`` (a reload with a config override; no downtime), and to
    ``gears`` (the gate's ladder parameter, starting at ``threshold``) when given."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    with grpcclient.InferenceServerClient(url) as client:
        config = client.get_model_config(model, as_json=True)["config"]
        parameters = config.setdefault("parameters", {})
        stages = served_stages({k: v["string_value"] for k, v in parameters.items()})
        if len(stages) != 2:
            raise ValueError(f"the gate serves {len(stages)} stages ({', '.join(stages)}): it takes "
                             f"{len(stages) - 1} thresholds, not one (calibrate --apply, or switch_thresholds)")
        parameters["threshold"] = {"string_value": repr(float(threshold))}
        set_gears(parameters, threshold, gears)
        _reload(client, url, model, config, f"threshold {threshold}")


def switch_thresholds(url: str, thresholds: list[float], *, model: str = GATE_MODEL) -> dict:
    """Switch a running K-stage gate to ``thresholds`` (two stages: switch_threshold). Returns the gate's
    config parameters as served before the switch."""
    with grpcclient.InferenceServerClient(url) as client:
        config = client.get_model_config(model, as_json=True)["config"]
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    stages = served_stages(params)
    if len(thresholds) != len(stages) - 1:
        raise ValueError(f"the gate serves {len(stages)} stages ({', '.join(stages)}): give {len(stages) - 1} thresholds, got {len(thresholds)}")
    if len(stages) == 2:
        switch_threshold(url, thresholds[0], model=model)
        return params
    for value in thresholds:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {value}")
    config["parameters"]["thresholds"] = {"string_value": ",".join(repr(float(t)) for t in thresholds)}
    config["parameters"].pop("threshold", None)
    with grpcclient.InferenceServerClient(url) as client:
        _reload(client, url, model, config, f"thresholds {thresholds}")
    return params


def _reload(client: grpcclient.InferenceServerClient, url: str, model: str, config: dict, what: str) -> None:
    """Load ``model`` with ``config`` as an override (it replaces the whole config; everything else
    stays as served) and check it is ready."""
    client.load_model(model, config=json.dumps(config), headers=admin_headers(url))
    if not client.is_model_ready(model):
        raise RuntimeError(f"model {model!r} is not ready after switching to {what}")


def set_gears(parameters: dict, threshold: float, gears: str | None) -> None:
    """Install ``gears`` in a config's parameters (JSON form); without, drop a ladder whose top is not
    ``threshold`` (its drops were measured from another T, and the gate refuses such a ladder)."""
    if gears is not None:
        parameters[GEARS] = {"string_value": gears}
        return
    served = parameters.get(GEARS, {}).get("string_value")
    if served and float(json.loads(served)[0][0]) != float(threshold):
        del parameters[GEARS]
