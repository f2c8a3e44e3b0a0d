"""Zero-shot CLIP pairs and video classifiers (paper A.1.1 and A.4), through the real server.

Model hubs are not reachable here, so every model is random-init: tiny transformers and open_clip CLIP
models saved to local folders (with a byte-level tokenizer written here), and torchvision's mc3_18 and
swin3d_t at small resolutions and 4 frames. Both cascades are served by one server: the video cascade
as `littlebig` (calibrated and classified from a clip folder), the CLIP one as `clip`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from littlebig.client.calibrate import Criterion, analyse, calibrate
from littlebig.client.clips import (
    frame_indices,
    list_clips,
    to_wire_clip,
    to_wire_clips,
)
from littlebig.client.collect import Collected
from littlebig.client.control import served_threshold, switch_threshold
from littlebig.client.datasets import load_image_set
from littlebig.client.images import sample_photos, to_wire_batch
from littlebig.client.infer import LittleBigClient
from littlebig.export import export_onnx, load_model, ort_session, read_metadata
from littlebig.model_repository.builder import build_cascade
from littlebig.model_repository.facts import RepositoryError
from littlebig.model_repository.options import RepositoryOptions
from PIL import Image

from littlebig.cli import main
from littlebig.serving.server import TritonServer

from .test_stages import add_cascade

FOODS = ("apple_pie", "sushi", "ramen", "pizza", "tacos")
TEMPLATES = ("a photo of {}, a type of food.", "a blurry photo of a {}.")
CLIP_WIRE = 32
ACTIONS = ("archery", "bowling", "juggling_balls", "skiing", "surfing_water")
FRAMES, VIDEO_WIRE = 4, 16
OPTIONS = RepositoryOptions(runtime="python", intra_op_threads=1, gate_instances=1, big_nice=0, max_batch_size=32)


# ---------------------------------------------------------------- tiny CLIP folders


def hf_clip_folder(folder: Path, width: int, layers: int, patch: int) -> Path:
    """A random-init transformers CLIPModel and a byte-level CLIP tokenizer (no merges) saved to ``folder``."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "max_position_embeddings": 77, "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
                "pad_token_id": vocab["<|endoftext|>"]}
    vision = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers, "num_attention_heads": 2,
                  "image_size": CLIP_WIRE, "patch_size": patch}
    torch.manual_seed(5)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    return folder


