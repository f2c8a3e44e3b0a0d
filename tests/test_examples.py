"""The real-data examples: their data sets, the sigmoid and token-id exports (parity, metadata, MACs)
and the offline cascade reference. Models are trained for a fraction of an epoch-budget here."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from littlebig.examples import debtext, digits
from littlebig.examples.build import build_pair, multilabel_spec, text_spec
from littlebig.examples.data import ExampleError, TensorSet, split_rows
from littlebig.examples.reference import cascade, expected_macs, micro_f1, stage_probs
from littlebig.export import ExportError, read_metadata
from littlebig.export.tensor_export import ClassifierHead, TensorModel, export_tensor_model, tensor_parity
from littlebig.gate.signals import signal as gating_signal

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="session")
def multilabel_pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("multilabel")
    return out, build_pair(multilabel_spec(seed=0, epoch_scale=0.2), out, **QUIET)


@pytest.fixture(scope="session")
def text_pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("text")
    try:
        spec = text_spec(seed=0, epoch_scale=0.2, per_section=150)
    except ExampleError as err:
        pytest.skip(f"no Debian package lists here: {err}")
    return out, build_pair(spec, out, **QUIET)


def test_digit_attributes_follow_the_true_digit():
    table = digits.attribute_matrix()
    names = list(digits.ATTRIBUTES)
    assert [names[i] for i in np.flatnonzero(table[8])] == ["even", "at_least_5", "closed_loop", "fibonacci"]
    assert [names[i] for i in np.flatnonzero(table[7])] == ["prime", "at_least_5"]
    data, target = digits.load_digits_set()
    assert data.inputs[digits.INPUT].shape == (1797, 64) and data.inputs[digits.INPUT].dtype == np.float32
    np.testing.assert_array_equal(data.labels, table[target])


def test_splits_are_disjoint_seeded_and_cover_every_row():
    keys = [f"k{i}" for i in range(100)]
    parts = split_rows(keys, (0.6, 0.2), seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    assert [len(p) for p in parts] == [60, 20, 20]
    again = split_rows(list(reversed(keys)), (0.6, 0.2), seed=3)  # the same keys in another order
    assert [sorted(keys[i] for i in p) for p in parts] == [sorted(list(reversed(keys))[i] for i in p) for p in again]


def test_package_lists_are_parsed_and_ambiguous_descriptions_dropped():
    text = "\n\n".join(
        f"Package: {name}\nVersion: 1\nSection: {section}\nDescription: {desc}\n continued long text"
        for name, section, desc in [
            ("a", "python", "Python bindings for foo"), ("b", "contrib/python", "Python tools"),
            ("c", "perl", "Perl module for bar"), ("d", "perl", "shared text"), ("e", "python", "Shared text"),
            ("f", "perl", "Perl parser"), ("g", "admin", "an admin tool"),
        ]
    )
    packages = debtext.read_stanzas(text)
    assert packages[1] == debtext.Package("b", "python", "Python tools")
    rows, labels = debtext.labelled_descriptions(packages, sections=2, per_section=10)
    assert labels.names == ("perl", "python")
    assert sorted(p.name for p in rows) == ["a", "b", "c", "f"]  # "shared text" names two sections


def test_tokenizer_pads_truncates_and_round_trips():
    tokenizer = debtext.Tokenizer.fit(["GNU C library", "C library headers", "gnu tools"], max_length=4)
    encoded = tokenizer.encode(["GNU C library for x", "unknownword"])
    ids, mask = encoded[debtext.INPUT_IDS], encoded[debtext.ATTENTION_MASK]
    assert ids.dtype == np.int64 and ids.shape == (2, 4)
    assert ids[0].tolist() == [debtext.CLS] + [tokenizer.vocab.index(w) for w in ("gnu", "c", "library")]
    assert ids[1].tolist() == [debtext.CLS, debtext.UNK, debtext.PAD, debtext.PAD]
    assert mask[1].tolist() == [1, 1, 0, 0]
    assert debtext.Tokenizer.from_json(tokenizer.to_json()) == tokenizer


def test_multilabel_export_answers_sigmoid_probs_with_metadata(multilabel_pair):
    out, summary = multilabel_pair
    graph = onnx.load(str(out / "big.onnx"))
    assert [o.name for o in graph.graph.output] == ["PROBS"]
    (features,) = graph.graph.input
    assert features.name == "FEATURES" and features.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in features.type.tensor_type.shape.dim] == ["batch", 64]
    meta = read_metadata(out / "big.onnx")
    assert meta["task"] == "multilabel" and int(meta["num_classes"]) == len(digits.ATTRIBUTES)
    parity = json.loads(meta["parity"])
    assert parity["decision_agreement"] == 1.0 and parity["max_abs_diff"] <= 1e-4
    assert json.loads(meta["inputs"]) == [{"name": "FEATURES", "dtype": "float32", "dims": [64]}]
    little, big = summary["models"]["little"], summary["models"]["big"]
    assert little["macs"] == 64 * 16 + 16 * 6 and big["macs"] == 64 * 256 + 256 * 256 + 256 * 6
    test = TensorSet.load(out / "test.npz")
    (probs,) = stage_probs([out / "big.onnx"], test)
    assert probs.shape == (len(test), 6) and probs.min() >= 0 and probs.max() <= 1
    assert not np.allclose(probs.sum(1), 1.0)  # independent sigmoids, not a softmax
    assert big["test_metric"] > little["test_metric"] > 0.5


def test_sigmoid_parity_check_can_fail(multilabel_pair):
    out, _ = multilabel_pair
    torch.manual_seed(9)
    other = ClassifierHead(digits.DigitsMLP((8,)), "multilabel").eval()
    test = TensorSet.load(out / "test.npz").take(slice(0, 16))
    assert tensor_parity(other, out / "little.onnx", test.inputs)["max_abs_diff"] > 1e-4


def test_text_export_takes_token_ids_and_a_mask(text_pair):
    out, summary = text_pair
    graph = onnx.load(str(out / "little.onnx"))
    assert [i.name for i in graph.graph.input] == ["INPUT_IDS", "ATTENTION_MASK"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in graph.graph.input)
    assert [o.name for o in graph.graph.output] == ["PROBS", "CLASS", "CONFIDENCE"]
    meta = read_metadata(out / "little.onnx")
    assert meta["task"] == "multiclass" and json.loads(meta["parity"])["max_abs_diff"] <= 1e-4
    tokenizer = debtext.Tokenizer.from_json(meta["tokenizer"])
    # MACs by hand: per layer the q/k/v/out projections, the two attention products, the feed-forward.
    width, ff, length = debtext.SIZES["little"]["width"], debtext.SIZES["little"]["ff"], tokenizer.max_length
    by_hand = 4 * width * width * length + 2 * length * length * width + 2 * width * ff * length + width * len(summary["labels"])
    assert summary["models"]["little"]["macs"] == by_hand
    assert summary["models"]["big"]["macs"] > 10 * by_hand
    encoded = tokenizer.encode(["Python 3 bindings for the GNU library", ""])
    encoded[debtext.ATTENTION_MASK][1] = 0  # a mask of zeros: [CLS] is attended all the same
    probs = stage_probs([out / "little.onnx"], TensorSet(encoded, np.zeros(2, np.int64)))[0]
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_export_refuses_inputs_that_do_not_match_the_model(tmp_path):
    model = TensorModel(digits.DigitsMLP((4,)), ("FEATURES",), "multilabel", digits.LABELS, "example:test")
    with pytest.raises(ExportError, match="the model takes"):
        export_tensor_model(model, tmp_path / "m.onnx", {"PIXELS": np.zeros((4, 64), np.float32)}, **QUIET)
    with pytest.raises(ExportError, match="task must be one of"):
        ClassifierHead(digits.DigitsMLP((4,)), "regression")


def test_offline_cascade_routes_on_the_signal_and_pays_per_stage():
    little = np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8]], np.float32)
    big = np.array([[0.1, 0.9], [0.3, 0.7], [0.4, 0.6]], np.float32)
    answers = cascade([little, big], [0.7], "max_softmax")
    assert answers.route.tolist() == [0, 1, 0]
    assert answers.decisions("multiclass").tolist() == [0, 1, 1]
    assert expected_macs(answers.route, [10, 100]) == pytest.approx((10 + 110 + 10) / 3)
    multilabel = cascade([little, big], [0.3], "mean_abs_margin")  # |p - 0.5| means: 0.4, 0.05, 0.3
    assert multilabel.route.tolist() == [0, 1, 0]
    assert micro_f1(np.array([[1, 0], [1, 1]]), np.array([[1, 1], [0, 1]])) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


# ---------------------------------------------------------------- through the real server


@pytest.fixture(scope="module")
def examples_server(multilabel_pair, text_pair, tmp_path_factory):
    """One server with both pairs: gates `digits` and `debtext`, each at its little's median signal."""
    from littlebig.examples.served import build_example_repository
    from littlebig.serving.server import TritonServer
    from littlebig.gate.signals import DEFAULT_SIGNAL

    from .test_stages import add_cascade

    work = tmp_path_factory.mktemp("examples-repos")
    repo = work / "repository"
    repo.mkdir()
    thresholds = {}
    for gate, (folder, summary) in {"digits": multilabel_pair, "debtext": text_pair}.items():
        signal = DEFAULT_SIGNAL[summary["task"]]
        little = stage_probs([folder / "little.onnx"], TensorSet.load(folder / "test.npz"))[0]
        thresholds[gate] = float(np.median(gating_signal(signal, little)))
        built = build_example_repository(folder, work / gate, thresholds[gate], signal, intra_op_threads=1)
        add_cascade(repo, built, gate, 2)
    with TritonServer(repo, log_file=work / "tritonserver.log") as server:
        yield server, thresholds


