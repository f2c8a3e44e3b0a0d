"""The self-contained gate file and littlebig.contract must agree (the gate cannot import it: it runs
unchanged in the NGC container). Read from the gate's source, not by importing it."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from littlebig import contract, signals
from littlebig.model_repository.builder import RepositoryOptions, build_repository, read_config

GATE_FILE = Path(contract.__file__).resolve().parent.parent / "model_repository" / "littlebig" / "1" / "model.py"
TREE = ast.parse(GATE_FILE.read_text())


def gate_constant(name: str):
    for node in TREE.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"the gate defines no {name}")


def gate_strings_in_calls(function: str, position: int = 0) -> set[str]:
    """String arguments at ``position`` of every call to ``function`` (e.g. params.get, pb_utils.Tensor)."""
    found = set()
    for node in ast.walk(TREE):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(function) and len(node.args) > position:
            argument = node.args[position]
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                found.add(argument.value)
    return found


def test_routes_and_parameter_keys_agree():
    assert gate_constant("ROUTE_LITTLE") == contract.Route.LITTLE
    assert gate_constant("ROUTE_BIG") == contract.Route.BIG
    assert gate_constant("ROUTE_LITTLE_FALLBACK") == contract.Route.LITTLE_FALLBACK
    assert tuple(gate_constant("REQUEST_PARAMETERS")) == contract.REQUEST_PARAMETERS
    assert tuple(gate_constant("ON_BIG_FAILURE")) == contract.ON_BIG_FAILURE
    assert tuple(gate_constant("TASKS")) == contract.TASKS
    assert tuple(gate_constant("SIGNALS")) == signals.SIGNALS
    assert gate_constant("MULTILABEL_CUT") == contract.MULTILABEL_CUT
    read = gate_strings_in_calls("params.get") | {
        node.slice.value for node in ast.walk(TREE)
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "params" and isinstance(node.slice, ast.Constant)
    }
    assert read <= set(contract.CONFIG_PARAMETERS), read - set(contract.CONFIG_PARAMETERS)


def test_metrics_interval_default_agrees():
    defaults = [
        node.args[1].value for node in ast.walk(TREE)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "params.get" and len(node.args) == 2
        and isinstance(node.args[0], ast.Constant) and node.args[0].value == "metrics_interval_ms"
    ]
    assert defaults == [str(contract.METRICS_INTERVAL_MS)]


def test_tensor_names_agree():
    # Inputs are forwarded by the names the config declares: the gate names none of its own.
    assert gate_strings_in_calls("pb_utils.Tensor") == {
        contract.CLASS, contract.LABELS, contract.CONFIDENCE, contract.ROUTE, contract.PROBS, contract.THRESHOLD
    }
    assert gate_strings_in_calls("get_input_tensor_by_name", 1) == set()


def test_stage_roles_and_fallback_routes_agree():
    roles = gate_function("stage_roles", {})
    for count in (2, 3, 5):
        assert roles(count) == contract.stage_models(count)
    assert contract.fallback_route(0, 2) == contract.Route.LITTLE_FALLBACK
    labels = [contract.route_label(r, 3) for r in range(5)]
    assert labels == ["little", "stage1", "big", "little (stage1 failed)", "stage1 (big failed)"]
    assert contract.route_label(contract.fallback_route(1, 3), 3) == "stage1 (big failed)"
    assert contract.route_label(2) == "little (big failed)"


def gate_function(name: str, namespace: dict):
    """A top-level function of the gate, run from its own source."""
    source = next(n for n in TREE.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module([source], []), str(GATE_FILE), "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize("classes", [2, 5, 1000])
def test_signal_formulas_agree(classes):
    """The gate's copies of the signals give littlebig.signals' numbers on random probabilities
    (softmax rows with ties and exact zeros, and sigmoid rows)."""
    rng = np.random.default_rng(classes)
    logits = rng.normal(scale=4.0, size=(200, classes)).astype(np.float32)
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    softmax[:5] = 0.0
    softmax[:5, 0] = 1.0  # one-hot rows: 0 log 0 = 0
    softmax[5] = 1.0 / classes  # uniform: top-1 and top-2 tie
    sigmoid = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    for name in signals.SIGNALS:
        gate_signal = gate_function(name, {"np": np})
        for probs in (softmax, sigmoid):
            expected = signals.signal(name, probs)
            np.testing.assert_array_equal(gate_signal(probs), expected)
            assert expected.dtype == np.float64
    np.testing.assert_allclose(signals.entropy(softmax[:6]), [1, 1, 1, 1, 1, 0], atol=1e-6)
    np.testing.assert_allclose(signals.margin(softmax[5:6]), [0.0])


@pytest.mark.parametrize(
    "value, count",
    [("0.5,0.25", 2), ("0.5", 2), ("0.5,0.25,0.1", 2), (" 0.5 , 1 ", 2), ("0.5,abc", 2), ("0.5,", 2), (0.3, 1), ("0.3", 1),
     (True, 1), (None, 1), ("0.5,1.5", 2), ("nan,0", 2), ("", 1)],
)
def test_thresholds_rule_agrees(value, count):
    """The gate's parse_thresholds accepts and refuses what the contract's does."""
    namespace = {"math": math, "RequestError": ValueError}
    gate_function("parse_threshold", namespace)
    outcomes = []
    for parse in (gate_function("parse_thresholds", namespace), contract.parse_thresholds):
        try:
            outcomes.append(parse(value, count, "test"))
        except ValueError as err:
            outcomes.append(type(err))
    assert outcomes[0] == outcomes[1]


def test_builder_writes_only_contract_parameters_and_outputs(pair, tmp_path):
    repo = build_repository(pair.little, pair.big, tmp_path / "repo", RepositoryOptions())
    gate = read_config(repo / contract.GATE_MODEL / "config.pbtxt")
    assert set(gate.parameters) <= set(contract.CONFIG_PARAMETERS)
    assert tuple(o.name for o in gate.output) == contract.GATE_OUTPUTS
    assert {m.name for m in repo.iterdir()} >= {contract.GATE_MODEL, contract.LITTLE_MODEL, contract.BIG_MODEL}


RUNTIME_FILE = GATE_FILE.parent.parent.parent / "python_runtime" / "1" / "model.py"


def test_runtime_parameters_agree(pair, tmp_path):
    """What the builder writes into a python-runtime stage's config is what the runtime reads."""
    runtime = ast.parse(RUNTIME_FILE.read_text())
    read = {
        node.args[0].value for node in ast.walk(runtime)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "params.get" and isinstance(node.args[0], ast.Constant)
    }
    assert read == set(contract.RUNTIME_PARAMETERS)
    repo = build_repository(pair.little, pair.big, tmp_path / "repo", RepositoryOptions(runtime="python"))
    for stage in (contract.LITTLE_MODEL, contract.BIG_MODEL):
        written = set(read_config(repo / stage / "config.pbtxt").parameters)
        assert written == {*contract.RUNTIME_PARAMETERS, contract.STAGE_MACS, contract.STAGE_SHA256}, stage


@pytest.mark.parametrize("value", [0, 1, 0.5, "0.25", " 1 ", "1e-3", True, False, None, "abc", "", 1.5, -0.1, math.nan, math.inf, "nan", [0.5]])
def test_threshold_rule_agrees(value):
    """The gate's parse_threshold, run from its own source, accepts and refuses what the contract does."""
    source = next(n for n in TREE.body if isinstance(n, ast.FunctionDef) and n.name == "parse_threshold")
    namespace = {"math": math, "RequestError": ValueError}
    exec(compile(ast.Module([source], []), str(GATE_FILE), "exec"), namespace)
    outcomes = []
    for parse in (namespace["parse_threshold"], contract.parse_threshold):
        try:
            outcomes.append(parse(value, "test"))
        except ValueError as err:
            outcomes.append(type(err))
    assert outcomes[0] == outcomes[1]
