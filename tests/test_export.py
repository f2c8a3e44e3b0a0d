import json

import numpy as np
import onnx
import pytest
import torch

from littlebig.export import (
    ExportError,
    ServingWrapper,
    count_macs,
    export_onnx,
    load_model,
    ort_session,
    read_metadata,
)
from littlebig.export.onnx_export import ONNX_IR_VERSION, ONNX_OPSET, parity_check

from .conftest import NUM_CLASSES, WIRE, wire_images


def test_exported_pair_records_parity_macs_and_preprocessing(pair):
    meta = read_metadata(pair.little)
    parity = json.loads(meta["parity"])
    assert parity["argmax_agreement"] == 1.0
    assert parity["max_abs_diff"] <= 1e-4
    assert parity["images"] == 16
    assert int(meta["macs"]) == pair.little_macs > 0
    assert int(meta["wire_size"]) == WIRE and int(meta["num_classes"]) == NUM_CLASSES
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    sidecar = json.loads(pair.little.with_suffix(".json").read_text())
    assert sidecar["parity"] == parity


def test_onnx_pins_ir_and_opset_and_has_dynamic_batch(pair):
    model = onnx.load(str(pair.big))
    assert model.ir_version == ONNX_IR_VERSION
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    (image,) = model.graph.input
    assert image.name == "IMAGE" and image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim] == ["batch", WIRE, WIRE, 3]
    session = ort_session(pair.big)
    for n in (1, 5):
        probs = session.run(["PROBS"], {"IMAGE": wire_images(n)})[0]
        assert probs.shape == (n, NUM_CLASSES) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_graph_resizes_and_normalises_like_the_model_expects():
    """The wrapper must equal: resize to the model resolution, (x/255-mean)/std, model, softmax."""
    torch.manual_seed(0)
    loaded = load_model("timm:resnet10t", random_init=True, num_classes=7, resolution=48)
    wrapper = ServingWrapper(loaded.module, loaded.info, wire_size=64).eval()
    images = wire_images(3)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
    mean = torch.tensor(loaded.info.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(loaded.module((x - mean) / std), 1)
        got = wrapper(torch.from_numpy(images))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_parity_check_detects_a_different_model(pair):
    """The parity check must be able to fail: compare the file against another network."""
    torch.manual_seed(123)
    other = load_model("timm:mobilenetv3_small_050", random_init=True, num_classes=NUM_CLASSES, resolution=WIRE)
    wrapper = ServingWrapper(other.module, other.info, WIRE).eval()
    result = parity_check(wrapper, pair.little, wire_images(8))
    assert result["max_abs_diff"] > 1e-4


def test_efficientnet_b0_macs_match_timm():
    model = load_model("timm:efficientnet_b0", random_init=True)
    assert model.info.resolution == 224
    assert count_macs(model.module, 224) / 1e9 == pytest.approx(0.39, rel=0.03)


def test_local_checkpoint_is_loaded(tmp_path):
    torch.manual_seed(5)
    source = load_model("timm:resnet10t", random_init=True, num_classes=4, resolution=32)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"state_dict": source.module.state_dict()}, ckpt)
    loaded = load_model("timm:resnet10t", weights=ckpt, num_classes=4, resolution=32)
    assert loaded.info.weights == str(ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), source.module(x))
    result = export_onnx(loaded, tmp_path / "m.onnx", wire_size=32, parity_images=np.ascontiguousarray(wire_images(4)[:, :32, :32]), log=lambda *_: None)
    assert read_metadata(result.path)["weights"] == str(ckpt)


def test_checkpoint_for_another_architecture_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt.pth"
    torch.save(load_model("timm:resnet10t", random_init=True, num_classes=4).module.state_dict(), ckpt)
    with pytest.raises(ExportError, match="do not fit"):
        load_model("timm:mobilenetv3_small_050", weights=ckpt, num_classes=4)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("resnet18", "not understood"),
        ("keras:resnet18", "not understood"),
        ("timm:no_such_net", "no model named"),
        ("torchvision:no_such_net", "no model named"),
        ("efficientnet-lite:9", "0..4"),
    ],
)
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ExportError, match=message):
        load_model(spec, random_init=True)


def test_missing_weights_file_is_refused(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        load_model("timm:resnet10t", weights=tmp_path / "absent.pth")


def test_unreachable_hub_says_how_to_pass_local_weights(monkeypatch):
    # Offline mode makes the hub lookup fail at once, as it does on a machine without network.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ExportError, match="--weights"):
        load_model("timm:resnet10t")


def test_wrong_parity_image_shape_is_refused(tmp_path):
    loaded = load_model("timm:resnet10t", random_init=True, num_classes=3, resolution=32)
    with pytest.raises(ExportError, match="parity images must be uint8"):
        export_onnx(loaded, tmp_path / "m.onnx", wire_size=32, parity_images=wire_images(2))


def test_a_failed_export_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path):
    from littlebig.export.onnx_export import replaced_on_success
    from littlebig.export.specs import ExportError, load_model

    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous export")
    with pytest.raises(ExportError, match="parity"):
        with replaced_on_success(out) as partial:
            partial.write_bytes(b"half written")
            raise ExportError("parity failed")
    assert out.read_bytes() == b"previous export" and not partial.exists()
    with replaced_on_success(out) as partial:
        partial.write_bytes(b"new export")
    assert out.read_bytes() == b"new export" and not partial.exists()
    with pytest.raises(ExportError, match="at least one class, got --num-classes 0"):
        load_model("timm:resnet10t", random_init=True, num_classes=0)