@pytest.mark.parametrize("gate, pair_fixture", [("digits", "multilabel_pair"), ("debtext", "text_pair")])
def test_served_example_equals_the_offline_cascade_row_by_row(examples_server, gate, pair_fixture, request):
    from littlebig.examples.served import compare, served_answers
    from littlebig.gate.signals import DEFAULT_SIGNAL

    server, thresholds = examples_server
    folder, summary = request.getfixturevalue(pair_fixture)
    task, signal = summary["task"], DEFAULT_SIGNAL[summary["task"]]
    test = TensorSet.load(folder / "test.npz").take(slice(0, 200))
    expected = cascade(stage_probs([folder / "little.onnx", folder / "big.onnx"], test), [thresholds[gate]], signal)
    served = served_answers(server.grpc_url, test, task, gate=gate, batch_size=48)
    assert ("LABELS" in served) == (task == "multilabel")
    result = compare(served, expected, task)
    assert set(result["routes"]) == {0, 1}, "the rows must reach both stages"
    assert result["route_mismatches"] == 0 and result["answer_mismatches"] == 0, result
    assert result["max_abs_confidence_diff"] <= 1e-6 and result["max_abs_probs_diff"] <= 1e-6, result


def test_served_stage_probs_calibrate_through_kstage(examples_server, multilabel_pair):
    """bench/examples.py's path: the stage models asked directly through the server, T chosen by
    client/kstage.py on those probabilities, and the offline cascade at T keeping the micro-F1."""
    from littlebig.client.kstage import choose_multilabel
    from littlebig.examples.served import served_stage_probs

    server, _ = examples_server
    folder, summary = multilabel_pair
    calib = TensorSet.load(folder / "calib.npz")
    served = served_stage_probs(server.grpc_url, calib, ("digits_little", "digits_big"), batch_size=64)
    offline = stage_probs([folder / "little.onnx", folder / "big.onnx"], calib)
    assert all(np.abs(s - o).max() <= 1e-6 for s, o in zip(served, offline))
    macs = [summary["models"]["little"]["macs"], summary["models"]["big"]["macs"]]
    choice = choose_multilabel(served, calib.labels, macs, max_f1_drop=0.01)
    assert choice["criterion_met"] and choice["macs_reduction"] > 0.0, choice
    assert choice["metric"] >= choice["reference_metric"] - 0.01
    answers = cascade(offline, choice["thresholds"], "mean_abs_margin")
    assert micro_f1(answers.decisions("multilabel"), calib.labels) == pytest.approx(choice["metric"])
