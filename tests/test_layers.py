"""The package's layers (pyproject.toml, [tool.importlinter]) hold: each imports only from those below it.

import-linter walks a package's folders, and littlebig's subpackages live in the top-level folders the
design names (client/, export/, model_repository/, model_repository/gate/), mapped by setuptools'
package-dir. So the test lays the sources out as Python imports them, in a temporary folder, and runs
lint-imports there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout(out: Path) -> Path:
    """The package's sources under ``out`` as ``import littlebig...`` sees them."""
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    owned = set(folders.values())  # a subfolder that is another package's folder is laid out under that name

    def ignore(directory, names):
        here = Path(directory).relative_to(ROOT)
        return {name for name in names if name == "__pycache__" or str(here / name) in owned}

    for package, folder in folders.items():
        shutil.copytree(ROOT / folder, out.joinpath(*package.split(".")), dirs_exist_ok=True, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", out)
    return out


def test_each_layer_imports_only_from_those_below(tmp_path):
    tree = layout(tmp_path)
    assert (tree / "littlebig" / "gate" / "model.py").is_file() and not (tree / "littlebig" / "model_repository" / "gate").exists()
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout
