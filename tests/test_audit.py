"""The audit through a real server: every row little answers is also sent to big (audit_rate 1, so the
counts are exact and checked against onnxruntime), first with big answering as little does (nothing
differs), then with big's answers swapped for another model's: the bound and the alert must rise. Then
`calibrate --from-audit` chooses T on the recorded rows and applies it."""

from __future__ import annotations

import shutil
import subprocess
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from littlebig.admin import admin_headers
from littlebig.cli import main
from littlebig.client.audit import Snapshot, live_bound, read_snapshot
from littlebig.client.control import served_thresholds
from littlebig.client.criterion import Criterion
from littlebig.client.infer import LittleBigClient
from littlebig.client.recalibrate import calibrate_from_audit, choose_from_audit
from littlebig.gate.config import AUDIT_BINS
from littlebig.model_repository.builder import build_repository, read_gate, write_thresholds
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.server import TritonServer

PROMISE = 0.05
RULES = Path(__file__).resolve().parent.parent / "docker" / "prometheus" / "alerts.yml"


@pytest.fixture(scope="module")
def audit_server(pair, served_threshold, tmp_path_factory):
    """A gate auditing every row little answers, with big answering as little does (little's ONNX file in
    big's place; the repository is built with big's, so the gate knows big's MACs)."""
    root = tmp_path_factory.mktemp("audit")
    options = RepositoryOptions(runtime="python", max_batch_size=64, threshold=served_threshold, intra_op_threads=1,
                                audit_rate=1.0, audit_in_flight=64, audit_promise=PROMISE)
    repo = build_repository(pair.little, pair.big, root / "repository", options)
    shutil.copyfile(pair.little, repo / "big" / "1" / "model.onnx")
    with TritonServer(repo, log_file=root / "tritonserver.log") as server:
        yield server, repo


def send(server, images, batch=10):
    with LittleBigClient(server.grpc_url) as client:
        for start in range(0, len(images), batch):
            client.infer(images[start:start + batch])


def served_traffic(server, images) -> Snapshot:
    """The audit's counts over sending ``images`` once."""
    before = read_snapshot(server.metrics_url)
    send(server, images)
    return read_snapshot(server.metrics_url).minus(before)


def binned(conf, mask):
    bins = np.minimum((conf * AUDIT_BINS).astype(int), AUDIT_BINS - 1)
    return np.bincount(bins[mask], minlength=AUDIT_BINS)


def expected(offline, threshold, big_probs):
    """What the gate must count, from onnxruntime's answers."""
    conf = offline.little.max(1).astype(np.float64)
    kept = conf >= threshold
    differ = offline.little.argmax(1) != big_probs.argmax(1)
    return conf, kept, differ


def test_every_kept_row_is_audited_and_the_promise_holds_while_big_agrees(audit_server, offline, served_threshold):
    server, _ = audit_server
    window = served_traffic(server, offline.images)
    conf, kept, _ = expected(offline, served_threshold, offline.little)
    assert window.covered == len(conf) and sum(window.skipped.values()) == 0
    assert window.audited == kept.sum() and window.disagree == 0
    np.testing.assert_array_equal(window.bins["kept_rows"], binned(conf, kept))
    np.testing.assert_array_equal(window.bins["escalated_rows"], binned(conf, ~kept))
    assert window.bins["escalated_differ"].sum() == 0
    block = live_bound(window)
    assert block["estimate"] == 0 and block["upper"] < PROMISE and block["holds"] is True
    main(["audit", "--url", server.grpc_url, "--metrics-url", server.metrics_url, "--check"])  # exits 0: no SystemExit


