"""Start and stop a Triton Inference Server for a model repository.

Finds a ``tritonserver`` binary (on PATH, under /opt/tritonserver, or the one that ships inside the
``nvidia-pytriton`` wheel), binds it to loopback on free ports, waits until it is ready and stops it
cleanly. Usable as a context manager::

    with TritonServer("repo") as server:
        print(server.grpc_url)

The repository, shared-memory, logging and trace APIs are locked behind an admin key by default
(client/admin.py): the key is stored for this server's addresses while it runs, so this user's admin
calls find it. Binding anything but loopback needs ``allow_remote=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from littlebig import admin
from littlebig.contract import GATE_MODEL
from littlebig.errors import UserError

# Python-backend shared memory: each python model instance gets a region of this size that grows in
# these steps. 64 images of 260x260x3 uint8 are 13 MB; start big enough that a full batch needs no growth.
DEFAULT_BACKEND_CONFIG = (
    "python,shm-default-byte-size=33554432",
    "python,shm-growth-byte-size=16777216",
)


# The python backend's default region prefix, with a token per server added (shm_prefix) so that a
# server's own regions can be found and removed after it was killed.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"


class ServerError(UserError):
    """The server could not be found, started or did not become ready."""


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before by this process: the kernel may offer a port
    it just offered again, and a server given one port for HTTP and metrics does not start (seen once in
    the test suite)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclasses.dataclass(frozen=True)
class TritonInstall:
    """Where the server binary is and which backend directory it needs (None: its own default)."""

    binary: Path
    backend_dir: Path | None
    env: dict[str, str]


def _wheel_layout_install(root: Path, where: str) -> TritonInstall:
    """The server laid out as the nvidia-pytriton wheel lays it out under ``root`` (bin/, backends/python/,
    python_backend_stubs/<version>/, and its libraries in ../../nvidia_pytriton.libs, where the binaries'
    RPATHs look): the wheel itself, or the GPU bundle unpacked (scripts/gpu_bundle.sh)."""
    binary = root / "bin" / "tritonserver"
    if not binary.exists():
        raise ServerError(f"{where} has no tritonserver at {binary}")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"{where} has no python backend stub for Python {version} ({stub})")
    # The wheel keeps the python backend and its per-Python-version stubs apart; Triton wants them
    # in one folder. Links, not copies: a copied stub cannot find the libcudart it is linked with.
    token = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    backend_dir = Path(tempfile.gettempdir()) / f"littlebig-backends-{os.getuid()}-py{version}-{token}"
    python_dir = backend_dir / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    links = {
        "libtriton_python.so": root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": root / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    for name, target in links.items():
        link = python_dir / name
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(target)
    # The stub embeds Python and takes its packages from the first python on PATH: this one's.
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return TritonInstall(binary=binary, backend_dir=backend_dir, env=env)


def _pytriton_install() -> TritonInstall | None:
    # Only the wheel's bundled server files are used; importing pytriton itself would pull in its
    # own dependencies (installed without them on purpose), so it is located, not imported.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (root / "bin" / "tritonserver").exists():
        return None
    return _wheel_layout_install(root, "nvidia-pytriton")


# A server unpacked from the GPU bundle (scripts/gpu_unpack.sh writes it into the environment it prints).
TRITON_HOME_ENV = "LITTLEBIG_TRITON_HOME"


def find_tritonserver() -> TritonInstall:
    """Locate a server: $LITTLEBIG_TRITON_HOME (an unpacked bundle) first, then PATH, the NGC container's
    location, and the pytriton wheel."""
    home = os.environ.get(TRITON_HOME_ENV)
    if home:
        return _wheel_layout_install(Path(home), f"${TRITON_HOME_ENV} ({home})")
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), None, {})
    ngc = Path("/opt/tritonserver/bin/tritonserver")
    if ngc.exists():
        return TritonInstall(ngc, None, {})
    bundled = _pytriton_install()
    if bundled:
        return bundled
    raise ServerError(
        "no tritonserver found: not on PATH, not in /opt/tritonserver, and the nvidia-pytriton wheel "
        "is not installed (pip install --no-deps nvidia-pytriton==0.7.0)"
    )


def _exit_on_sigterm():
    """Inside a `with TritonServer(...)` block of a script that left SIGTERM alone, SIGTERM raises
    SystemExit, so the block stops its server: by default Python dies at once, and the tritonserver it
    started (and its stubs' shared memory) would outlive it. Returns the handler to put back (None: none
    was replaced: not the main thread, or the program handles SIGTERM itself)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    signal.signal(signal.SIGTERM, _raise_exit)
    return signal.SIG_DFL


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


