"""The gate package is self-contained (it runs unchanged in the NGC container), the package imports its
rules instead of copying them, and the builder writes what the gate and the runtime read."""

from __future__ import annotations

import ast
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from littlebig import contract
from littlebig import gate
from littlebig.model_repository.builder import build_repository
from littlebig.model_repository.configs import read_config
from littlebig.model_repository.options import RepositoryOptions
from littlebig.gate import signals
from littlebig.gate.config import ConfigError, GateConfig

GATE_DIR = Path(gate.__file__).parent
# What a module of the gate may import: its own siblings (relatively), the standard library, numpy,
# Triton's python backend utilities, and onnxruntime (little in the gate only).
THIRD_PARTY = {"numpy", "triton_python_backend_utils", "onnxruntime"}


def imports(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import in ``path`` (level > 0: relative)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


@pytest.mark.parametrize("module", sorted(p.name for p in GATE_DIR.glob("*.py")))
def test_the_gate_imports_only_its_siblings_numpy_and_the_backend(module):
    for level, name in imports(GATE_DIR / module):
        if level:
            assert level == 1 and "." not in name, (module, name)
        else:
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or top in THIRD_PARTY, (module, name)


def test_the_package_uses_the_gates_own_names_and_rules():
    assert contract.PROBS is gate.config.PROBS and contract.GATE_OUTPUTS is gate.config.GATE_OUTPUTS
    assert contract.parse_threshold is gate.config.parse_threshold
    assert contract.Route.LITTLE_FALLBACK == gate.config.ROUTE_LITTLE_FALLBACK == contract.fallback_route(0, 2)
    # the host imported the pure modules without Triton's backend utilities
    assert "triton_python_backend_utils" not in sys.modules


def test_stage_roles_and_fallback_routes():
    for count in (2, 3, 5):
        assert contract.stage_models(count) == gate.config.stage_roles(count)
    labels = [contract.route_label(r, 3) for r in range(5)]
    assert labels == ["little", "stage1", "big", "little (stage1 failed)", "stage1 (big failed)"]
    assert contract.route_label(contract.fallback_route(1, 3), 3) == "stage1 (big failed)"
    assert contract.route_label(2) == "little (big failed)"


@pytest.mark.parametrize("classes", [2, 5, 1000])
def test_signal_formulas(classes):
    """One-hot rows, uniform rows and sigmoid rows give the documented values, as float64."""
    rng = np.random.default_rng(classes)
    logits = rng.normal(scale=4.0, size=(200, classes)).astype(np.float32)
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    softmax[:5] = 0.0
    softmax[:5, 0] = 1.0  # one-hot rows: 0 log 0 = 0
    softmax[5] = 1.0 / classes  # uniform: top-1 and top-2 tie
    for name in signals.SIGNALS:
        values = signals.signal(name, softmax)
        assert values.dtype == np.float64 and values.shape == (200,)
    np.testing.assert_allclose(signals.entropy(softmax[:6]), [1, 1, 1, 1, 1, 0], atol=1e-6)
    np.testing.assert_allclose(signals.margin(softmax[5:6]), [0.0])
    np.testing.assert_allclose(signals.max_softmax(softmax[:5]), 1.0)
    np.testing.assert_allclose(signals.mean_abs_margin(np.full((1, classes), 0.5, np.float32)), [0.0])
    with pytest.raises(ValueError, match="signal must be one of"):
        signals.signal("confidence", softmax)


@pytest.mark.parametrize(
    "value, count, expected",
    [("0.5,0.25", 2, (0.5, 0.25)), ("0.5", 2, None), ("0.5,0.25,0.1", 2, None), (" 0.5 , 1 ", 2, (0.5, 1.0)),
     ("0.5,abc", 2, None), ("0.5,", 2, None), (0.3, 1, (0.3,)), ("0.3", 1, (0.3,)), (True, 1, None), (None, 1, None),
     ("0.5,1.5", 2, None), ("nan,0", 2, None), ("", 1, None), ("1e-3", 1, (0.001,)), (math.inf, 1, None), ([0.5], 1, None)],
)
def test_threshold_rule(value, count, expected):
    if expected is None:
        with pytest.raises(ValueError, match="threshold"):
            contract.parse_thresholds(value, count, "test")
    else:
        assert contract.parse_thresholds(value, count, "test") == expected


@pytest.mark.parametrize("little_in_gate", [False, True])
def test_the_builder_writes_the_gate_parameters_through_gate_config(pair, tmp_path, little_in_gate):
    """What the builder writes parses back to the same GateConfig, the gate's outputs are the contract's,
    and the gate's version folder holds the whole gate package."""
    repo = build_repository(pair.little, pair.big, tmp_path / "repo", RepositoryOptions(little_in_gate=little_in_gate))
    served = read_config(repo / contract.GATE_MODEL / "config.pbtxt")
    assert served.platform == "ensemble"
    gate = read_config(repo / contract.GATE_STEP_MODEL / "config.pbtxt")
    params = {key: value.string_value for key, value in gate.parameters.items()}
    settings = GateConfig.from_parameters(params)
    assert settings.parameters() == params
    assert settings.little_in_gate == little_in_gate
    assert settings.stage_models == (contract.LITTLE_MODEL, contract.BIG_MODEL)
    assert tuple(o.name for o in served.output) == contract.GATE_OUTPUTS
    assert sorted(p.name for p in (repo / contract.GATE_STEP_MODEL / "1").glob("*.py")) == sorted(p.name for p in GATE_DIR.glob("*.py"))
    steps = [contract.GATE_STEP_MODEL] if little_in_gate else [contract.LITTLE_MODEL, contract.GATE_STEP_MODEL]
    assert [s.model_name for s in served.ensemble_scheduling.step] == steps


def test_gate_config_refuses_what_cannot_work():
    base = GateConfig(("a", "b"), (1, 2), (0.5,))
    assert base.signal == "max_softmax" and GateConfig.from_parameters(base.parameters()) == base
    for change, message in (
        ({"thresholds": (0.5, 0.2)}, "2 values for 2 stages"),
        ({"signal": "mean_abs_margin"}, "signal for multiclass"),
        ({"ensemble_weight": 1.5}, "ensemble weight"),
        ({"little_in_gate": True}, "little_onnx"),
        ({"gears": ((0.4, 0.0),)}, "start at the threshold"),
        ({"latency_target_ms": 100.0}, "needs gears"),
        ({"gears": ((0.5, 0.0), (0.3, 0.01)), "gear_deadline_ms": 40_000.0}, "below the child timeout"),
    ):
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(base, **change)
    with pytest.raises(ConfigError, match="unknown config parameter"):
        GateConfig.from_parameters({**base.parameters(), "treshold": "0.3"})
    assert GateConfig.from_parameters({**base.parameters(), "EXECUTION_ENV_PATH": "x"}) == base  # the backend's own
    moved = dataclasses.replace(base, gears=((0.5, 0.0), (0.3, 0.01)), latency_target_ms=100.0).with_thresholds((0.4,))
    assert moved.gears == () and moved.latency_target_ms == 0.0  # a ladder from another T goes


RUNTIME_FILES = {
    "python": (GATE_DIR.parent / "python_runtime" / "1" / "model.py", contract.RUNTIME_PARAMETERS),
    "torch": (GATE_DIR.parent / "torch_runtime" / "1" / "model.py", contract.TORCH_RUNTIME_PARAMETERS),
}


@pytest.mark.parametrize("runtime", sorted(RUNTIME_FILES))
def test_runtime_parameters_agree(pair, tmp_path, runtime):
    """What the builder writes into a python-backend stage's config is what its runtime reads."""
    source, parameters = RUNTIME_FILES[runtime]
    read = {
        node.args[0].value for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "params.get" and isinstance(node.args[0], ast.Constant)
    }
    assert read == set(parameters)
    repo = build_repository(pair.little, pair.big, tmp_path / "repo", RepositoryOptions(runtime=runtime))
    for stage in (contract.LITTLE_MODEL, contract.BIG_MODEL):
        written = set(read_config(repo / stage / "config.pbtxt").parameters)
        assert written == {*parameters, contract.STAGE_MACS, contract.STAGE_SHA256}, stage
