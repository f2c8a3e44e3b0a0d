"""bench/gpu.py's dry run: the whole GPU benchmark with tiny models on the CPU, within a minute."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_dry_run(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    record = result["pairs"]["tiny"]
    assert record["answers"]["route_mismatches"] == 0 and record["answers"]["class_mismatches"] == 0, record["answers"]
    assert [p["concurrency"] for p in record["points"]] == result["concurrency"]
    for point in record["points"]:
        summary = point["summary"]
        assert all(t > 0 for t in summary["throughput"].values()), summary
        assert 0.0 < point["cascade"]["escalated"] < 1.0 and point["big"]["escalated"] == 1.0, point
        assert summary["s_star_macs"] > 1.0 and summary["achieved"] > 0, summary
    assert set(record["gate_own_ms"]) == {"1", "8"} and all(ms > 0 for ms in record["gate_own_ms"].values())
    assert (tmp_path / "tiny_tritonserver_tail.log").stat().st_size > 0
