"""Watchdog for a served cascade: canary inferences through every model, restore on failure.

Triton's ready endpoints stay green when a python-backend stub has died (2.51 marks it unhealthy and
does not restart it while the model stays READY), so health is judged by a cheap canary inference
(one blank row of every declared input: a black image, zero token ids, ...) through every stage and
the gate (at T = 0, so it does not depend on the later stages), every ``interval_s``. A canary reaches
one instance of a model only, so the supervisor (on the server's machine) also counts the
python-backend stub processes: a READY model with an instance whose stub is gone (killed, crashed) is
restored by a reload, and a model that fails its canary by unload + load through the repository API
(with the admin key). Every ``watch_s`` it looks at the processes alone: a server that died is started
again on the same ports, and so is one whose gate model lost a stub (the requests that stub held are
answered by nobody until their connections close; see ``watch``). Each recovery logs a line and
increments littlebig_supervisor_recoveries_total{model, action} (written, Prometheus text format, to
``metrics_file``); repeated failures of one target back off exponentially up to ``max_backoff_s``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from littlebig.contract import GATE_MODEL, GateConfig
from littlebig.serving.server import ServerError, TritonServer

SERVER = "tritonserver"  # the target name of a whole-server restart


def gate_models(client: httpclient.InferenceServerClient, gate: str = GATE_MODEL) -> tuple[list[str], GateConfig]:
    """The served cascade's models, the gate's children first (so a gate is not blamed for a child): its
    stages in cost order, the ensemble's gate step, the gate; and the gate's parameters."""
    config = client.get_model_config(gate)
    holder = config["ensemble_scheduling"]["step"][-1]["model_name"] if config.get("platform") == "ensemble" else gate
    params = client.get_model_config(holder).get("parameters", {})
    settings = GateConfig.from_parameters({key: value["string_value"] for key, value in params.items()})
    return [*settings.stage_models, *([holder] if holder != gate else []), gate], settings


def _blank_input(spec: dict) -> httpclient.InferInput:
    """One row of zeros for a declared input (config JSON: name, data_type TYPE_*, dims)."""
    datatype = spec.get("data_type", "TYPE_FP32").removeprefix("TYPE_")
    shape = [1, *map(int, spec["dims"])]
    tensor = httpclient.InferInput(spec["name"], shape, datatype)
    tensor.set_data_from_numpy(np.zeros(shape, triton_to_np_dtype(datatype)))
    return tensor


@dataclasses.dataclass(frozen=True)
class SupervisorOptions:
    interval_s: float = 2.0  # between rounds of canaries
    watch_s: float = 0.25  # between looks at the server's process and its stubs (cheap: /proc only)
    canary_timeout_s: float = 5.0  # a canary slower than this counts as a failure (a stalled stub)
    failures_to_restore: int = 2  # consecutive failed canaries before a restore (one may be bad luck)
    min_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    metrics_file: Path | None = None


@dataclasses.dataclass
class Backoff:
    """When a target may be restored again: doubles after each restore that did not help."""

    failures: int = 0  # consecutive failed canaries
    restores: int = 0  # consecutive restores not followed by a passing canary
    not_before: float = 0.0


class Supervisor(threading.Thread):
    def __init__(self, server: TritonServer, options: SupervisorOptions = SupervisorOptions(), log: Callable[[str], None] | None = None):
        super().__init__(name="littlebig-supervisor", daemon=True)
        self.server = server
        self.options = options
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.recoveries: collections.Counter[tuple[str, str]] = collections.Counter()
        self._backoff: dict[str, Backoff] = collections.defaultdict(Backoff)
        self._stopping = threading.Event()
        self._stage_count = 2  # the gate's stages, read with the models (the canary's thresholds)
        self._gates = {GATE_MODEL}  # the ensemble and its gate model: canaries at T = 0
        self._instances: dict[str, list[str]] = {}  # the models' stub instance names, as the last canary round read them
        self._lock = threading.Lock()  # the recoveries' bookkeeping, shared by the two threads
        # The quick look has its own thread: a canary round or a reload may wait on the server for a
        # while (a reload of big minutes), and a dead server must not wait for it.
        self._watcher = threading.Thread(target=self._watch_loop, name="littlebig-watcher", daemon=True)

    def start(self) -> None:
        super().start()
        self._watcher.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the watchdog; a round still busy after ``timeout_s`` (a canary or reload waiting on the
        server) is left to end by itself: it is a daemon thread, and the server is being stopped."""
        self._stopping.set()
        self._watcher.join(timeout_s)
        self.join(timeout_s)
        if self.is_alive() or self._watcher.is_alive():
            self.log(f"littlebig supervisor: a check is still running after {timeout_s:g}s; stopping the server anyway")

    def run(self) -> None:
        while not self._stopping.wait(self.options.interval_s):
            self._guarded(self.check_once)

    def _watch_loop(self) -> None:
        while not self._stopping.wait(self.options.watch_s):
            self._guarded(self.watch)

    def _guarded(self, check: Callable[[], object]) -> None:
        try:
            check()
        except Exception as err:  # noqa: BLE001 - the watchdog itself must not die
            self.log(f"littlebig supervisor: check failed: {err!r}")

    def watch(self) -> bool:
        """The quick look, every watch_s: a dead server is started again, and a dead stub of the gate model
        restarts the whole server. The gate answers escalated requests after its execute returned, and
        Triton 2.51 answers none of those a dead stub held: only closing their connections ends them (the
        clients see UNAVAILABLE and can send them again; client/retry.py does). Returns whether it acted."""
        if self.server.process is None or self.server.process.poll() is not None:
            self._recover(SERVER, "restart", self._restart_server, f"exited with code {self.server.process.returncode}")
            return True
        if not self._instances:
            return False
        alive = stub_processes(self.server.process.pid)
        for gate in self._gates & set(self._instances):
            missing = [name for name in self._instances[gate] if name not in alive]
            if missing:
                self._recover(SERVER, "restart", self._restart_server, f"gate stub {', '.join(missing)} is gone; the "
                              "requests it held are ended by closing their connections")
                return True
        return False

    def check_once(self) -> None:
        """One round: restart a dead server, else canary every model and restore the failing ones."""
        if self.watch():
            return
        alive = stub_processes(self.server.process.pid)
        self._instances = self._models()
        for model, instances in self._instances.items():
            missing = [name for name in instances if name not in alive]
            if missing:
                self._recover(model, "reload", lambda m=model: self._reload(m), f"stub of {', '.join(missing)} is gone")
                return
            error = self.canary(model)
            state = self._backoff[model]
            if error is None:
                state.failures = state.restores = 0
                continue
            state.failures += 1
            if state.failures >= self.options.failures_to_restore:
                self._recover(model, "reload", lambda m=model: self._reload(m), error)
                return  # children first: a gate canary right after a child's restore would be noise
        server = self._backoff[SERVER]
        server.failures = server.restores = 0  # every model answered: a later restart waits no longer

    def _models(self) -> dict[str, list[str]]:
        """little, big, the gate step, the gate (children first), each with the instance names of its
        python-backend stubs (none for native backends and ensembles)."""
        models = {}
        with self._client() as client:
            names, settings = gate_models(client)
            self._stage_count = len(settings.stage_models)
            self._gates = set(names[len(settings.stage_models):])
            for model in names:
                config = client.get_model_config(model)
                groups = config.get("instance_group", []) if config.get("backend") == "python" else []
                models[model] = _instance_names(model, groups)
        return models

    def _client(self) -> httpclient.InferenceServerClient:
        timeout = self.options.canary_timeout_s
        return httpclient.InferenceServerClient(self.server.http_url, connection_timeout=timeout, network_timeout=timeout)

    def canary(self, model: str) -> str | None:
        """None if one blank row comes back through ``model`` in time, else what went wrong."""
        try:
            with self._client() as client:
                inputs = [_blank_input(spec) for spec in client.get_model_config(model)["input"]]
                parameters = None
                if model in self._gates:  # T = 0 everywhere: stage 0 answers
                    stages = self._stage_count
                    parameters = {"threshold": 0.0} if stages == 2 else {"thresholds": ",".join(["0"] * (stages - 1))}
                client.infer(model, inputs, parameters=parameters)
        except (InferenceServerException, OSError, TimeoutError) as err:
            return f"{type(err).__name__}: {err}"
        except Exception as err:  # noqa: BLE001 - geventhttpclient raises its own timeout types
            return f"{type(err).__name__}: {err}"
        return None

    def _recover(self, target: str, action: str, restore: Callable[[], None], reason: str) -> None:
        with self._lock:
            state = self._backoff[target]
            if self._stopping.is_set() or time.monotonic() < state.not_before:
                return  # (the server itself refuses a restart once its stop began)
            delay = min(self.options.max_backoff_s, self.options.min_backoff_s * 2**state.restores)
            attempt = state.restores = state.restores + 1
            state.failures = 0
            state.not_before = float("inf")  # one recovery of a target at a time
        self.log(f"littlebig supervisor: {target} unhealthy ({reason}); {action} (attempt {attempt})")
        started = time.monotonic()
        try:
            restore()
            self.log(f"littlebig supervisor: {target} {action} done in {time.monotonic() - started:.1f}s")
        except (InferenceServerException, ServerError, OSError) as err:
            self.log(f"littlebig supervisor: {target} {action} failed: {err}")
        with self._lock:
            self.recoveries[(target, action)] += 1
            state.not_before = time.monotonic() + delay
            self._write_metrics()

    def _reload(self, model: str) -> None:
        """New instances of ``model``: a load with its own config as override swaps them in while the
        old ones keep serving (no gap); if its stubs are still missing after that, unload + load."""
        headers = self.server.admin_headers("http")
        with httpclient.InferenceServerClient(self.server.http_url, network_timeout=120) as client:
            config = client.get_model_config(model)
            client.load_model(model, headers=headers, config=json.dumps(config))
            instances = self._models().get(model, [])
            alive = stub_processes(self.server.process.pid)
            if any(name not in alive for name in instances):
                self.log(f"littlebig supervisor: {model} reload left stubs missing; unload + load")
                client.unload_model(model, headers=headers)
                client.load_model(model, headers=headers)

    def _restart_server(self) -> None:
        self._instances = {}  # read again once the new server answers
        self.server.restart()

    def _write_metrics(self) -> None:
        if self.options.metrics_file is None:
            return
        lines = [
            "# HELP littlebig_supervisor_recoveries_total Restores by the littlebig supervisor",
            "# TYPE littlebig_supervisor_recoveries_total counter",
        ]
        for (target, action), count in sorted(self.recoveries.items()):
            lines.append(f'littlebig_supervisor_recoveries_total{{model="{target}",action="{action}"}} {count}')
        tmp = self.options.metrics_file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.options.metrics_file)


def _instance_names(model: str, groups: list[dict]) -> list[str]:
    """Triton's instance names: "<group name>_<i>", a group's name defaulting to "<model>_<group index>"."""
    return [f"{group.get('name') or f'{model}_{g}'}_{i}" for g, group in enumerate(groups) for i in range(int(group.get("count", 1)))]


def stub_processes(server_pid: int) -> dict[str, int]:
    """Instance name (e.g. "big_0_0") -> pid of each live python-backend stub under ``server_pid``."""
    stubs = {}
    for pid in descendants(server_pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        # argv: stub, model.py, shm region, shm size, growth, parent pid, backend dir, ipc size, instance name, ...
        if args and args[0].endswith(b"triton_python_backend_stub") and len(args) > 8:
            stubs[args[8].decode()] = pid
    return stubs


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found
