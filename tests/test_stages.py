"""K-stage cascades, gating signals, multi-label answers and non-image inputs through the real server,
compared row by row with the same equations computed offline (onnxruntime + the gate's signals) on
the same ONNX files: classes (or multi-hot labels), routes, confidences and probabilities.

One server serves every case: each cascade is built by the repository builder, then copied into one
repository under its own model names (the gate finds its stages through `stage_models`).
"""

from __future__ import annotations

import dataclasses
import queue
import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from littlebig.gate import signals
from littlebig.client.metrics import read_samples, sample_sum
from littlebig.contract import GATE_MODEL, GATE_STEP_MODEL, fallback_route, stage_models
from littlebig.export import ort_session
from littlebig.model_repository.builder import build_cascade, gate_config_path
from littlebig.model_repository.configs import read_config, write_config
from littlebig.model_repository.facts import RepositoryError
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.server import TritonServer

ROWS = 64
CHUNKS = (5, 1, 18, 40)  # requests of these sizes, sent together (the gate batches them into one execute)
OPTIONS = RepositoryOptions(runtime="python", intra_op_threads=1, gate_instances=1, big_nice=0, gate_queue_delay_us=20_000)


# ---------------------------------------------------------------- tiny models, exported with metadata


def _export(module, path: Path, inputs: dict[str, np.ndarray], outputs: list[str], meta: dict[str, str]) -> Path:
    import onnx
    import torch

    from littlebig.export.metadata import METADATA_PREFIX

    names = list(inputs)
    torch.onnx.export(
        module.eval(), tuple(torch.from_numpy(x[:2]) for x in inputs.values()), str(path), dynamo=False, opset_version=17,
        input_names=names, output_names=outputs, dynamic_axes={n: {0: "batch"} for n in names + outputs},
    )
    model = onnx.load(str(path))
    model.ir_version = 8
    onnx.helper.set_model_props(model, {METADATA_PREFIX + k: v for k, v in meta.items()})
    onnx.save(model, str(path))
    return path


def _module(seed: int, forward, **layers):
    """A torch module with ``layers`` (registered, so the export sees weights) and ``forward``."""
    import torch

    torch.manual_seed(seed)
    module = torch.nn.Module()
    for name, layer in layers.items():
        setattr(module, name, layer)
    module.forward = lambda *inputs: forward(module, *inputs)
    return module


def image_model(seed: int, classes: int = 5):
    """IMAGE uint8 [N, 8, 8, 3] -> PROBS (softmax), CLASS, CONFIDENCE (in-graph top-1)."""
    import torch

    def forward(m, image):
        probs = torch.softmax(10.0 * m.linear(image.float().flatten(1) / 255.0 - 0.5), dim=1)
        confidence, index = probs.max(dim=1, keepdim=True)
        return probs, index.to(torch.int64), confidence

    torch.manual_seed(seed)
    return _module(seed, forward, linear=torch.nn.Linear(8 * 8 * 3, classes))


def feature_model(seed: int, labels: int = 6):
    """FEATURES float32 [N, 12] -> PROBS (sigmoid: multi-label)."""
    import torch

    torch.manual_seed(seed)
    return _module(seed, lambda m, features: torch.sigmoid(3.0 * m.linear(features)), linear=torch.nn.Linear(12, labels))


