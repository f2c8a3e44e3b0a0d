"""The GPU bundle (scripts/gpu_bundle.sh) fits beside the tree, and unpacked into an empty folder it
serves the torch-runtime cascade from a clean environment (this machine's Python: a bundle made for it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from littlebig.model_repository.builder import build_repository
from littlebig.model_repository.options import RepositoryOptions

ROOT = Path(__file__).resolve().parent.parent
VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"

# Run by the Python the bundle was made for, with only env.sh's environment: serve and answer.
SERVE = """
import sys, numpy as np, littlebig
from littlebig.client.infer import LittleBigClient
from littlebig.serving.server import TritonServer, find_tritonserver
repository, images, out = sys.argv[1:4]
print("littlebig from", littlebig.__file__, "numpy from", np.__file__, "server", find_tritonserver().binary, flush=True)
batch = np.load(images)
with TritonServer(repository, log_file=out + ".log") as server, LittleBigClient(server.grpc_url) as client:
    answers = [client.infer(batch[i : i + 16]) for i in range(0, len(batch), 16)]
np.savez(out, **{k: np.concatenate([a[k] for a in answers]) for k in answers[0]})
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bundle")
    # XZ_LEVEL 0: the fast packing (the size printed is then larger than the default's).
    done = subprocess.run(["bash", "scripts/gpu_bundle.sh", VERSION, str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "XZ_LEVEL": "0"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "littlebig-gpu.tar.xz", done.stdout.strip().splitlines()[-1]


def test_the_bundle_and_the_tree_fit_in_what_travels(bundle):
    path, said = bundle
    together = float(re.search(r"together ([\d.]+) MiB of the 64 MiB", said).group(1))
    assert path.stat().st_size < together * 2**20 < 64 * 2**20, said


def test_the_unpacked_bundle_serves_the_torch_cascade(bundle, pair, offline, served_threshold, tmp_path):
    dest = tmp_path / "unpacked"
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_unpack.sh"), str(bundle[0]), str(dest)], cwd=tmp_path,
                          env=clean | {"PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    repository = build_repository(pair.little, pair.big, tmp_path / "repository",
                                  RepositoryOptions(runtime="torch", threshold=served_threshold, intra_op_threads=1))
    np.save(tmp_path / "images.npy", offline.images[:64])
    (tmp_path / "serve.py").write_text(SERVE)
    served = subprocess.run(
        ["bash", "-c", f'. "{dest}/env.sh" && python "{tmp_path}/serve.py" "$@"', "serve", str(repository),
         str(tmp_path / "images.npy"), str(tmp_path / "answers")],
        cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=300)
    assert served.returncode == 0, served.stdout + served.stderr
    assert f"littlebig from {dest}/site/" in served.stdout and f"numpy from {dest}/site/" in served.stdout and f"server {dest}/site/pytriton" in served.stdout, served.stdout
    answers = np.load(tmp_path / "answers.npz")
    cls, conf, route = offline.cascade(served_threshold)
    np.testing.assert_array_equal(answers["ROUTE"][:, 0], route[:64])
    np.testing.assert_array_equal(answers["CLASS"][:, 0], cls[:64])
    np.testing.assert_allclose(answers["CONFIDENCE"][:, 0], conf[:64], rtol=0, atol=1e-5)
