"""`littlebig serve`: Serve a model repository with Triton, supervised."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from littlebig.errors import UsageError

from .options import command, port_number, positive_float


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _wait_forever(server, supervisor=None) -> None:
    # SIGTERM ends the wait like Ctrl-C does, so the server is always stopped in order (drained).
    # SIGINT too, explicitly: a process started in the background by a shell script inherits SIGINT
    # ignored, and Python then raises no KeyboardInterrupt, so `kill -INT` would leave it running.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        while supervisor is not None or server.process.poll() is None:
            time.sleep(0.5)  # with a supervisor, a dead server is restarted, not the end
        print(f"tritonserver exited with code {server.process.returncode}; log {server.log_file}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        if supervisor is not None:
            supervisor.stop()
        print("draining and stopping tritonserver ... (Ctrl-C again kills it at once)", flush=True)


def _check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Fail before starting: a server whose ports are taken would look ready (the other one answers)."""
    try:  # the host's own address family (TritonServer then says which hosts it serves on)
        family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        raise UsageError(f"--host {host} is not an address of this machine (unknown host)") from None
    for option, port in ports.items():
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
            try:
                sock.bind((host, port))
            except OSError as err:
                raise UsageError(
                    f"port {port} on {host} ({option}) is not free ({err.strerror}): is another "
                    f"`littlebig serve` or tritonserver running? Stop it, or choose other ports with "
                    f"--http-port/--grpc-port/--metrics-port"
                ) from None


def run(args) -> None:
    from littlebig import admin
    from littlebig.serving.server import TritonServer

    _check_ports_free(
        args.host, {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
    )
    server = TritonServer(
        args.repo,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_file=args.log_file,
        admin_key=args.admin_key or os.environ.get(admin.KEY_ENV) or None,
        allow_remote=args.allow_remote,
    )
    print(f"starting tritonserver on {args.repo} (log {server.log_file}) ...", flush=True)
    with server:
        print(f"ready\n  HTTP    {server.http_url}\n  gRPC    {server.grpc_url}\n  metrics {server.metrics_url}")
        print(f"  admin   repository/shared-memory APIs locked; key in {admin.keys_file()} (or ${admin.KEY_ENV})")
        supervisor = None
        if not args.no_supervise:
            from littlebig.serving.supervisor import Supervisor, SupervisorOptions

            metrics_file = server.log_file.with_name("supervisor.prom")
            supervisor = Supervisor(server, SupervisorOptions(interval_s=args.canary_interval, metrics_file=metrics_file))
            supervisor.start()
            print(f"  supervisor canary every {args.canary_interval:g}s; recoveries counted in {metrics_file}")
        print("Ctrl-C to stop", flush=True)
        _wait_forever(server, supervisor)


def add(sub) -> None:
    p = command(sub, "serve", help="serve a model repository with Triton")
    p.add_argument("--repo", required=True, help="model repository folder (from littlebig repo)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; others need --allow-remote)")
    p.add_argument("--allow-remote", action="store_true", help="allow --host to be a non-loopback address")
    p.add_argument("--admin-key", help="key that unlocks the repository/shared-memory APIs (default: $LITTLEBIG_ADMIN_KEY, "
                   "else a new one, stored in ~/.config/littlebig/admin-keys.json for this user's admin commands)")
    p.add_argument("--http-port", type=port_number, default=8000, help="HTTP/REST port")
    p.add_argument("--grpc-port", type=port_number, default=8001, help="gRPC port")
    p.add_argument("--metrics-port", type=port_number, default=8002, help="Prometheus metrics port")
    p.add_argument("--log-file", help="server log (default: a new temporary file)")
    p.add_argument("--no-supervise", action="store_true", help="no watchdog (canaries, restore of dead models/server)")
    p.add_argument("--canary-interval", type=positive_float, default=1.0, help="seconds between the watchdog's canary rounds")
    p.set_defaults(func=run)
