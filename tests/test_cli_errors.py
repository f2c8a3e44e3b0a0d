"""A new user's mistakes, run as a user runs them (a subprocess): one short message, no traceback.

Most need no server: the unreachable-server cases talk to a loopback port with nothing on it.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from littlebig import __version__
from littlebig.cli import build_parser
from littlebig.client.images import sample_photos
from littlebig.serving.server import free_port


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "littlebig", *map(str, args)],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def assert_message(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with every fragment in its stderr, and printed no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "chelsea.png"
    Image.fromarray(sample_photos(["chelsea"])["chelsea"]).save(path)
    return path


@pytest.fixture(scope="module")
def nothing_on() -> str:
    """A loopback address with no server on it."""
    return f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize("command", [
    ["classify", "--url", "{url}", "{photo}"],
    ["classify", "--http", "--url", "{url}", "{photo}"],
    ["threshold", "--url", "{url}"],
    ["threshold", "--url", "{url}", "0.3"],
    ["calibrate", "--url", "{url}", "--data", "{photos}", "--out", "{out}", "--target-escalation", "0.2"],
])
def test_unreachable_server(command, photo, nothing_on, tmp_path):
    values = {"url": nothing_on, "photo": photo, "photos": photo.parent, "out": tmp_path / "calib"}
    result = run_cli(*(part.format(**values) for part in command))
    protocol = "HTTP" if "--http" in command else "gRPC"
    assert_message(result, f"cannot reach a Triton server at {nothing_on} ({protocol}): connection refused",
                   "Is `littlebig serve` running there?")
    assert len(result.stderr.strip().splitlines()) == 1


def test_classify_http_uses_the_http_default_port(photo):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.skip("something listens on 127.0.0.1:8000")
    assert_message(run_cli("classify", "--http", photo), "cannot reach a Triton server at 127.0.0.1:8000 (HTTP)")


@pytest.mark.parametrize("args, message", [
    (["classify", "--threshold", "1.5", "x.jpg"], "argument --threshold: must be in [0, 1] (a confidence threshold), got 1.5"),
    (["classify", "--batch-size", "0", "x.jpg"], "argument --batch-size: must be a whole number >= 1, got 0"),
    (["classify", "--url", "localhost", "x.jpg"], "argument --url: expected HOST:PORT"),
    (["threshold", "2"], "argument value: must be in [0, 1]"),
    (["repo", "--little", "a.onnx", "--big", "b.onnx", "--out", "r", "--threshold", "-0.1"], "argument --threshold: must be in [0, 1]"),
    (["bench", "--data", "d", "--out", "o", "--rounds", "0"], "argument --rounds: must be a whole number >= 1, got 0"),
    (["bench", "--data", "d", "--out", "o", "--concurrency", "1,a"],
     "argument --concurrency: expected comma-separated whole numbers >= 1 (e.g. 1,4,16), got '1,a'"),
    (["serve", "--repo", "r", "--canary-interval", "0"], "argument --canary-interval: must be a number > 0, got 0"),
])
def test_bad_values_are_refused_before_anything_runs(args, message):
    assert_message(run_cli(*args), message)


def test_options_that_would_do_nothing_or_cannot_work_are_refused(nothing_on, photo, tmp_path):
    """Found by the command before it exports, starts or asks anything."""
    assert_message(run_cli("serve", "--repo", tmp_path, "--host", "::1"), "host ::1 is an IPv6 address")
    calibrate = ["calibrate", "--url", nothing_on, "--data", photo.parent, "--out", tmp_path / "c"]
    assert_message(run_cli(*calibrate, "--repo", tmp_path), f"T is written into the repository {tmp_path} only when it "
                   "is applied: add --apply")
    assert_message(run_cli(*calibrate, "--eval-labels-csv", tmp_path / "e.csv"),
                   "an evaluation labels CSV (--eval-labels-csv) needs the evaluation images (--eval-data)")
    result = run_cli("demo", "--workdir", tmp_path / "demo", "--data", tmp_path / "missing")
    assert_message(result, str(tmp_path / "missing"))
    assert "exporting" not in result.stdout and not (tmp_path / "demo").exists()


def test_classify_files_that_are_not_images(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    assert_message(run_cli("classify", text), f"{text} is not an image Pillow can read")
    assert_message(run_cli("classify", tmp_path / "missing.jpg"), f"image {tmp_path / 'missing.jpg'} does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_message(run_cli("classify", empty), f"no images (.jpg, .png, ...) under the folder {empty}")


def test_classify_a_folder(server, photo, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, img in sample_photos(["coffee", "rocket"]).items():
        Image.fromarray(img).save(folder / f"{name}.jpg")
    result = run_cli("classify", "--url", server.grpc_url, folder, photo)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.endswith(("little", "big"))]
    assert [row.split()[0] for row in rows] == [str(folder / "coffee.jpg"), str(folder / "rocket.jpg"), str(photo)]


def test_wrong_protocol_for_the_port(server, photo):
    assert_message(run_cli("classify", "--http", "--url", server.grpc_url, photo),
                   f"the server port ({server.grpc_url}) does not speak HTTP: is it the gRPC port?")
    assert_message(run_cli("classify", "--url", server.http_url, photo),
                   f"the server port ({server.http_url}) accepted the connection but does not speak gRPC: "
                   "is it the HTTP port? Add --http")


def test_serve_refuses_ports_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--repo", tmp_path, "--grpc-port", port, "--http-port", free_port(),
                         "--metrics-port", free_port())
    stderr = assert_message(result, f"port {port} on 127.0.0.1 (--grpc-port) is not free", "--grpc-port")
    assert "ready" not in result.stdout and "starting tritonserver" not in result.stdout, stderr


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The files people pass as --weights, for a 5-class resnet10t."""
    import timm
    import torch

    out = tmp_path_factory.mktemp("weights")
    model = timm.create_model("resnet10t", num_classes=5)
    files = {name: out / f"{name}.pth" for name in ("state_dict", "checkpoint", "whole", "corrupt")}
    torch.save(model.state_dict(), files["state_dict"])
    torch.save({"epoch": 3, "model_state_dict": model.state_dict(), "optimizer": {}}, files["checkpoint"])
    torch.save(model, files["whole"])
    files["corrupt"].write_bytes(os.urandom(2048))
    return files


