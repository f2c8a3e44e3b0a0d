"""The deployment files under docker/ validate with the real tools where they are installed
(scripts/setup.sh installs them): promtool (Debian's prometheus), kubernetes-validate (PyPI, with
the Kubernetes schemas inside), docker-compose (Debian; `config` needs no engine). The container
entrypoint runs here with the bundled tritonserver and locks the repository API."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from littlebig.serving.server import TritonServer, find_tritonserver, free_port

DOCKER = Path(__file__).resolve().parent.parent / "docker"
K8S_CORE = ["deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "prometheus-adapter-rules.yaml"]
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


@needs_promtool
def test_prometheus_config_and_rules_check_and_their_unit_tests_pass():
    for cmd in (["promtool", "check", "config", "prometheus.yml"], ["promtool", "test", "rules", "alerts_test.yml"]):
        result = run(cmd, cwd=DOCKER / "prometheus")
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_every_dashboard_query_parses(tmp_path):
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "littlebig.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 6
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(rules))
    result = run(["promtool", "check", "rules", str(tmp_path / "queries.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    (tmp_path / "broken.yml").write_text(yaml.safe_dump({"groups": [{"name": "b", "rules": [{"record": "b:q", "expr": "sum(rate(x[5m])"}]}]}))
    assert run(["promtool", "check", "rules", str(tmp_path / "broken.yml")]).returncode != 0, "promtool must reject bad PromQL"


def test_kubernetes_manifests_validate_against_the_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    for name in K8S_CORE:
        for document in yaml.safe_load_all((DOCKER / "k8s" / name).read_text()):
            kubernetes_validate.validate(document, version, strict=True)
    deployment = yaml.safe_load((DOCKER / "k8s" / "deployment.yaml").read_text())
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert "littlebig-canary" in " ".join(container["livenessProbe"]["exec"]["command"])


def test_kserve_inference_service_shape():
    # kubernetes-validate carries no KServe CRD schema: the fields KServe's Triton runtime needs are checked.
    service = yaml.safe_load((DOCKER / "k8s" / "kserve-inferenceservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["storageUri"]
    assert "--model-control-mode=explicit" in model["args"]


def test_compose_file_validates_and_publishes_on_loopback_only():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert not any("8002" in str(p) for p in compose["services"]["triton"].get("ports", [])), "metrics stay internal"
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    result = run(["docker-compose", "-f", str(DOCKER / "compose.yaml"), "config", "-q"])
    assert result.returncode == 0, result.stdout + result.stderr


def _unload(http_url: str, key: str | None) -> int:
    request = urllib.request.Request(f"http://{http_url}/v2/repository/models/littlebig/unload", data=b"{}", method="POST")
    if key is not None:
        request.add_header("littlebig-admin-key", key)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_entrypoint_locks_the_repository_api(repository, tmp_path):
    """docker/entrypoint.sh with the bundled tritonserver: load/unload need the admin key header."""
    install = find_tritonserver()
    env = {**os.environ, **install.env, "LITTLEBIG_ADMIN_KEY": "s3cret", "LITTLEBIG_REPOSITORY": str(repository)}
    env["PATH"] = f"{install.binary.parent}{os.pathsep}{env['PATH']}"
    server = TritonServer(repository, log_file=tmp_path / "tritonserver.log")
    args = [f"--{kind}-{flag}={value}" for kind, port in (("http", server.http_port), ("grpc", server.grpc_port))
            for flag, value in (("address", "127.0.0.1"), ("port", port))]
    args += [f"--metrics-port={free_port()}", "--metrics-address=127.0.0.1"]
    if install.backend_dir is not None:
        args.append(f"--backend-directory={install.backend_dir}")
    with open(server.log_file, "wb") as log:
        server.process = subprocess.Popen(["sh", str(DOCKER / "entrypoint.sh"), *args], stdout=log, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True)
    try:
        server.wait_ready()
        assert _unload(server.http_url, None) == 403
        assert _unload(server.http_url, "wrong") == 403
        assert server.is_ready(), "a refused unload leaves the gate serving"
        assert _unload(server.http_url, "s3cret") == 200
    finally:
        server.stop()


def test_container_canary_passes_on_a_healthy_server_and_names_a_model_that_does_not_answer(server, tmp_path):
    """docker/canary.py (the container's liveness check) through the real server: every model answers;
    a model that is not served, or a server that is gone, fails it with a line naming the cause."""
    canary = [sys.executable, str(DOCKER / "canary.py"), "--url", server.http_url]
    ok = subprocess.run(canary, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run(canary + ["--models", "little,nosuch"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "canary: model 'nosuch' did not answer" in missing.stderr
    from littlebig.serving.server import free_port

    gone = subprocess.run([sys.executable, str(DOCKER / "canary.py"), "--url", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=120)
    assert gone.returncode == 1 and "canary: model 'little' did not answer" in gone.stderr