class TritonServer:
    """A tritonserver process serving one model repository on loopback. As a `with` block in a script's
    main thread it also stops its server when the script gets SIGTERM (see ``_exit_on_sigterm``)."""

    def __init__(
        self,
        repository: str | os.PathLike,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_file: str | os.PathLike | None = None,
        explicit_model_control: bool = True,
        extra_args: tuple[str, ...] = (),
        startup_timeout_s: float = 180.0,
        admin_key: str | None = None,
        lock_admin: bool = True,
        allow_remote: bool = False,
        exit_timeout_s: int = 30,
    ):
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise ServerError(f"model repository {self.repository} does not exist")
        if ":" in host:  # the URLs below and the CLI's port check are IPv4 (HOST:PORT, AF_INET)
            raise ServerError(f"host {host} is an IPv6 address, which littlebig does not serve on: use 127.0.0.1 "
                              "(loopback) or an IPv4 address")
        if host not in admin.LOOPBACK_HOSTS and not allow_remote:
            raise ServerError(
                f"binding {host} exposes the server beyond this machine; pass --allow-remote "
                "(allow_remote=True) to do that on purpose"
            )
        if allow_remote and not lock_admin:
            raise ServerError("a server reachable from other machines must keep its admin APIs locked")
        # None: admin APIs open (only for a caller that asks for it explicitly).
        self.admin_key = (admin_key or admin.new_key()) if lock_admin else None
        self.exit_timeout_s = exit_timeout_s
        self.host = host
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        if log_file is None:
            log_file = Path(tempfile.mkdtemp(prefix="littlebig-triton-")) / "tritonserver.log"
        self.log_file = Path(log_file)
        self.explicit_model_control = explicit_model_control
        self.extra_args = tuple(extra_args)
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        # start/stop/restart one at a time: the supervisor's restart must not race a stop.
        self._lifecycle = threading.RLock()
        self._stopping = False
        # Triton unlinks a stub's shared-memory region (32 MiB and up) when it unloads the instance (a
        # reload too), so only a killed server leaves its regions in /dev/shm; a prefix of its own finds them.
        self.shm_prefix = f"{SHM_PREFIX}littlebig_{secrets.token_hex(6)}_"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def admin_headers(self, protocol: str = "grpc") -> dict[str, str]:
        """Headers that unlock this server's admin APIs (empty when they are open)."""
        if self.admin_key is None:
            return {}
        return {admin.GRPC_HEADER if protocol == "grpc" else admin.HEADER: self.admin_key}

    def command(self, install: TritonInstall) -> list[str]:
        cmd = [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--log-verbose=0",
            # On SIGINT/SIGTERM Triton stops taking requests and waits this long for those in flight.
            f"--exit-timeout-secs={self.exit_timeout_s}",
        ]
        if self.admin_key is not None:
            cmd += admin.restricted_api_args(self.admin_key)
        if install.backend_dir is not None:
            cmd.append(f"--backend-directory={install.backend_dir}")
        cmd += [f"--backend-config={c}" for c in DEFAULT_BACKEND_CONFIG]
        cmd.append(f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}")
        if self.explicit_model_control:
            # Explicit control lets calibration reload the gate with a new threshold (repository API);
            # every model in the repository is still loaded at start.
            cmd += ["--model-control-mode=explicit", "--load-model=*"]
        return cmd + list(self.extra_args)

    def start(self) -> "TritonServer":
        with self._lifecycle:
            self._stopping = False
            return self._start()

    def _start(self) -> "TritonServer":
        install = find_tritonserver()
        env = {**os.environ, **install.env}
        if self.admin_key is not None:  # first: a key store that fails must leave no server running
            admin.remember([self.http_url, self.grpc_url], self.admin_key)
        try:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            # A restart (by the supervisor) appends to the log of the run that died.
            with open(self.log_file, "ab" if self.process is not None else "wb") as log:
                self.process = subprocess.Popen(
                    self.command(install),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it in order
                )
            self.wait_ready()
        except BaseException:
            self._terminate(timeout_s=None, drain=False)
            raise
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode} while starting; "
                    f"log {self.log_file}:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.25)
        raise ServerError(
            f"tritonserver not ready after {self.startup_timeout_s:.0f}s; log {self.log_file}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float | None = None, drain: bool = True) -> None:
        """Drain (see ``drain``), then Triton's own shutdown (SIGINT), then SIGKILL after ``timeout_s``.
        Once begun, no ``restart`` (the supervisor's) brings it back."""
        with self._lifecycle:
            self._stopping = True
            self._terminate(timeout_s, drain)

    def _terminate(self, timeout_s: float | None, drain: bool) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                if drain and self.explicit_model_control:
                    self.drain()
                self._shutdown(self.exit_timeout_s + 15 if timeout_s is None else timeout_s)
        except BaseException:
            # Interrupted (a second Ctrl-C, SIGTERM) or failed: the server runs in its own session,
            # so nothing else would stop it. Kill it rather than leave it behind.
            self._kill()
            raise
        finally:
            if self.process is not None and self.process.poll() is not None:
                self.remove_shared_memory()
            if self.admin_key is not None:
                admin.forget([self.http_url, self.grpc_url], self.admin_key)

    def _kill(self) -> None:
        """SIGKILL the server's process group (its stubs too) and reap it."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def _shutdown(self, timeout_s: float) -> None:
        # SIGINT is Triton's graceful shutdown: it stops accepting, waits for in-flight requests
        # (--exit-timeout-secs), unloads.
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._kill()

    def drain(self, gate: str = GATE_MODEL) -> bool:
        """Unload the gate and wait until it is gone, with little and big still serving.

        Triton's own shutdown refuses every new inference at once, BLS calls included, so a gate
        request in flight would fail with "Server not ready" when it calls little or big. Unloading
        the gate first stops new gate requests while Triton lets the accepted ones finish (their BLS
        calls still work); only then is the server stopped. Returns whether the gate was gone within
        the exit timeout.
        """
        # gRPC, not HTTP: tritonclient's HTTP client needs gevent, which a bare GPU machine lacks.
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + self.exit_timeout_s
        headers = self.admin_headers("grpc")
        try:
            with grpcclient.InferenceServerClient(self.grpc_url) as client:
                client.unload_model(gate, headers=headers, client_timeout=self.exit_timeout_s)
                while time.monotonic() < deadline:
                    index = client.get_model_repository_index(headers=headers, as_json=True)
                    states = {m["name"]: m.get("state") for m in index.get("models", [])}
                    if states.get(gate) in (None, "UNAVAILABLE"):
                        return True
                    time.sleep(0.1)
        except (InferenceServerException, OSError) as err:
            print(f"littlebig: draining {gate} failed ({err}); stopping anyway", file=sys.stderr)
        return False

    def restart(self) -> "TritonServer":
        """Start again on the same ports after the process died (its group is killed first: a
        stalled or orphaned stub must not keep the ports or shared memory). Refused once ``stop`` began."""
        with self._lifecycle:
            if self._stopping:
                raise ServerError("not restarting tritonserver: it is being stopped")
            if self.process is not None:
                self._kill()
                self.remove_shared_memory()
            return self._start()

    def remove_shared_memory(self) -> None:
        """Unlink the python backend regions this server left behind (none after a clean shutdown); only
        once its process is gone: its stubs were in its process group, which a kill takes down too."""
        if self.process is not None and self.process.poll() is None:
            raise ServerError("remove_shared_memory: the server is still running")
        for path in SHM_DIR.glob(f"{self.shm_prefix}*"):
            path.unlink(missing_ok=True)

    def __enter__(self) -> "TritonServer":
        self._sigterm = _exit_on_sigterm()
        try:
            return self.start()
        except BaseException:
            _restore_sigterm(self._sigterm)
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and issubclass(exc_type, Exception):
                # The log usually sits in a temporary folder the caller never looks at (kept, for reading
                # after the server is gone): show its tail where the failure is reported.
                print(f"littlebig: stopping tritonserver after {exc_type.__name__}; last lines of {self.log_file}:\n"
                      f"{self.log_tail()}", file=sys.stderr, flush=True)
            self.stop()
        finally:
            _restore_sigterm(self._sigterm)
