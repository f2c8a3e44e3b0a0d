"""`pip install .` is light: the wheel holds the gate's files, does not require torch, and the commands
that serve, build and calibrate run in an environment without torch; those that need it name the extra.

The fresh environment gets the wheel and, in place of a download, this venv's packages minus torch,
torchvision, timm and what only they need (a folder of links, on its path), so the test needs no network
and no minutes of installing, and still runs nothing of torch's."""

from __future__ import annotations

import email
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What the export extra brings (torch's own CUDA libraries included), left out of the fresh environment.
EXPORT_ONLY = {"torch", "torchvision", "timm", "functorch", "torchgen", "triton", "onnxscript", "skimage", "scikit_image",
               "littlebig"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    return next(out.glob("littlebig-*.whl"))


def test_the_wheel_holds_the_gate_and_does_not_require_torch(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = email.message_from_bytes(archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    for module in ("model.py", "config.py", "cascade.py", "gears.py", "signals.py"):
        assert f"littlebig/gate/{module}" in names
    assert "littlebig/model_repository/python_runtime/1/model.py" in names
    required = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert not [r for r in required if r.split()[0].split("[")[0].split(">")[0].split("=")[0] in ("torch", "torchvision", "timm")]
    assert any("torch" in r and 'extra == "export"' in r for r in metadata.get_all("Requires-Dist"))


def light_environment(tmp_path: Path, wheel: Path) -> Path:
    """A venv with the wheel and this venv's packages but those of the export extra."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    deps = tmp_path / "deps"
    deps.mkdir()
    for entry in site.iterdir():
        base = entry.name.split("-")[0].split(".")[0].lower()
        if base not in EXPORT_ONLY and not base.startswith(("efficientnet", "__editable__")) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    nvidia = deps / "nvidia"  # torch's CUDA libraries stay out; perf_analyzer's CUDA runtime stays in
    nvidia.unlink()
    nvidia.mkdir()
    (nvidia / "cuda_runtime").symlink_to(site / "nvidia" / "cuda_runtime")
    (nvidia / "__init__.py").touch()
    own_site = next((venv / "lib").glob("python3*/site-packages"))
    (own_site / "light-deps.pth").write_text(str(deps) + "\n")
    return venv


def test_serving_commands_run_without_torch_and_export_names_its_extra(wheel, pair, tmp_path):
    venv = light_environment(tmp_path, wheel)
    python, littlebig = venv / "bin" / "python", venv / "bin" / "littlebig"
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0
    run = lambda *argv: subprocess.run([str(littlebig), *argv], capture_output=True, text=True, timeout=300)  # noqa: E731
    assert run("--help").returncode == 0
    built = run("repo", "--little", str(pair.little), "--big", str(pair.big), "--out", str(tmp_path / "repo"))
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "repo" / "gate" / "1" / "model.py").is_file()
    for command in ("serve", "classify", "calibrate", "threshold", "bench", "batch", "plan"):
        assert run(command, "--help").returncode == 0, command
    refused = run("export", "timm:resnet10t", "--out", str(tmp_path / "m.onnx"))
    assert refused.returncode == 2 and "pip install 'littlebig[export]'" in refused.stderr and "Traceback" not in refused.stderr
