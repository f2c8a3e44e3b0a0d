"""The self-contained gate file and littlebig.contract must agree (the gate cannot import it: it runs
unchanged in the NGC container). Read from the gate's source, not by importing it."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from littlebig import contract
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
    read = gate_strings_in_calls("params.get") | {
        node.slice.value for node in ast.walk(TREE)
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "params" and isinstance(node.slice, ast.Constant)
    }
    assert read <= set(contract.CONFIG_PARAMETERS), read - set(contract.CONFIG_PARAMETERS)


def test_tensor_names_agree():
    assert gate_strings_in_calls("pb_utils.Tensor") == {*contract.GATE_OUTPUTS, contract.IMAGE}
    assert gate_strings_in_calls("get_input_tensor_by_name", 1) == {contract.IMAGE}


def test_builder_writes_only_contract_parameters_and_outputs(pair, tmp_path):
    repo = build_repository(pair.little, pair.big, tmp_path / "repo", RepositoryOptions())
    gate = read_config(repo / contract.GATE_MODEL / "config.pbtxt")
    assert set(gate.parameters) <= set(contract.CONFIG_PARAMETERS)
    assert tuple(o.name for o in gate.output) == contract.GATE_OUTPUTS
    assert {m.name for m in repo.iterdir()} >= {contract.GATE_MODEL, contract.LITTLE_MODEL, contract.BIG_MODEL}


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
