"""Show or switch the served threshold with no downtime.

Switching reloads the gate through Triton's repository API with a config override (explicit model
control): Triton keeps serving with the old gate until the new one is ready, then swaps. The
repository's config.pbtxt is rewritten too, so a restart keeps the new T.
"""

from __future__ import annotations

import json
from pathlib import Path

import tritonclient.grpc as grpcclient

from .admin import admin_headers
from .infer import GATE_MODEL, LittleBigClient


def served_threshold(url: str, model: str = GATE_MODEL) -> float:
    with LittleBigClient(url, model=model) as client:
        return client.gate_info().threshold


def apply_threshold(
    url: str, threshold: float, *, repository: str | Path | None = None, model: str = GATE_MODEL, persist: bool = True
) -> Path | None:
    """Switch the running gate to ``threshold``; with ``persist``, write it into the repository's config.pbtxt.

    The repository is ``repository`` or else the path the gate's config records (``repository_path``)
    when it exists on this machine. Returns the config file written, or None.
    """
    from littlebig.model_repository.builder import RepositoryError, set_threshold

    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    with grpcclient.InferenceServerClient(url) as client:
        config = client.get_model_config(model, as_json=True)["config"]
        params = config.setdefault("parameters", {})
        params["threshold"] = {"string_value": repr(float(threshold))}
        # A config override replaces the whole config; everything else stays as served.
        client.load_model(model, config=json.dumps(config), headers=admin_headers(url))
        if not client.is_model_ready(model):
            raise RuntimeError(f"model {model!r} is not ready after switching to threshold {threshold}")

    if not persist:
        return None
    if repository is None and "repository_path" in params:
        recorded = Path(params["repository_path"]["string_value"])
        repository = recorded if (recorded / model / "config.pbtxt").is_file() else None
    if repository is None:
        return None
    try:
        set_threshold(repository, threshold)
    except RepositoryError as err:
        raise RuntimeError(f"the server runs T={threshold}, but the repository was not updated: {err}") from err
    return Path(repository) / model / "config.pbtxt"