def token_model(seed: int, classes: int = 4):
    """INPUT_IDS int64 [N, 10] and ATTENTION_MASK int64 [N, 10] -> PROBS (softmax of a masked mean embedding)."""
    import torch

    def forward(m, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        mean = (m.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.softmax(4.0 * m.linear(mean), dim=1)

    torch.manual_seed(seed)
    return _module(seed, forward, embedding=torch.nn.Embedding(50, 8), linear=torch.nn.Linear(8, classes))


@dataclasses.dataclass
class Case:
    """One cascade: its ONNX files, test inputs and every stage's probabilities computed offline."""

    files: list[Path]
    inputs: dict[str, np.ndarray]
    probs: list[np.ndarray]
    macs: list[int]


def make_case(out: Path, name: str, factory, seeds, inputs, outputs, meta) -> Case:
    files, macs = [], []
    for k, seed in enumerate(seeds):
        macs.append(1000 * 4**k)
        files.append(_export(factory(seed), out / f"{name}{k}.onnx", inputs, outputs, meta | {"macs": str(macs[-1])}))
    probs = [ort_session(f, threads=1).run(["PROBS"], inputs)[0] for f in files]
    return Case(files, inputs, probs, macs)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    out = tmp_path_factory.mktemp("stages")
    rng = np.random.default_rng(3)
    image = {"IMAGE": rng.integers(0, 256, size=(ROWS, 8, 8, 3), dtype=np.uint8)}
    features = {"FEATURES": rng.normal(size=(ROWS, 12)).astype(np.float32)}
    mask = (np.arange(10)[None, :] < rng.integers(1, 11, size=(ROWS, 1))).astype(np.int64)
    tokens = {"INPUT_IDS": rng.integers(0, 50, size=(ROWS, 10)).astype(np.int64), "ATTENTION_MASK": mask}
    top1 = ["PROBS", "CLASS", "CONFIDENCE"]
    return {
        "img": make_case(out, "img", image_model, (11, 12, 13), image, top1, {"num_classes": "5", "wire_size": "8"}),
        "ml": make_case(out, "ml", feature_model, (21, 22, 23), features, ["PROBS"], {"num_classes": "6", "task": "multilabel"}),
        "tok": make_case(out, "tok", token_model, (31, 32), tokens, ["PROBS"], {"num_classes": "4"}),
    }


# ---------------------------------------------------------------- the offline cascade


@dataclasses.dataclass
class Expected:
    answer: np.ndarray  # class [N] or multi-hot labels [N, C]
    confidence: np.ndarray
    route: np.ndarray
    probs: np.ndarray


def offline(case: Case, thresholds, signal: str, multilabel: bool = False) -> Expected:
    """Stage k answers a row when its signal >= T_k (k < K-1); the last stage answers the rest."""
    count = len(case.probs)
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (ROWS, count - 1))
    route = np.full(ROWS, count - 1, dtype=np.int32)
    open_rows = np.ones(ROWS, dtype=bool)
    for k in range(count - 1):
        settle = open_rows & (signals.signal(signal, case.probs[k]) >= thresholds[:, k])
        route[settle] = k
        open_rows &= ~settle
    probs = np.stack(case.probs)[route, np.arange(ROWS)]
    answer = (probs >= 0.5).astype(np.int32) if multilabel else probs.argmax(1)
    return Expected(answer, signals.signal(signal, probs), route, probs)


def spread_thresholds(case: Case, signal: str, quantile: float = 0.5) -> tuple[float, ...]:
    """Each T_k at a quantile of the signal of the rows still open, so every stage answers some rows."""
    open_rows, chosen = np.ones(ROWS, dtype=bool), []
    for probs in case.probs[:-1]:
        confidence = signals.signal(signal, probs)
        chosen.append(float(np.quantile(confidence[open_rows], quantile)))
        open_rows &= confidence < chosen[-1]
    return tuple(chosen)


# ---------------------------------------------------------------- one repository, one server

GATES = {
    # gate name: (case, signal, little inside the gate or the ensemble's step before it)
    "img3": ("img", "max_softmax", False),
    "img3_margin": ("img", "margin", True),
    "ml3": ("ml", "mean_abs_margin", False),
    "tok2": ("tok", "entropy", True),
}


def add_cascade(repo: Path, built: Path, gate: str, stages: int, stage_names: list[str] | None = None) -> None:
    """Copy a built cascade into ``repo``: its stages as <gate>_<stage> (unless ``stage_names`` names
    models already there), its gate model as <gate>_gate, the ensemble clients call as ``gate``."""
    names = stage_names or [f"{gate}_{n}" for n in stage_models(stages)]
    renamed = {**dict(zip(stage_models(stages), names)), GATE_STEP_MODEL: f"{gate}_gate"}

    def copy(source: str, name: str) -> mc.ModelConfig:
        shutil.copytree(built / source, repo / name)
        config = read_config(repo / name / "config.pbtxt")
        config.name = name
        return config

    for source, name in zip(stage_models(stages), names) if stage_names is None else ():
        write_config(repo / name, copy(source, name))
    step = copy(GATE_STEP_MODEL, f"{gate}_gate")
    step.parameters["stage_models"].string_value = ",".join(names)
    if "little_onnx" in step.parameters:  # little in the gate: its ONNX file, relative to the repository
        step.parameters["little_onnx"].string_value = f"{names[0]}/1/model.onnx"
    write_config(repo / f"{gate}_gate", step)
    ensemble = copy(GATE_MODEL, gate)
    for model in ensemble.ensemble_scheduling.step:
        model.model_name = renamed[model.model_name]
    write_config(repo / gate, ensemble)


@pytest.fixture(scope="module")
def thresholds(cases) -> dict[str, tuple[float, ...]]:
    return {gate: spread_thresholds(cases[case], signal) for gate, (case, signal, _) in GATES.items()}


@pytest.fixture(scope="module")
def stage_server(cases, thresholds, tmp_path_factory):
    work = tmp_path_factory.mktemp("stage-repos")
    repo = work / "repository"
    repo.mkdir()
    for gate, (case, signal, in_gate) in GATES.items():
        options = dataclasses.replace(OPTIONS, thresholds=thresholds[gate], signal=signal, little_in_gate=in_gate)
        built = build_cascade(cases[case].files, work / gate, options)
        add_cascade(repo, built, gate, len(cases[case].files))
    # A cascade whose last stage is missing: rows it would answer fail, or fall back to stage 1.
    add_cascade(repo, work / "img3", "img3_broken", 3, ["img3_little", "img3_stage1", "img3_missing"])
    with TritonServer(repo, log_file=work / "tritonserver.log") as server:
        yield server


def infer(server, gate: str, inputs: dict[str, np.ndarray], parameters=None, outputs=("CLASS", "CONFIDENCE", "ROUTE", "PROBS")):
    """Send the rows as several requests at once (the gate batches them); returns outputs concatenated."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results, ends, answered = {}, np.cumsum(CHUNKS), queue.Queue()
    for index, (end, size) in enumerate(zip(ends, CHUNKS)):
        tensors = []
        for name, array in inputs.items():
            tensor = grpcclient.InferInput(name, [size, *array.shape[1:]], {np.uint8: "UINT8", np.int64: "INT64", np.float32: "FP32"}[array.dtype.type])
            tensor.set_data_from_numpy(array[end - size : end])
            tensors.append(tensor)

        def done(result, error, index=index):
            results[index] = error or result
            answered.put(index)

        client.async_infer(gate, tensors, done, outputs=[grpcclient.InferRequestedOutput(o) for o in outputs], parameters=parameters)
    for _ in CHUNKS:
        answered.get(timeout=60)
    client.close()
    errors = [r for r in results.values() if isinstance(r, InferenceServerException)]
    if errors:
        raise errors[0]
    return {o: np.concatenate([results[i].as_numpy(o) for i in range(len(CHUNKS))]) for o in outputs}


def assert_served(got: dict[str, np.ndarray], expected: Expected, stages: int, multilabel: bool = False) -> None:
    assert set(np.unique(expected.route)) == set(range(stages)), "the test data must reach every stage"
    np.testing.assert_array_equal(got["ROUTE"][:, 0], expected.route)
    if multilabel:
        assert got["LABELS"].dtype == np.int32
        np.testing.assert_array_equal(got["LABELS"], expected.answer)
    else:
        np.testing.assert_array_equal(got["CLASS"][:, 0], expected.answer)
    np.testing.assert_allclose(got["CONFIDENCE"][:, 0], expected.confidence, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["PROBS"], expected.probs, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the cases


def test_three_stages_with_config_thresholds(stage_server, cases, thresholds):
    got = infer(stage_server, "img3", cases["img"].inputs)
    assert_served(got, offline(cases["img"], thresholds["img3"], "max_softmax"), 3)


def test_three_stages_without_probs_use_the_in_graph_top1(stage_server, cases, thresholds):
    got = infer(stage_server, "img3", cases["img"].inputs, outputs=("CLASS", "CONFIDENCE", "ROUTE"))
    expected = offline(cases["img"], thresholds["img3"], "max_softmax")
    np.testing.assert_array_equal(got["ROUTE"][:, 0], expected.route)
    np.testing.assert_array_equal(got["CLASS"][:, 0], expected.answer)


def test_request_thresholds_override_and_stage_metrics(stage_server, cases):
    case = cases["img"]
    chosen = spread_thresholds(case, "margin", quantile=0.3)  # not the config's
    before = read_samples(stage_server.metrics_url, "littlebig_", settle=True)
    got = infer(stage_server, "img3_margin", case.inputs, parameters={"thresholds": ",".join(map(repr, chosen))})
    expected = offline(case, chosen, "margin")
    assert_served(got, expected, 3)
    after = read_samples(stage_server.metrics_url, "littlebig_", settle=True)

    def delta(name, **labels):
        return sample_sum(after, name, model="img3_margin_gate", **labels) - sample_sum(before, name, model="img3_margin_gate", **labels)

    for k, role in enumerate(stage_models(3)):
        assert delta("littlebig_rows_total", route=role) == (expected.route == k).sum()
    ran = [(expected.route >= k).sum() for k in range(3)]  # stage k runs on the rows stages < k left open
    assert delta("littlebig_macs_total") == sum(n * macs for n, macs in zip(ran, case.macs))


def test_config_signal_margin(stage_server, cases, thresholds):
    got = infer(stage_server, "img3_margin", cases["img"].inputs)
    assert_served(got, offline(cases["img"], thresholds["img3_margin"], "margin"), 3)


def test_multilabel_float_features_answer_labels(stage_server, cases, thresholds):
    got = infer(stage_server, "ml3", cases["ml"].inputs, outputs=("LABELS", "CONFIDENCE", "ROUTE", "PROBS"))
    assert_served(got, offline(cases["ml"], thresholds["ml3"], "mean_abs_margin", multilabel=True), 3, multilabel=True)


def test_token_inputs_and_entropy_signal(stage_server, cases, thresholds):
    got = infer(stage_server, "tok2", cases["tok"].inputs)
    assert_served(got, offline(cases["tok"], thresholds["tok2"], "entropy"), 2)
    # Two stages keep the two-stage request parameter.
    got = infer(stage_server, "tok2", cases["tok"].inputs, parameters={"threshold": 0.0})
    assert (got["ROUTE"] == 0).all()


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"thresholds": "0.5"}, "2 comma-separated numbers"),
        ({"thresholds": "0.5,0.2,0.1"}, "2 comma-separated numbers"),
        ({"thresholds": "0.5,1.5"}, "must be in"),
        ({"thresholds": "0.5,abc"}, "must be a number"),
        ({"threshold": "0.5"}, "send 'thresholds'"),
        ({"threshold": "0.5", "thresholds": "0.5,0.5"}, "not both"),
    ],
)
def test_bad_thresholds_are_invalid_arg(stage_server, cases, parameters, message):
    client = grpcclient.InferenceServerClient(stage_server.grpc_url)
    tensor = grpcclient.InferInput("IMAGE", [2, 8, 8, 3], "UINT8")
    tensor.set_data_from_numpy(cases["img"].inputs["IMAGE"][:2])
    with pytest.raises(InferenceServerException, match=message) as failed:
        client.infer("img3", [tensor], parameters=parameters)
    assert failed.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_failed_last_stage_falls_back_to_stage1_route_k_plus_k(stage_server, cases, thresholds):
    case = cases["img"]
    expected = offline(case, thresholds["img3"], "max_softmax")
    got = infer(stage_server, "img3_broken", case.inputs, parameters={"on_big_failure": "little"})
    # Rows the missing big would answer get stage 1's answer, ROUTE = K + 1.
    route = np.where(expected.route == 2, fallback_route(1, 3), expected.route)
    np.testing.assert_array_equal(got["ROUTE"][:, 0], route)
    fallback = expected.route == 2
    np.testing.assert_allclose(got["PROBS"][fallback], case.probs[1][fallback], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got["CLASS"][~fallback, 0], expected.answer[~fallback])
    with pytest.raises(InferenceServerException, match="img3_missing") as failed:
        infer(stage_server, "img3_broken", case.inputs)
    assert failed.value.status() == "StatusCode.UNAVAILABLE"


def test_supervisor_canary_sends_a_blank_row_of_any_input(stage_server):
    from littlebig.serving.supervisor import Supervisor

    supervisor = Supervisor(stage_server)
    for model in ("img3_little", "ml3_stage1", "tok2_big"):
        assert supervisor.canary(model) is None, model


def test_one_threshold_for_a_k_stage_gate_is_refused_and_text_gates_describe_themselves(stage_server, thresholds):
    from littlebig.client.control import served_thresholds, switch_threshold
    from littlebig.client.infer import LittleBigClient

    assert served_thresholds(stage_server.grpc_url, model="img3") == pytest.approx(thresholds["img3"])
    assert len(thresholds["img3"]) == 2
    with pytest.raises(ValueError, match=r"the gate serves 3 stages .* it takes 2 thresholds, not one"):
        switch_threshold(stage_server.grpc_url, 0.3, model="img3")
    with LittleBigClient(stage_server.grpc_url, model="tok2") as client:
        info = client.gate_info()  # token inputs: no wire size
        assert info.wire_size is None and len(info.thresholds) == 1
        with pytest.raises(ValueError, match="take no images"):
            client.classify([np.zeros((8, 8, 3), np.uint8)])
        with pytest.raises(ValueError, match=r"pass \[image\] for a single image"):
            client.classify(np.zeros((8, 8, 3), np.uint8))


def test_classify_names_the_stage_that_answered(stage_server, cases):
    from littlebig.client.infer import LittleBigClient

    with LittleBigClient(stage_server.grpc_url, model="img3") as client:
        predictions = client.classify(cases["img"].inputs["IMAGE"][:64])
    assert {p.route for p in predictions} == {0, 1, 2}
    assert [p.route_name for p in predictions] == [("little", "stage1", "big")[p.route] for p in predictions]


# ---------------------------------------------------------------- the builder's checks (no server)


def test_builder_refuses_mismatched_inputs_and_counts(cases, tmp_path):
    with pytest.raises(RepositoryError, match=r"inputs differ: little .* IMAGE UINT8 \[8, 8, 3\].* stage1 .*FEATURES"):
        build_cascade([cases["img"].files[0], cases["ml"].files[0], cases["img"].files[2]], tmp_path / "r", OPTIONS)
    with pytest.raises(RepositoryError, match="3 stages needs 2 thresholds"):
        build_cascade(cases["img"].files, tmp_path / "r", dataclasses.replace(OPTIONS, thresholds=(0.5,)))
    with pytest.raises(RepositoryError, match="does not suit multilabel"):
        build_cascade(cases["ml"].files[:2], tmp_path / "r", dataclasses.replace(OPTIONS, signal="max_softmax"))


def test_builder_declares_every_input_and_the_multilabel_outputs(cases, tmp_path):
    repo = build_cascade(cases["tok"].files, tmp_path / "tok", OPTIONS)
    for model in ("little", "big", GATE_MODEL):
        config = read_config(repo / model / "config.pbtxt")
        assert [(i.name, list(i.dims)) for i in config.input] == [("INPUT_IDS", [10]), ("ATTENTION_MASK", [10])]
    repo = build_cascade(cases["ml"].files, tmp_path / "ml", dataclasses.replace(OPTIONS, thresholds=(0.3, 0.2)))
    gate = read_config(repo / GATE_MODEL / "config.pbtxt")
    assert [o.name for o in gate.output] == ["LABELS", "CONFIDENCE", "ROUTE", "PROBS", "THRESHOLD"]
    params = {k: v.string_value for k, v in read_config(gate_config_path(repo)).parameters.items()}
    assert params["stage_models"] == "little,stage1,big" and params["thresholds"] == "0.3,0.2"
    assert params["signal"] == "mean_abs_margin" and params["task"] == "multilabel" and "threshold" not in params
    assert params["stage_macs"] == ",".join(map(str, cases["ml"].macs))


def test_repo_command_builds_k_stages(cases, tmp_path, capsys):
    from littlebig.cli import main

    files = [str(f) for f in cases["img"].files]
    main(["repo", "--models", *files, "--thresholds", "0.6,0.4", "--signal", "entropy", "--out", str(tmp_path / "repo")])
    assert "little, stage1, big, gate, and the ensemble littlebig" in capsys.readouterr().out
    params = read_config(gate_config_path(tmp_path / "repo")).parameters
    assert params["thresholds"].string_value == "0.6,0.4" and params["signal"].string_value == "entropy"
    for argv, message in (
        (["--models", *files, "--little", files[0]], "either --models"),
        (["--models", *files, "--thresholds", "0.6"], "needs 2 thresholds"),
        (["--models", *files, "--thresholds", "0.6,x"], "comma-separated numbers"),
    ):
        with pytest.raises(SystemExit):
            main(["repo", *argv, "--out", str(tmp_path / "bad")])
        assert message in capsys.readouterr().err
