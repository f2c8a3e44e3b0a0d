"""`littlebig serve` replicas behind a real proxy from Debian's packages, for HTTP and gRPC.

nginx (the default) spreads requests round-robin over the replicas and, when one fails (connection
refused, reset mid-request, 502/503), sends the request again to another. Inference requests are
POSTs, which nginx never retries unless told: `non_idempotent` is set because a classification has
no side effect, so asking twice is safe. A failed replica is skipped for `fail_timeout` and then
tried again by live traffic (open-source nginx has no active health checks), which is how a
restarted replica is taken back. nginx's grpc module streams request bodies, so it cannot resend a
gRPC request once it has left.

HAProxy is configured for L7 retries from a copy of each request, gRPC included, and checks each
replica's /v2/health/ready every second, so a restarted replica comes back as soon as it is ready.
(Measured here, its retries did not save the requests in flight on a killed replica either.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from littlebig.errors import UserError

from .server import free_port

NGINX_CONF = """\
{user}worker_processes 1;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    log_format upstreams '$msec "$request" $status upstream=$upstream_addr upstream_status=$upstream_status';
    access_log {dir}/access.log upstreams;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 64m;
    # One failure marks a replica down for fail_timeout; then live traffic tries it again.
    upstream triton_http {{
{http_servers}
        keepalive 64;
    }}
    upstream triton_grpc {{
{grpc_servers}
    }}
    server {{
        listen {host}:{http_port};
        location / {{
            proxy_pass http://triton_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout {connect_timeout};
            proxy_read_timeout 120s;
            # Inference is a POST: without non_idempotent nginx would not retry it elsewhere.
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries {tries};
        }}
    }}
    server {{
        listen {host}:{grpc_port} http2;
        location / {{
            grpc_pass grpc://triton_grpc;
            grpc_connect_timeout {connect_timeout};
            grpc_read_timeout 120s;
            grpc_next_upstream error timeout http_502 http_503 non_idempotent;
            grpc_next_upstream_tries {tries};
        }}
    }}
}}
"""


HAPROXY_CONF = """\
global
    log stdout format raw local0
    maxconn 4096
    # An L7 retry resends the copy of the request HAProxy keeps in one buffer: it must hold a whole
    # inference request (a 260x260 image is 203 kB).
    tune.bufsize 1048576

defaults
    mode http
    log global
    log-format "%Ts.%ms %b %s %ST %rc"
    timeout connect 1s
    timeout client 120s
    timeout server 120s
    timeout check 2s
    # Resend on another replica when one refuses, resets or sends nothing back; inference is safe to repeat.
    retries {tries}
    option redispatch 1
    retry-on conn-failure empty-response response-timeout 502 503
    # Replicas are in rotation only while Triton says every model is ready.
    option httpchk GET /v2/health/ready

frontend http_in
    bind {host}:{http_port}
    default_backend triton_http

frontend grpc_in
    bind {host}:{grpc_port} proto h2
    default_backend triton_grpc

backend triton_http
    balance roundrobin
{http_servers}

