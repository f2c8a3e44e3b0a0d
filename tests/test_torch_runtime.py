"""The torch runtime (TorchScript stages in the python backend, `--runtime torch`) answers as onnxruntime does."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from littlebig.client.infer import LittleBigClient
from littlebig.contract import BIG_MODEL, LITTLE_MODEL
from littlebig.export.metadata import torchscript_path
from littlebig.model_repository.builder import build_repository
from littlebig.model_repository.configs import read_config
from littlebig.model_repository.facts import RepositoryError
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.server import TritonServer
from tritonclient.grpc import model_config_pb2 as mc

from .test_serving import assert_matches_offline, serve_all


@pytest.fixture(scope="module")
def torch_server(pair, served_threshold, tmp_path_factory):
    options = RepositoryOptions(runtime="torch", threshold=served_threshold, intra_op_threads=1)
    repository = build_repository(pair.little, pair.big, tmp_path_factory.mktemp("torch-repo") / "repository", options)
    with TritonServer(repository, log_file=tmp_path_factory.mktemp("torch-server") / "tritonserver.log") as running:
        yield running


def test_torch_stages_answer_as_onnxruntime(torch_server, offline, served_threshold):
    with LittleBigClient(torch_server.grpc_url) as client:
        out = serve_all(client, offline.images, return_probs=True)
        low = serve_all(client, offline.images, threshold=float(np.quantile(offline.little.max(1), 0.8)))
    assert_matches_offline(out, offline, served_threshold)
    assert_matches_offline(low, offline, float(np.quantile(offline.little.max(1), 0.8)))
    probs = np.where(out["ROUTE"] == 1, offline.big, offline.little)
    np.testing.assert_allclose(out["PROBS"], probs, rtol=0, atol=1e-5)  # TorchScript vs the ONNX graph


def test_torch_repository_configs(pair, tmp_path):
    cpu = build_repository(pair.little, pair.big, tmp_path / "cpu", RepositoryOptions(runtime="torch"))
    gpu = build_repository(pair.little, pair.big, tmp_path / "gpu", RepositoryOptions(runtime="torch", gpu=True))
    for stage in (LITTLE_MODEL, BIG_MODEL):
        assert (cpu / stage / "1" / "model.pt").is_file() and (cpu / stage / "1" / "model.py").is_file()
        assert read_config(cpu / stage / "config.pbtxt").instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert read_config(gpu / stage / "config.pbtxt").instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert not RepositoryOptions(runtime="torch").in_gate  # little is the ensemble's step: the gate needs no torch


def test_torch_runtime_needs_the_torchscript_and_gpu_needs_torch(pair, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for role in ("little", "big"):
        shutil.copyfile(getattr(pair, role), bare / f"{role}.onnx")
    with pytest.raises(RepositoryError, match=r"missing: .*little\.pt.*export with --torchscript"):
        build_repository(bare / "little.onnx", bare / "big.onnx", tmp_path / "repo", RepositoryOptions(runtime="torch"))
    assert not (tmp_path / "repo").exists()  # refused before anything was written
    assert torchscript_path(pair.little).is_file()
    with pytest.raises(RepositoryError, match="--gpu places the torch runtime"):
        build_repository(pair.little, pair.big, tmp_path / "repo", RepositoryOptions(runtime="python", gpu=True))