def open_clip_folder(folder: Path) -> Path:
    """A random-init open_clip model in open_clip's local-dir layout (its own tokenizer ships with open_clip)."""
    import open_clip

    folder.mkdir()
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": CLIP_WIRE, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(6)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def reference_clip_probs(family: str, folder: Path, wire: np.ndarray, mean, std) -> np.ndarray:
    """Zero-shot probabilities computed with each library's own feature functions: softmax over
    logit_scale * cos(image, mean over templates of the normalised prompt embeddings)."""
    pixels = (torch.from_numpy(wire).permute(0, 3, 1, 2).float() / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    prompts = [t.format(food.replace("_", " ")) for food in FOODS for t in TEMPLATES]
    with torch.no_grad():
        if family == "clip":
            from transformers import AutoTokenizer, CLIPModel

            model = CLIPModel.from_pretrained(folder).eval()
            features = [model.get_image_features(pixel_values=pixels), model.get_text_features(**AutoTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt"))]
            image, text = (f if isinstance(f, torch.Tensor) else f.pooler_output for f in features)
        else:
            import open_clip

            model = open_clip.create_model(f"local-dir:{folder}").eval()
            image, text = model.encode_image(pixels), model.encode_text(open_clip.get_tokenizer(f"local-dir:{folder}")(prompts))
        text = torch.nn.functional.normalize(text, dim=-1).view(len(FOODS), len(TEMPLATES), -1).mean(1)
        logits = model.logit_scale.exp() * torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    return torch.softmax(logits, 1).numpy()


# ---------------------------------------------------------------- the models, exported once


@dataclasses.dataclass
class Exported:
    files: dict  # role -> path, per cascade ("clip", "video")
    folders: dict  # CLIP model folders
    root: Path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    root = tmp_path_factory.mktemp("clipvideo")
    (root / "foods.txt").write_text("\n".join(FOODS) + "\n")
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (root / "actions.txt").write_text("\n".join(ACTIONS) + "\n")
    folders = {"little": open_clip_folder(root / "oclip"), "big": hf_clip_folder(root / "hfclip", 48, 3, 4)}
    files = {"clip": {"little": root / "clip_little.onnx", "big": root / "clip_big.onnx"},
             "video": {"little": root / "video_little.onnx", "big": root / "video_big.onnx"}}
    quiet = {"log": lambda *_: None}
    # Little CLIP and little video through the command line (its parity clips: pans across photos).
    main(["export", f"open_clip:local-dir:{folders['little']}", "--labels", str(root / "foods.txt"),
          "--templates", str(root / "templates.txt"), "--out", str(files["clip"]["little"])])
    loaded = load_model(f"clip:{folders['big']}", labels=root / "foods.txt", templates=root / "templates.txt")
    photos = to_wire_batch(list(sample_photos().values()), CLIP_WIRE, loaded.info.crop_pct)
    export_onnx(loaded, files["clip"]["big"], wire_size=CLIP_WIRE, parity_images=photos, **quiet)
    torch.manual_seed(7)
    main(["export", "torchvision:mc3_18", "--random-init", "--num-classes", "5", "--labels", str(root / "actions.txt"),
          "--resolution", "16", "--frames", str(FRAMES), "--wire-size", str(VIDEO_WIRE), "--out", str(files["video"]["little"])])
    torch.manual_seed(8)
    loaded = load_model("torchvision:swin3d_t", random_init=True, num_classes=5, resolution=48, frames=FRAMES,
                        labels=root / "actions.txt")
    rng = np.random.default_rng(1)
    clips = rng.integers(0, 256, size=(4, FRAMES, VIDEO_WIRE, VIDEO_WIRE, 3), dtype=np.uint8)
    export_onnx(loaded, files["video"]["big"], wire_size=VIDEO_WIRE, parity_images=clips, **quiet)
    return Exported(files, folders, root)


def probs_of(path: Path, inputs: np.ndarray) -> np.ndarray:
    session = ort_session(path, threads=1)
    return session.run(["PROBS"], {session.get_inputs()[0].name: inputs})[0]


# ---------------------------------------------------------------- export


def test_clip_export_bakes_the_prompts_into_an_ordinary_classifier(exported):
    photos = to_wire_batch(list(sample_photos().values()), CLIP_WIRE, 1.0)
    for role, family in (("little", "open_clip"), ("big", "clip")):
        path = exported.files["clip"][role]
        meta = read_metadata(path)
        assert json.loads(meta["labels"])["names"] == list(FOODS)
        notes = json.loads(meta["zero_shot"])
        assert notes["templates"] == list(TEMPLATES) and notes["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-3)  # both libraries start at 1 / 0.07
        assert float(meta["crop_pct"]) == 1.0 and json.loads(meta["mean"]) == pytest.approx([0.48145466, 0.4578275, 0.40821073])
        (image,) = ort_session(path).get_inputs()
        assert image.name == "IMAGE" and image.shape[1:] == [CLIP_WIRE, CLIP_WIRE, 3]
        expected = reference_clip_probs(family, exported.folders[role], photos, json.loads(meta["mean"]), json.loads(meta["std"]))
        np.testing.assert_allclose(probs_of(path, photos), expected, atol=1e-5)
    assert int(read_metadata(exported.files["clip"]["big"])["macs"]) > 2 * int(read_metadata(exported.files["clip"]["little"])["macs"])


def test_video_export_takes_clips_with_the_weights_preprocessing(exported):
    meta = read_metadata(exported.files["video"]["little"])
    assert int(meta["frames"]) == FRAMES and int(meta["wire_size"]) == VIDEO_WIRE
    assert float(meta["crop_pct"]) == pytest.approx(112 / 128)  # torchvision's Kinetics transforms: 128 -> crop 112
    assert json.loads(meta["mean"]) == pytest.approx([0.43216, 0.394666, 0.37645])
    assert json.loads(meta["labels"])["names"] == list(ACTIONS)
    assert json.loads(meta["parity"])["argmax_agreement"] == 1.0
    (video,) = ort_session(exported.files["video"]["big"]).get_inputs()
    assert video.name == "VIDEO" and video.shape[1:] == [FRAMES, VIDEO_WIRE, VIDEO_WIRE, 3]
    macs = [int(read_metadata(exported.files["video"][role])["macs"]) for role in ("little", "big")]
    assert 0 < macs[0] < macs[1]


def test_video_wrapper_feeds_frames_in_the_models_layout():
    """The graph must equal: each frame resized and normalised, [N, 3, F, R, R], the model, softmax."""
    from littlebig.export.onnx_export import serving_wrapper

    torch.manual_seed(0)
    loaded = load_model("torchvision:r3d_18", random_init=True, num_classes=3, resolution=24, frames=3)
    clips = np.random.default_rng(2).integers(0, 256, size=(2, 3, 16, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(clips).float().div(255.0).permute(0, 1, 4, 2, 3).reshape(6, 3, 16, 16)
    x = torch.nn.functional.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(loaded.info.mean).view(1, 3, 1, 1)) / torch.tensor(loaded.info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(loaded.module(x.reshape(2, 3, 3, 24, 24).permute(0, 2, 1, 3, 4)), 1)
        got = serving_wrapper(loaded, 16)(torch.from_numpy(clips))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_bad_clip_and_video_options_are_refused(exported, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from littlebig.export import ExportError

    # Hub models fail at once, before any download or export work, with what to do instead (offline
    # mode set here: the test must not download where a hub is reachable).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for spec in ("clip:openai/clip-vit-base-patch32", "open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"):
        with pytest.raises(ExportError, match="Without the model hub, download the model folder elsewhere"):
            load_model(spec, labels=exported.root / "foods.txt")

    with pytest.raises(ExportError, match="pass its classes with --labels"):
        load_model(f"clip:{exported.folders['big']}")
    with pytest.raises(ExportError, match="one {} for the class name"):
        (tmp_path / "t.txt").write_text("a photo\n")
        load_model(f"clip:{exported.folders['big']}", labels=exported.root / "foods.txt", templates=tmp_path / "t.txt")
    with pytest.raises(ExportError, match="names an architecture only"):
        load_model("open_clip:ViT-B-32", labels=exported.root / "foods.txt")
    with pytest.raises(ExportError, match="is an image model: --frames is for video models"):
        load_model("timm:resnet10t", random_init=True, frames=8)
    with pytest.raises(RepositoryError, match="frames per clip differ"):
        build_cascade([exported.files["clip"]["little"], exported.files["video"]["big"]], tmp_path / "r", OPTIONS)


# ---------------------------------------------------------------- clip folders


def write_clip(path: Path, frames: np.ndarray, as_folder: bool) -> None:
    """A clip as a .npy file, or as a folder of PNG frames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not as_folder:
        np.save(path.with_suffix(".npy"), frames)
        return
    path.mkdir()
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(path / f"{index:03d}.png")


def test_clips_sample_frames_evenly_and_folders_equal_arrays(tmp_path):
    assert frame_indices(6, 4).tolist() == [0, 2, 3, 5] and frame_indices(4, 4).tolist() == [0, 1, 2, 3]
    assert frame_indices(2, 4).tolist() == [0, 0, 1, 1]
    frames = np.random.default_rng(3).integers(0, 256, size=(6, 20, 24, 3), dtype=np.uint8)
    write_clip(tmp_path / "a", frames, as_folder=False)
    write_clip(tmp_path / "b", frames, as_folder=True)
    assert list_clips(tmp_path) == [tmp_path / "a.npy", tmp_path / "b"]
    wire = to_wire_clips(list_clips(tmp_path), FRAMES, VIDEO_WIRE, 0.875)
    assert wire.shape == (2, FRAMES, VIDEO_WIRE, VIDEO_WIRE, 3)
    np.testing.assert_array_equal(wire[0], wire[1])
    np.testing.assert_array_equal(wire[0], to_wire_clip(frames, FRAMES, VIDEO_WIRE, 0.875))
    clips = load_image_set(tmp_path, clips=True)
    assert clips.paths == [tmp_path / "a.npy", tmp_path / "b"] and clips.labels is None


# ---------------------------------------------------------------- served: one server, both cascades


@dataclasses.dataclass
class Served:
    server: TritonServer
    clip_rows: np.ndarray
    clip_probs: list
    video_dir: Path  # ImageFolder of clips, labelled with big's answers
    video_paths: list
    video_probs: list
    thresholds: dict


def median_confidence(probs: np.ndarray) -> float:
    return float(np.median(probs.max(1)))


def video_folder(root: Path, files: dict) -> tuple[Path, list[Path], list[np.ndarray]]:
    """16 clips of 6 frames at 20x24 (sent as 4 frames at 16x16), half .npy, half frame folders, in class
    folders named after big's answer (so big is right on all: calibration needs labels better than chance)."""
    rng = np.random.default_rng(4)
    raw = rng.integers(0, 256, size=(16, 6, 20, 24, 3), dtype=np.uint8)
    raw[::2] = raw[::2] // 4  # darker clips: the models answer them differently
    big = probs_of(files["big"], to_wire_clips(list(raw), FRAMES, VIDEO_WIRE, 112 / 128)).argmax(1)
    data = root / "clips"
    for index, (frames, answer) in enumerate(zip(raw, big)):
        write_clip(data / ACTIONS[answer] / f"clip{index:02d}", frames, as_folder=index % 2 == 1)
    paths = load_image_set(data, clips=True, classes=root / "actions.txt").paths
    wire = to_wire_clips(paths, FRAMES, VIDEO_WIRE, 112 / 128)
    return data, paths, [probs_of(files[role], wire) for role in ("little", "big")]


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    work = tmp_path_factory.mktemp("clipvideo-repo")
    rng = np.random.default_rng(5)
    photos = to_wire_batch(list(sample_photos().values()), CLIP_WIRE, 1.0)
    clip_rows = np.concatenate([photos, rng.integers(0, 256, size=(13, CLIP_WIRE, CLIP_WIRE, 3), dtype=np.uint8)])
    clip_probs = [probs_of(exported.files["clip"][role], clip_rows) for role in ("little", "big")]
    data, paths, video_probs = video_folder(exported.root, exported.files["video"])
    thresholds = {"clip": median_confidence(clip_probs[0]), "video": median_confidence(video_probs[0])}
    repo = build_cascade([exported.files["video"]["little"], exported.files["video"]["big"]], work / "repository",
                         dataclasses.replace(OPTIONS, threshold=thresholds["video"], little_in_gate=False))
    built = build_cascade([exported.files["clip"]["little"], exported.files["clip"]["big"]], work / "clip",
                          dataclasses.replace(OPTIONS, threshold=thresholds["clip"]))
    add_cascade(repo, built, "clip", 2)
    with TritonServer(repo, log_file=work / "tritonserver.log") as server:
        yield Served(server, clip_rows, clip_probs, data, paths, video_probs, thresholds)


def offline_cascade(probs: list, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eq. 4: little answers where its max probability >= T, else big. Class, probabilities, route."""
    route = (probs[0].max(1).astype(np.float64) < threshold).astype(np.int32)
    answer = np.where(route[:, None] == 1, probs[1], probs[0])
    return answer.argmax(1), answer, route


def assert_served(client: LittleBigClient, rows: np.ndarray, probs: list, threshold: float) -> None:
    got = client.infer(rows, return_probs=True)
    classes, answer, route = offline_cascade(probs, threshold)
    assert set(route) == {0, 1}, "the test rows must reach both models"
    np.testing.assert_array_equal(got["ROUTE"][:, 0], route)
    np.testing.assert_array_equal(got["CLASS"][:, 0], classes)
    np.testing.assert_allclose(got["PROBS"], answer, atol=1e-6)
    np.testing.assert_allclose(got["CONFIDENCE"][:, 0], answer.max(1), atol=1e-6)


def test_served_clip_cascade_equals_offline(served):
    with LittleBigClient(served.server.grpc_url, model="clip") as client:
        info = client.gate_info()
        assert info.frames == 0 and info.wire_size == CLIP_WIRE and info.labels.names == FOODS
        assert_served(client, served.clip_rows, served.clip_probs, served.thresholds["clip"])


def test_served_video_cascade_equals_offline(served):
    with LittleBigClient(served.server.grpc_url) as client:
        info = client.gate_info()
        assert (info.frames, info.wire_size, info.crop_pct) == (FRAMES, VIDEO_WIRE, pytest.approx(112 / 128))
        wire = to_wire_clips(served.video_paths, FRAMES, VIDEO_WIRE, info.crop_pct)
        assert_served(client, wire, served.video_probs, served.thresholds["video"])
        predictions = client.classify(served.video_paths, batch_size=5)  # clips from disk, in 4 requests
    classes, _, route = offline_cascade(served.video_probs, served.thresholds["video"])
    assert [p.class_index for p in predictions] == classes.tolist() and [p.route for p in predictions] == route.tolist()


def test_video_classify_command_reads_a_clip_folder(served, capsys):
    main(["classify", "--url", served.server.grpc_url, str(served.video_dir)])
    lines = capsys.readouterr().out.splitlines()[1:]
    classes, _, route = offline_cascade(served.video_probs, served.thresholds["video"])
    assert [line.split()[0] for line in lines] == [str(p) for p in served.video_paths]
    assert [int(line.split()[1]) for line in lines] == classes.tolist()
    assert [line.split()[-1] for line in lines] == [("little", "big")[r] for r in route]


def test_video_calibrates_through_the_server(served, tmp_path):
    criterion = Criterion(max_acc_drop=0.0, point_estimate=True)
    report = calibrate(served.server.grpc_url, served.video_dir, tmp_path, criterion, apply=True, show_progress=False,
                       log=lambda *_: None)
    cached = Collected.load(tmp_path / "calibration.npz")
    assert cached.frames == FRAMES and cached.paths == [str(p) for p in served.video_paths]
    for got, expected in zip(cached.stages, served.video_probs):
        np.testing.assert_allclose(got, expected, atol=1e-6)
    offline = dataclasses.replace(cached, stages=served.video_probs)
    sweep, _, choice = analyse(offline, criterion)
    assert report["threshold"] == pytest.approx(sweep.thresholds[choice.index]) and report["accuracy"]["big"] == 1.0
    assert served_threshold(served.server.grpc_url) == pytest.approx(report["threshold"])
    switch_threshold(served.server.grpc_url, served.thresholds["video"])  # as the other tests expect it


def test_pairs_ranks_video_candidates_from_a_clip_folder(exported, served, tmp_path):
    """`pairs` serves its own repository of the video files and collects them from the clip folder."""
    from littlebig.serving.pairs import pairs

    criterion = Criterion(max_acc_drop=0.0, point_estimate=True)
    report = pairs(exported.files["video"]["big"], [exported.files["video"]["little"]], served.video_dir, tmp_path, criterion,
                   show_progress=False, log=lambda *_: None)
    cached = Collected.load(tmp_path / "collected.npz")
    assert cached.frames == FRAMES and report["images"] == len(served.video_paths)
    for got, expected in zip(cached.stages, served.video_probs):
        np.testing.assert_allclose(got, expected, atol=1e-6)