backend triton_grpc
    balance roundrobin
{grpc_servers}
"""


class BalancerError(UserError):
    """nginx or a replica could not be started."""


def find_nginx() -> str | None:
    """nginx on PATH or where Debian's package puts it (/usr/sbin, not on a user's PATH)."""
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    return found if Path(found).is_file() else None


@dataclasses.dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def free(cls) -> "Ports":
        return cls(free_port(), free_port(), free_port())


def _wait_http_ok(url: str, timeout_s: float, alive) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise BalancerError(f"the process behind {url} exited while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise BalancerError(f"{url} not ready after {timeout_s:.0f} s")


class ServeReplica:
    """One `littlebig serve` process (and the tritonserver it runs) on fixed loopback ports."""

    def __init__(self, repository: str | Path, ports: Ports, log_dir: Path, name: str):
        self.repository = Path(repository)
        self.ports = ports
        self.log_dir = Path(log_dir).resolve()
        self.name = name
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports.http}"

    def start(self, timeout_s: float = 300.0) -> "ServeReplica":
        self.starts += 1
        stem = self.log_dir / f"{self.name}-{self.starts}"
        cmd = [sys.executable, "-m", "littlebig.cli", "serve", "--repo", str(self.repository),
               "--http-port", str(self.ports.http), "--grpc-port", str(self.ports.grpc),
               "--metrics-port", str(self.ports.metrics), "--log-file", f"{stem}.tritonserver.log",
               # The replica's death is the scenario: its own supervisor would restart it in place,
               # and what is measured here is the proxy's failover and taking the replica back.
               "--no-supervise"]
        with open(f"{stem}.serve.log", "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_http_ok(f"http://{self.http_url}/v2/health/ready", timeout_s, lambda: self.process.poll() is None)
        except BaseException:
            self.stop()
            raise
        return self

    def tritonserver_pid(self) -> int:
        for child in psutil.Process(self.process.pid).children():
            if "tritonserver" in child.name():
                return child.pid
        raise BalancerError(f"replica {self.name}: no tritonserver under `littlebig serve` (pid {self.process.pid})")

    def kill_tritonserver(self, pid: int) -> None:
        """SIGKILL the replica's tritonserver ``pid`` (a crash); its stubs go with its process group."""
        os.kill(pid, signal.SIGKILL)
        # The server was started in its own session: its group holds the python-backend stubs.
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=60)  # `littlebig serve` notices and exits

    def stop(self, timeout_s: float = 120.0) -> None:
        """SIGTERM: serve drains and stops its tritonserver (up to ~75 s: drain, then Triton's exit
        timeout + 15 s). Past ``timeout_s``, both are killed: serve's tritonserver runs in its own
        session, and killing serve alone would leave it running."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            servers = []
            with contextlib.suppress(psutil.NoSuchProcess):
                servers = [c.pid for c in psutil.Process(self.process.pid).children() if "tritonserver" in c.name()]
            self.process.kill()
            self.process.wait()
            for pid in servers:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


class Balancer:
    """A proxy in the foreground in front of the replicas, with its config and logs in its own folder."""

    name = ""
    stop_signal = signal.SIGTERM
    check_flag = "-t"  # appended to the command line: only check the config

    def __init__(self, replicas: list[Ports], workdir: Path | None = None, *, tries: int = 2,
                 fail_timeout_s: int = 2, host: str = "127.0.0.1"):
        self.replicas = replicas
        self.dir = Path(workdir or tempfile.mkdtemp(prefix=f"littlebig-{self.name}-")).resolve()
        self.host = host
        self.http_port, self.grpc_port = free_port(), free_port()
        self.tries, self.fail_timeout_s = tries, fail_timeout_s
        self.process: subprocess.Popen | None = None

    def url(self, protocol: str) -> str:
        """Where clients connect for ``protocol`` ("http" or "grpc")."""
        return f"{self.host}:{self.http_port if protocol == 'http' else self.grpc_port}"

    def config(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        """The proxy's command line (in the foreground)."""
        raise NotImplementedError

    def traffic(self, replica: Ports, since: float) -> tuple[float | None, int]:
        """From the proxy's log: (seconds from ``since`` until the first request sent to ``replica``,
        requests the proxy tried on more than one replica)."""
        raise NotImplementedError

    def start(self) -> "Balancer":
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"{self.name}.conf").write_text(self.config())
        check = subprocess.run(self.command() + [self.check_flag], capture_output=True, text=True)
        if check.returncode != 0:
            raise BalancerError(f"{self.name} refused its config:\n{check.stdout}{check.stderr}")
        with open(self.dir / "stdout.log", "wb") as out, open(self.dir / "stderr.log", "wb") as err:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=err)
        try:
            _wait_http_ok(f"http://{self.url('http')}/v2/health/ready", 30, lambda: self.process.poll() is None)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class NginxBalancer(Balancer):
    """nginx (Debian's package) with its own prefix folder (no root paths touched)."""

    name = "nginx"
    stop_signal = signal.SIGQUIT  # graceful: finish requests in flight

    def config(self) -> str:
        def servers(attr: str) -> str:
            return "\n".join(f"        server 127.0.0.1:{getattr(p, attr)} max_fails=1 fail_timeout={self.fail_timeout_s}s;"
                             for p in self.replicas)

        # Started as root, nginx runs its worker as nobody, which cannot write request bodies into
        # this folder; run it as the user who owns the folder instead.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
        return NGINX_CONF.format(user=user, dir=self.dir, host=self.host, http_port=self.http_port, grpc_port=self.grpc_port,
                                 http_servers=servers("http"), grpc_servers=servers("grpc"), tries=self.tries,
                                 connect_timeout="1s")

    def command(self) -> list[str]:
        binary = find_nginx()
        if binary is None:
            raise BalancerError("nginx not found: apt-get install nginx (scripts/setup.sh does)")
        return [binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-e", str(self.dir / "error.log"),
                "-g", "daemon off;"]

    def traffic(self, replica: Ports, since: float) -> tuple[float | None, int]:
        addresses = {f"127.0.0.1:{replica.http}", f"127.0.0.1:{replica.grpc}"}
        first, retried = None, 0
        for line in (self.dir / "access.log").read_text().splitlines():
            stamp = float(line.split(" ", 1)[0])
            tried = [u.strip() for u in line.split("upstream=", 1)[1].split(" upstream_status=")[0].split(",")]
            retried += len(tried) > 1
            if first is None and stamp >= since and addresses & set(tried):
                first = stamp - since
        return first, retried


