"""The command line end to end: export, repo, serve (Ctrl-C), classify, threshold."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from littlebig.cli import main
from littlebig.client.images import sample_photos
from littlebig.model_repository.builder import gate_config_path
from littlebig.serving.server import free_port

LITTLEBIG = [sys.executable, "-m", "littlebig.cli"]


def test_export_and_repo_commands(tmp_path, capsys):
    onnx = tmp_path / "m.onnx"
    main(["export", "timm:resnet10t", "--random-init", "--num-classes", "5", "--resolution", "32", "--wire-size", "40", "--out", str(onnx)])
    out = capsys.readouterr().out
    assert "parity vs PyTorch" in out and "argmax agreement 100.0%" in out and "wire size 40" in out
    main(["repo", "--little", str(onnx), "--big", str(onnx), "--out", str(tmp_path / "repo"), "--threshold", "0.3"])
    assert (tmp_path / "repo" / "littlebig" / "config.pbtxt").is_file()


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "nonsense", "--out", str(tmp_path / "x.onnx")])
    assert exc.value.code == 2
    assert "not understood" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["repo", "--little", "a.onnx", "--big", "b.onnx", "--out", str(tmp_path), "--threshold", "2"])
    assert "threshold" in capsys.readouterr().err


def test_classify_command_over_grpc_and_http(server, tmp_path, capsys):
    paths = []
    for name, img in sample_photos(["chelsea", "coffee"]).items():
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(img).save(paths[-1])
    main(["classify", "--url", server.grpc_url, *map(str, paths)])
    grpc_out = capsys.readouterr().out
    main(["classify", "--http", "--url", server.http_url, *map(str, paths)])
    http_out = capsys.readouterr().out
    assert grpc_out == http_out
    rows = [line for line in grpc_out.splitlines() if line.endswith(("little", "big"))]
    assert len(rows) == 2 and "chelsea.png" in rows[0]


def test_serve_command_prints_urls_and_stops_on_ctrl_c(repository, tmp_path):
    copy = tmp_path / "repository"  # a copy: this test rewrites the gate's threshold
    shutil.copytree(repository, copy)
    repository = copy
    ports = [str(free_port()) for _ in range(3)]
    log = tmp_path / "serve.log"
    # Started with SIGINT ignored, as a shell script's background job is: serve must still stop on it.
    proc = subprocess.Popen(
        [*LITTLEBIG, "serve", "--repo", str(repository), "--http-port", ports[0], "--grpc-port", ports[1],
         "--metrics-port", ports[2], "--log-file", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "Ctrl-C" in line or not line:
            break
    text = "".join(lines)
    assert f"127.0.0.1:{ports[1]}" in text and f"127.0.0.1:{ports[0]}" in text and "/metrics" in text
    main(["threshold", "--url", f"127.0.0.1:{ports[1]}", "0.125", "--repo", str(repository)])  # live switch
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "stopping tritonserver" in rest
    assert "successfully unloaded 'littlebig'" in log.read_text()
    assert re.search(r'thresholds.*\n.*\n.*0\.125', gate_config_path(repository).read_text())