def test_swapping_bigs_answers_raises_the_bound_and_the_alert(audit_server, pair, offline, served_threshold, tmp_path, capsys):
    server, repo = audit_server
    shutil.copyfile(pair.big, repo / "big" / "1" / "model.onnx")  # big now answers as itself
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.load_model("big", headers=admin_headers(server.grpc_url))
    window = served_traffic(server, offline.images)
    conf, kept, differ = expected(offline, served_threshold, offline.big)
    assert (kept & differ).sum() > 0.1 * len(conf)  # the swap really changes answers
    assert window.covered == len(conf) and window.audited == kept.sum()
    assert window.disagree == (kept & differ).sum()
    np.testing.assert_array_equal(window.bins["kept_differ"], binned(conf, kept & differ))
    np.testing.assert_array_equal(window.bins["escalated_differ"], binned(conf, ~kept & differ))
    block = live_bound(window)
    assert block["upper"] > block["estimate"] >= (kept & differ).mean() - 1e-12
    assert block["holds"] is False and block["alert_upper"] > PROMISE
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["audit", "--url", server.grpc_url, "--metrics-url", server.metrics_url, "--check"])
    assert exited.value.code == 1 and "NOT CONFIRMED" in capsys.readouterr().out
    window.save(tmp_path / "window.json")
    assert Snapshot.load(tmp_path / "window.json").disagree == window.disagree
    if shutil.which("promtool"):
        assert promtool_confirms(tmp_path, window, firing=True), "the alert rule must fire on the swapped counts"
        clean = Snapshot(**{**window.__dict__, "disagree": 0.0})
        assert promtool_confirms(tmp_path, clean, firing=False), "the alert rule must stay quiet when nothing differs"


def promtool_confirms(folder: Path, window: Snapshot, firing: bool) -> bool:
    """Whether the alert rule, on these counts repeated every minute for an hour, fires (``firing``) or
    stays quiet, as promtool evaluates it. A firing alert is expected with the rule's own labels and
    annotations (promtool compares them exactly)."""
    rule = next(r for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"]
                if r.get("alert") == "LittleBigAuditAbovePromise")
    series = {"littlebig_audit_covered_rows_total": f"0+{window.covered:g}x60",
              "littlebig_audit_disagree_rows_total": f"0+{window.disagree:g}x60",
              "littlebig_audit_rate": f"{window.rate:g}x60", "littlebig_audit_promise": f"{window.promise:g}x60"}
    expected = [{"exp_labels": rule["labels"], "exp_annotations": rule["annotations"]}] if firing else []
    test = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": f'{name}{{job="triton",instance="a",model="gate"}}', "values": v} for name, v in series.items()],
        "alert_rule_test": [{"eval_time": "60m", "alertname": "LittleBigAuditAbovePromise", "exp_alerts": expected}],
    }]}
    (folder / "audit_test.yml").write_text(yaml.safe_dump(test))
    run = subprocess.run(["promtool", "test", "rules", "audit_test.yml"], cwd=folder, capture_output=True, check=False)
    return run.returncode == 0


def test_calibrate_from_audit_chooses_on_the_live_rows_and_applies_it(audit_server, offline, served_threshold, tmp_path):
    server, repo = audit_server
    criterion = Criterion(max_acc_drop=0.3)
    report = calibrate_from_audit(server.grpc_url, tmp_path / "out", criterion, metrics_url=server.metrics_url, apply=True,
                                  write=partial(write_thresholds, repo), log=lambda *_: None)
    # Since the gate loaded: the rows with big as little (nothing differs), then with big swapped.
    conf, kept, differ = expected(offline, served_threshold, offline.big)
    zeros = np.zeros(AUDIT_BINS)
    truth = Snapshot(rate=1.0, promise=PROMISE, covered=2.0 * len(conf), audited=2.0 * kept.sum(), disagree=float((kept & differ).sum()),
                     skipped={}, bins={"kept_rows": 2.0 * binned(conf, kept), "kept_differ": binned(conf, kept & differ) + zeros,
                                       "escalated_rows": 2.0 * binned(conf, ~kept), "escalated_differ": binned(conf, ~kept & differ) + zeros})
    again = choose_from_audit(truth, tuple(read_gate(repo)[2].stage_macs), criterion)
    assert report["criterion_met"] and report["threshold"] == again["threshold"]
    assert report["bound"]["upper_drop"] <= 0.3 and "not against the truth" in report["bound"]["on"]
    assert served_thresholds(server.grpc_url) == (report["threshold"],)  # applied without a restart
    written = read_gate(repo)[2]
    assert written.thresholds == (report["threshold"],) and written.audit_promise == 0.3
