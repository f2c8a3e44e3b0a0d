import shutil

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from littlebig.export import export_onnx, load_model
from littlebig.model_repository.builder import build_repository, gate_config_path, set_threshold, set_thresholds
from littlebig.model_repository.configs import read_config
from littlebig.model_repository.facts import RepositoryError
from littlebig.model_repository.options import RepositoryOptions

from .conftest import NUM_CLASSES, WIRE, wire_images


def params(config):
    return {k: v.string_value for k, v in config.parameters.items()}


def test_python_runtime_repository_layout_and_configs(pair, tmp_path):
    options = RepositoryOptions(runtime="python", max_batch_size=32, threshold=0.25, big_queue_delay_us=700, little_in_gate=False)
    repo = build_repository(pair.little, pair.big, tmp_path / "repo", options)
    for name in ("little", "big", "gate"):
        assert (repo / name / "config.pbtxt").is_file()
        assert (repo / name / "1" / "model.py").is_file()
    assert (repo / "little" / "1" / "model.onnx").read_bytes() == pair.little.read_bytes()

    little = read_config(repo / "little" / "config.pbtxt")
    assert little.name == "little" and little.backend == "python" and little.max_batch_size == 32
    assert little.input[0].name == "IMAGE" and little.input[0].data_type == mc.TYPE_UINT8
    assert list(little.input[0].dims) == [WIRE, WIRE, 3]
    assert list(little.output[0].dims) == [NUM_CLASSES]
    assert little.HasField("dynamic_batching")
    assert int(params(little)["macs"]) == pair.little_macs
    big = read_config(repo / "big" / "config.pbtxt")
    assert big.dynamic_batching.max_queue_delay_microseconds == 700

    ensemble = read_config(repo / "littlebig" / "config.pbtxt")
    assert ensemble.platform == "ensemble" and ensemble.max_batch_size == 32 and not ensemble.parameters
    assert [o.name for o in ensemble.output] == ["CLASS", "CONFIDENCE", "ROUTE", "PROBS", "THRESHOLD"]
    assert ensemble.output[3].label_filename == "labels.txt" or not (repo / "littlebig" / "labels.txt").exists()
    little_step, gate_step = ensemble.ensemble_scheduling.step
    assert little_step.model_name == "little" and dict(little_step.input_map) == {"IMAGE": "IMAGE"}
    assert gate_step.model_name == "gate" and set(gate_step.input_map) == {"IMAGE", "LITTLE_CLASS", "LITTLE_CONFIDENCE", "LITTLE_PROBS"}
    gate = read_config(repo / "gate" / "config.pbtxt")
    assert gate_config_path(repo) == repo / "gate" / "config.pbtxt"
    assert gate.backend == "python" and gate.HasField("dynamic_batching") and gate.max_batch_size == 32
    assert [i.name for i in gate.input] == ["IMAGE", "LITTLE_CLASS", "LITTLE_CONFIDENCE", "LITTLE_PROBS"]
    p = params(gate)
    assert p["stage_models"] == "little,big" and p["little_in_gate"] == "0"
    assert float(p["thresholds"]) == 0.25
    assert p["stage_macs"] == f"{pair.little_macs},{pair.big_macs}"
    assert int(p["wire_size"]) == WIRE


def test_config_text_round_trips_through_the_protobuf(pair, tmp_path):
    repo = build_repository(pair.little, pair.big, tmp_path / "repo")
    for name in ("little", "big", "littlebig", "gate"):
        text = (repo / name / "config.pbtxt").read_text()
        parsed = text_format.Parse(text, mc.ModelConfig())
        assert text_format.MessageToString(parsed) == text
        assert parsed.name == name


def test_native_runtime_configs(pair, tmp_path):
    repo = build_repository(pair.little, pair.big, tmp_path / "ort", RepositoryOptions(runtime="onnxruntime"))
    little = read_config(repo / "little" / "config.pbtxt")
    assert little.platform == "onnxruntime_onnx" and not little.backend
    assert not (repo / "little" / "1" / "model.py").exists()
    assert (repo / "little" / "1" / "model.onnx").is_file()

    repo = build_repository(pair.little, pair.big, tmp_path / "trt", RepositoryOptions(runtime="tensorrt"))
    big = read_config(repo / "big" / "config.pbtxt")
    assert big.platform == "tensorrt_plan" and big.default_model_filename == "model.plan"
    assert big.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    # The gate is the same package whatever runs little and big.
    for module in (tmp_path / "ort" / "gate" / "1").glob("*.py"):
        assert (repo / "gate" / "1" / module.name).read_text() == module.read_text()