EXPORT = ["export", "timm:resnet10t", "--resolution", "32", "--wire-size", "40"]


def test_export_weights_mistakes(checkpoints, tmp_path):
    out = ["--out", tmp_path / "m.onnx"]
    assert_message(run_cli(*EXPORT, "--num-classes", "5", "--weights", tmp_path / "missing.pth", *out),
                   f"weights file {tmp_path / 'missing.pth'} does not exist")
    assert_message(run_cli(*EXPORT, "--num-classes", "5", "--weights", checkpoints["corrupt"], *out),
                   "is not a checkpoint torch.load can read (corrupt, or another format)")
    assert_message(run_cli(*EXPORT, "--num-classes", "5", "--weights", checkpoints["whole"], *out),
                   "holds pickled Python objects (a whole model saved with torch.save(model)",
                   "pass --allow-pickle if you trust it")
    assert_message(run_cli(*EXPORT, "--weights", checkpoints["state_dict"], *out),
                   "do not fit this architecture: fc.weight: file [5, 512], model [1000, 512]",
                   "pass --num-classes 5")
    assert not (tmp_path / "m.onnx").exists()


def test_export_takes_the_model_files_people_have(checkpoints):
    """A state dict, a checkpoint holding one under a key, a whole pickled model with allow_pickle."""
    import torch

    from littlebig.export import load_model

    expected = torch.load(checkpoints["state_dict"], weights_only=True)
    for name, allow_pickle in (("state_dict", False), ("checkpoint", False), ("whole", True)):
        loaded = load_model("timm:resnet10t", weights=checkpoints[name], num_classes=5, allow_pickle=allow_pickle)
        state = loaded.module.state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected.items()), name
        assert loaded.info.weights == str(checkpoints[name])


