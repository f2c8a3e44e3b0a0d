"""The choice for a dead gate stub, measured: a gate whose execute waits for its escalations (so Triton
answers what a dead stub held, as for any execute) against littlebig's gate, which answers escalated
requests after its execute returned (Triton 2.51 then answers none of those a dead stub held; the
supervisor restarts the server to end them).

    .venv/bin/python bench/hold_in_execute.py throughput 4,16 3   # closed loop, rotating rounds
    .venv/bin/python bench/hold_in_execute.py fault               # kill a gate stub under raw load, no supervisor

The waiting gate is a copy of the built gate package with two lines changed at build time (the
escalation task is returned and awaited); runs/lite/{little,big}.onnx (Lite0 -> Lite2) at T = 0.36.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpcaio

from littlebig.client.closed_loop import closed_loop, image_inputs
from littlebig.client.images import list_images, to_wire_batch
from littlebig.model_repository.builder import build_repository
from littlebig.model_repository.configs import read_config, write_config
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.reliability import Expected, Load, report, stub_pid
from littlebig.serving.server import TritonServer

ROOT = Path(__file__).resolve().parent.parent

mode = sys.argv[1]  # throughput CONCURRENCIES ROUNDS, or fault
T = 0.36
OUT = [grpcaio.InferRequestedOutput(n) for n in ("CLASS", "CONFIDENCE", "ROUTE")]

def add_gate(repo, name, instances, hold):
    """A copy of the ensemble and its gate under `name`, the gate waiting for its escalations when `hold`."""
    gate = read_config(repo / "gate" / "config.pbtxt"); ens = read_config(repo / "littlebig" / "config.pbtxt")
    gate.name = f"{name}_gate"; gate.instance_group[0].count = instances
    ens.name = name; ens.ensemble_scheduling.step[-1].model_name = gate.name
    shutil.copytree(repo / "gate", repo / gate.name); write_config(repo / gate.name, gate)
    shutil.copytree(repo / "littlebig", repo / name); write_config(repo / name, ens)
    if hold:
        c = repo / gate.name / "1" / "cascade.py"; c.write_text(c.read_text().replace("task.add_done_callback(self.tasks.discard)\n", "task.add_done_callback(self.tasks.discard)\n        return task\n"))
        m = repo / gate.name / "1" / "model.py"; m.write_text(m.read_text().replace("        self.cascade.launch(escalation)\n", "        await self.cascade.launch(escalation)\n"))
        assert "await self.cascade.launch" in m.read_text() and "return task" in c.read_text()

def served(model):
    async def f(client, image):
        r = await client.infer(model, [image], outputs=OUT); return int(r.as_numpy("ROUTE")[0, 0])
    return f

with tempfile.TemporaryDirectory() as tmp:
    repo = build_repository(ROOT / "runs/lite/little.onnx", ROOT / "runs/lite/big.onnx", Path(tmp) / "r", RepositoryOptions(threshold=T))
    add_gate(repo, "bg2", 2, False); add_gate(repo, "hold2", 2, True); add_gate(repo, "hold4", 4, True)
    with TritonServer(repo, log_file=Path(tmp) / "log") as s:
        images = to_wire_batch(list_images(ROOT.parent / "shared/data/imagenet-sample")[:64], 260, 0.875)
        if mode == "throughput":
            inputs = image_inputs(images)
            variants = {v: served(v) for v in ("bg2", "hold2", "hold4")}
            conc = [int(c) for c in sys.argv[2].split(",")]; rounds = int(sys.argv[3])
            res = {(v, c): [] for v in variants for c in conc}
            for r in range(rounds):
                for c in conc:
                    names = list(variants); k = r % len(names); names = names[k:] + names[:k]
                    for v in names:
                        a = closed_loop(s.grpc_url, variants[v], inputs, c, 8.0, seed=r)
                        res[(v, c)].append((len(a) / 8.0, float(np.median([x.latency_ms for x in a])), float(np.percentile([x.latency_ms for x in a], 99))))
            for c in conc:
                base = res[("bg2", c)]
                print(f"c={c}: " + "  ".join(f"{v} {statistics.median(a[0]/b[0] for a, b in zip(res[(v, c)], base)):.2f} of bg2 (p50 {statistics.median(x[1] for x in res[(v, c)]):.0f} ms, p99 {statistics.median(x[2] for x in res[(v, c)]):.0f} ms)" for v in variants))
        else:  # kill a gate stub of each variant under raw load, no supervisor
            import littlebig.serving.reliability as rel
            expected = Expected.from_repository(repo, images)
            conf = expected.little.max(1)
            thresholds = [float(np.quantile(conf, q)) for q in (0.3, 0.5, 0.7)]
            for model in ("bg2", "hold2"):
                rel.GATE_MODEL = model
                load = Load(s.grpc_url, expected, thresholds, concurrency=6, timeout_s=20.0).start()
                time.sleep(4.0)
                at = time.monotonic()
                os.kill(stub_pid(s.process.pid, f"{model}_gate_0_0"), signal.SIGKILL)
                time.sleep(2.5)
                held = report(load.outcomes, at, sending=load.sending)
                time.sleep(20.0)
                load.stop()
                final = report(load.outcomes, at)
                print(f"{model}: unanswered 2 s after the kill {held.unanswered}; then {final.line()}", flush=True)