def test_little_in_gate_points_the_gate_at_littles_onnx_and_needs_the_python_runtime(pair, tmp_path):
    repo = build_repository(pair.little, pair.big, tmp_path / "py", RepositoryOptions(intra_op_threads=1))  # the default
    gate = params(read_config(repo / "gate" / "config.pbtxt"))
    assert gate["little_in_gate"] == "1"
    assert [s.model_name for s in read_config(repo / "littlebig" / "config.pbtxt").ensemble_scheduling.step] == ["gate"]
    assert {i.name for i in read_config(repo / "gate" / "config.pbtxt").input} == {"IMAGE"}
    assert (repo / gate["little_onnx"]).read_bytes() == pair.little.read_bytes()
    assert gate["little_intra_op_threads"] == "1"
    step = build_repository(pair.little, pair.big, tmp_path / "step", RepositoryOptions(little_in_gate=False))
    assert "little_onnx" not in params(read_config(gate_config_path(step)))
    native = build_repository(pair.little, pair.big, tmp_path / "native", RepositoryOptions(runtime="onnxruntime"))
    assert "little_onnx" not in params(read_config(gate_config_path(native)))  # native runtimes: little is a step
    with pytest.raises(RepositoryError, match="needs --runtime python"):
        build_repository(pair.little, pair.big, tmp_path / "ort", RepositoryOptions(runtime="onnxruntime", little_in_gate=True))


def test_pair_with_different_wire_sizes_is_refused(pair, tmp_path):
    other = load_model("timm:resnet10t", random_init=True, num_classes=NUM_CLASSES, resolution=32)
    odd = export_onnx(other, tmp_path / "odd.onnx", wire_size=32, parity_images=wire_images(2)[:, :32, :32].copy(), log=lambda *_: None)
    with pytest.raises(RepositoryError, match="wire sizes differ"):
        build_repository(pair.little, odd.path, tmp_path / "repo")


def test_pair_with_different_class_counts_is_refused(pair, tmp_path):
    other = load_model("timm:resnet10t", random_init=True, num_classes=NUM_CLASSES + 1, resolution=WIRE)
    odd = export_onnx(other, tmp_path / "odd.onnx", wire_size=WIRE, parity_images=wire_images(2), log=lambda *_: None)
    with pytest.raises(RepositoryError, match="class counts differ"):
        build_repository(odd.path, pair.big, tmp_path / "repo")


def test_files_without_littlebig_metadata_are_refused(pair, tmp_path):
    import onnx

    bare = onnx.load(str(pair.little))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(RepositoryError, match="littlebig export"):
        build_repository(tmp_path / "bare.onnx", pair.big, tmp_path / "repo")
    with pytest.raises(RepositoryError, match="does not exist"):
        build_repository(tmp_path / "absent.onnx", pair.big, tmp_path / "repo")


@pytest.mark.parametrize(
    "options, message",
    [
        (RepositoryOptions(runtime="tflite"), "runtime"),
        (RepositoryOptions(threshold=1.5), "threshold"),
        (RepositoryOptions(max_batch_size=0), "max batch size"),
        (RepositoryOptions(ensemble_weight=-0.1), "ensemble weight"),
        (RepositoryOptions(big_queue_delay_us=-1), "big queue delay us must be >= 0"),
    ],
)
def test_bad_options_are_refused(pair, tmp_path, options, message):
    with pytest.raises(RepositoryError, match=message):
        build_repository(pair.little, pair.big, tmp_path / "repo", options)