def test_export_without_network_fails_fast(tmp_path):
    # The hub address points at a loopback port with nothing on it: what a machine without network
    # sees, without sending anything off this machine. The cache is empty.
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli("export", "timm:resnet18", "--out", tmp_path / "r.onnx", env=env)
    assert_message(result, "could not fetch pretrained weights for timm:resnet18: the model hub",
                   "cannot be reached and they are not in the local cache", "--weights FILE.pth")
    assert "Retry" not in result.stderr


def test_repo_mistakes(pair, tmp_path):
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"\x08\x01garbage that is not protobuf \xff\xff\xff")
    assert_message(run_cli("repo", "--little", not_onnx, "--big", pair.big, "--out", tmp_path / "r"),
                   f"--little {not_onnx} is not an ONNX file")
    swapped = run_cli("repo", "--little", pair.big, "--big", pair.little, "--out", tmp_path / "r")
    assert swapped.returncode == 0, swapped.stderr
    assert "warning: little" in swapped.stderr and "Were --little and --big swapped?" in swapped.stderr
    right = run_cli("repo", "--little", pair.little, "--big", pair.big, "--out", tmp_path / "r")
    assert right.returncode == 0 and "warning" not in right.stderr, right.stderr
    broken = tmp_path / "report.json"
    broken.write_text("{not json")
    assert_message(run_cli("repo", "--little", pair.little, "--big", pair.big, "--out", tmp_path / "g", "--gears", broken),
                   f"--gears: {broken} is not a calibration report (not JSON")


def test_version_debug_and_python_m():
    assert run_cli("--version").stdout.strip() == f"littlebig {__version__}"
    help_text = run_cli("--help").stdout
    assert "littlebig COMMAND --help" in help_text and "classify" in help_text
    debug = run_cli("classify", "--debug", "missing.jpg")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UsageError" in debug.stderr


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        formatter = command.formatter_class(prog=name)
        for action in command._actions:
            where = f"littlebig {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert "%(default)" in formatter._get_help_string(action), f"{where} does not show its default"
    assert "images per request (default: 16)" in " ".join(commands["classify"].format_help().split())


def test_demo_summary_explains_a_costly_run(capsys):
    from littlebig.cli.demo import _print_demo_summary
    from littlebig.client.infer import GateInfo, Prediction

    info = GateInfo(wire_size=260, crop_pct=0.875, num_classes=1000, threshold=0.26, macs_little=385_187_552,
                    macs_big=859_736_272, little_model="little", big_model="big")
    answers = [Prediction(class_index=1, confidence=0.9, route=route) for route in (1, 1, 1, 0)]
    _print_demo_summary(answers, info, sample_set=True)
    out = capsys.readouterr().out
    assert "4 images, 3 escalated to big (p=0.75); 1.030 GMACs per image against 0.860 for big alone" in out
    assert "cheaper than big while p < 1 - MACs little / MACs big = 0.55" in out
    assert "not ImageNet-like" in out and "on ImageNet photos calibration gave T=0.36, p=0.128" in out
    _print_demo_summary(answers[3:], info, sample_set=True)
    assert "not ImageNet-like" not in capsys.readouterr().out


def test_ports_out_of_range_are_refused_by_the_parser(tmp_path):
    assert_message(run_cli("serve", "--repo", tmp_path, "--http-port", "70000"),
                   "--http-port: a port is a whole number from 1 to 65535, got 70000")
    assert_message(run_cli("threshold", "--url", "127.0.0.1:70000"),
                   "--url: a port is a whole number from 1 to 65535, got 70000")
