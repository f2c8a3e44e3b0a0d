"""The repository, shared-memory, logging and trace APIs are locked behind the admin key that the
launcher creates and stores for this user; inference, health, metadata and statistics stay open."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from littlebig import admin
from littlebig.serving.server import ServerError, TritonServer

from ..conftest import WIRE


def refused(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return f"{info.value.status()} {info.value.message()}"


def test_admin_calls_without_the_key_are_refused_over_both_protocols(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        hijack = client.get_model_config("gate", as_json=True)["config"]  # the ensemble's gate step
        hijack["parameters"]["stage_models"] = {"string_value": "little,little"}
        for call in (
            lambda: client.unload_model("big"),
            lambda: client.load_model("gate", config=json.dumps(hijack)),
            lambda: client.get_model_repository_index(),
            lambda: client.register_system_shared_memory("region", "/littlebig-test", 1024),
            lambda: client.update_log_settings({"log_file": "/tmp/littlebig-owned.log"}),
            lambda: client.unload_model("big", headers={admin.GRPC_HEADER: "wrong"}),
        ):
            assert "restricted" in refused(call) and admin.GRPC_HEADER in refused(call)
    with httpclient.InferenceServerClient(server.http_url) as client:
        for call in (
            lambda: client.unload_model("big"),
            lambda: client.load_model("gate", config=json.dumps(hijack)),
            lambda: client.register_system_shared_memory("region", "/littlebig-test", 1024),
            lambda: client.unload_model("big", headers={admin.HEADER: "wrong"}),
        ):
            message = refused(call)
            assert message.startswith("403") and admin.HEADER in message
        assert client.is_model_ready("big") and client.is_model_ready("littlebig")
        # Read-only APIs stay open.
        assert client.get_model_config("gate")["parameters"]["stage_models"]["string_value"] == "little,big"
        assert client.get_inference_statistics("littlebig")["model_stats"]
        image = httpclient.InferInput("IMAGE", [1, WIRE, WIRE, 3], "UINT8")
        image.set_data_from_numpy(np.zeros((1, WIRE, WIRE, 3), np.uint8))
        assert client.infer("littlebig", [image]).as_numpy("ROUTE").shape == (1, 1)


def test_the_stored_key_unlocks_and_only_this_user_can_read_it(server, monkeypatch):
    path = admin.keys_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert admin.find_key(server.grpc_url) == admin.find_key(f"localhost:{server.http_port}") == server.admin_key
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.get_model_repository_index(headers=admin.admin_headers(server.grpc_url))
    with httpclient.InferenceServerClient(server.http_url) as client:
        client.load_model("little", headers=admin.admin_headers(server.http_url, "http"))
    # LITTLEBIG_ADMIN_KEY overrides the file: a wrong one is refused.
    monkeypatch.setenv(admin.KEY_ENV, "not-the-key")
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert "restricted" in refused(lambda: client.get_model_repository_index(headers=admin.admin_headers(server.grpc_url)))


def test_only_loopback_unless_asked(repository):
    with pytest.raises(ServerError, match="--allow-remote"):
        TritonServer(repository, host="0.0.0.0")
    with pytest.raises(ServerError, match="locked"):
        TritonServer(repository, host="0.0.0.0", allow_remote=True, lock_admin=False)


def test_a_wildcard_bind_stores_its_key_where_local_admin_commands_look():
    assert admin.normalize("0.0.0.0:8001") == admin.normalize("http://localhost:8001/") == "127.0.0.1:8001"


def test_a_damaged_key_store_is_named_and_no_server_is_left_running(repository, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    admin.keys_file().parent.mkdir(parents=True)
    admin.keys_file().write_text("{not json")
    server = TritonServer(repository, log_file=tmp_path / "log.txt")
    with pytest.raises(admin.AdminKeyError, match=f"cannot read the admin key store {admin.keys_file()}"):
        server.start()
    assert server.process is None  # refused before tritonserver was started
    with pytest.raises(admin.AdminKeyError, match="delete it"):
        admin.find_key(server.grpc_url)