def test_plans_are_checked_before_anything_is_written(pair, tmp_path):
    plan = tmp_path / "little.plan"
    plan.write_bytes(b"plan")
    with pytest.raises(RepositoryError, match="served only with --runtime tensorrt, not python"):
        build_repository(pair.little, pair.big, tmp_path / "repo", RepositoryOptions(runtime="python"), little_plan=plan)
    with pytest.raises(RepositoryError, match="TensorRT plan .*missing.plan does not exist"):
        build_repository(pair.little, pair.big, tmp_path / "repo", RepositoryOptions(runtime="tensorrt"),
                         little_plan=plan, big_plan=tmp_path / "missing.plan")
    assert not (tmp_path / "repo").exists()


def test_pair_with_different_labels_names_the_first_class_that_differs(pair):
    import dataclasses

    from littlebig.labels import ClassLabels
    from littlebig.model_repository.facts import ModelFacts, check_pair

    little, big = ModelFacts.from_onnx(pair.little), ModelFacts.from_onnx(pair.big)
    names = tuple(f"class{i}" for i in range(NUM_CLASSES))
    named = dataclasses.replace(little, labels=ClassLabels(names))
    with_ids = dataclasses.replace(big, labels=ClassLabels(names, tuple(f"n{i}" for i in range(NUM_CLASSES))))
    check_pair(named, with_ids, ("little", "big"))  # the same classes; only one states ids
    swapped = dataclasses.replace(big, labels=ClassLabels(("class1", "class0", *names[2:])))
    with pytest.raises(RepositoryError, match="class 0 is 'class0' in little .* and 'class1' in big"):
        check_pair(named, swapped, ("little", "big"))
    ids = tuple(f"n{i}" for i in range(NUM_CLASSES))
    renamed = dataclasses.replace(big, labels=ClassLabels(("other", *names[1:]), ids))  # same ids, another name
    with pytest.raises(RepositoryError, match="class 0 is 'class0' \\(n0\\) in little .* and 'other' \\(n0\\) in big"):
        check_pair(dataclasses.replace(with_ids, path=little.path), renamed, ("little", "big"))


def test_set_threshold_rewrites_only_the_gate_threshold(pair, tmp_path):
    repo = build_repository(pair.little, pair.big, tmp_path / "repo", RepositoryOptions(threshold=0.5))
    before = read_config(repo / "gate" / "config.pbtxt")
    set_threshold(repo, 0.375)
    after = read_config(repo / "gate" / "config.pbtxt")
    assert float(params(after)["thresholds"]) == 0.375
    after.parameters["thresholds"].string_value = before.parameters["thresholds"].string_value
    assert after == before
    with pytest.raises(RepositoryError, match="give 1 thresholds, got 2"):
        set_thresholds(repo, (0.3, 0.2))
    with pytest.raises(RepositoryError, match=r"\[0, 1\]"):
        set_threshold(repo, -0.1)
    shutil.rmtree(repo / "littlebig")
    with pytest.raises(RepositoryError, match="not a littlebig repository"):
        set_threshold(repo, 0.5)


def test_building_a_repository_does_not_import_torch(pair, tmp_path):
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from littlebig.model_repository.builder import build_repository\n"
        f"build_repository({str(pair.little)!r}, {str(pair.big)!r}, {str(tmp_path / 'repo')!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    assert (tmp_path / "repo" / "littlebig" / "config.pbtxt").is_file()


def test_children_answer_top1_in_graph_and_older_exports_still_build(pair, tmp_path):
    import onnx

    repo = build_repository(pair.little, pair.big, tmp_path / "repo")
    little = read_config(repo / "little" / "config.pbtxt")
    assert [o.name for o in little.output] == ["PROBS", "CLASS", "CONFIDENCE"]
    gate = read_config(repo / "gate" / "config.pbtxt")
    assert gate.parameters["children_top1"].string_value == "1"
    # A file exported before the in-graph top-1 has PROBS only: the gate then reads PROBS.
    model = onnx.load(str(pair.big))
    keep = [o for o in model.graph.output if o.name == "PROBS"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    old = tmp_path / "old_big.onnx"
    onnx.save(model, str(old))
    repo = build_repository(pair.little, old, tmp_path / "repo_old")
    assert [o.name for o in read_config(repo / "big" / "config.pbtxt").output] == ["PROBS"]
    assert read_config(repo / "gate" / "config.pbtxt").parameters["children_top1"].string_value == "0"