class HAProxyBalancer(Balancer):
    """HAProxy (Debian's package): L7 retries from a copy of each request, gRPC included, and active
    readiness checks. Measured here, it still failed the requests in flight on a killed replica."""

    name = "haproxy"
    stop_signal = signal.SIGUSR1  # soft stop: finish requests in flight
    check_flag = "-c"

    def config(self) -> str:
        def servers(attr: str, extra: str) -> str:
            return "\n".join(f"    server r{i} 127.0.0.1:{getattr(p, attr)} {extra} check port {p.http} inter 1s fall 1 rise 1"
                              for i, p in enumerate(self.replicas))

        return HAPROXY_CONF.format(host=self.host, http_port=self.http_port, grpc_port=self.grpc_port, tries=self.tries,
                                   http_servers=servers("http", ""), grpc_servers=servers("grpc", "proto h2 check-proto h1"))

    def command(self) -> list[str]:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).is_file():
            raise BalancerError("haproxy not found: apt-get install haproxy")
        return [binary, "-db", "-f", str(self.dir / "haproxy.conf")]

    def traffic(self, replica: Ports, since: float) -> tuple[float | None, int]:
        index = self.replicas.index(replica)
        first, retried = None, 0
        for line in (self.dir / "stdout.log").read_text().splitlines():
            fields = line.split()
            if len(fields) != 5 or not fields[0].replace(".", "").isdigit():
                continue  # not a request line (start-up and health-check messages)
            stamp, server, retries = float(fields[0]), fields[2], fields[4].lstrip("+")
            retried += retries.isdigit() and int(retries) > 0
            if first is None and stamp >= since and server == f"r{index}":
                first = stamp - since
        return first, retried


BALANCERS = {"nginx": NginxBalancer, "haproxy": HAProxyBalancer}


@contextlib.contextmanager
def balanced_replicas(repository: str | Path, count: int, workdir: str | Path, proxy: str = "nginx", **options):
    """``count`` `littlebig serve` replicas of ``repository`` behind ``proxy``; everything stopped after."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    replicas = [ServeReplica(repository, Ports.free(), workdir, f"replica{i}") for i in range(count)]
    balancer = BALANCERS[proxy]([r.ports for r in replicas], workdir / proxy, **options)
    try:
        for replica in replicas:
            replica.start()
        balancer.start()
        yield balancer, replicas
    finally:
        balancer.stop()
        for replica in replicas:
            replica.stop()
