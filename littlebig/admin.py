"""The admin key that unlocks a littlebig server's repository and shared-memory APIs.

`littlebig serve` starts Triton with those APIs restricted to requests carrying a key header
(Triton's --http-restricted-api / --grpc-restricted-protocol) and stores the key in
~/.config/littlebig/admin-keys.json (mode 0600), keyed by the server's HTTP and gRPC addresses.
Admin calls (threshold switch, calibrate --apply, load/unload) find it there; the environment
variable LITTLEBIG_ADMIN_KEY overrides the file. Triton expects the header under the configured
name over HTTP and with the prefix "triton-grpc-protocol-" over gRPC.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from pathlib import Path
from typing import Iterable, Iterator

from littlebig.errors import UserError

KEY_ENV = "LITTLEBIG_ADMIN_KEY"
HEADER = "littlebig-admin-key"
GRPC_HEADER = f"triton-grpc-protocol-{HEADER}"
# Read-only APIs (health, metadata, inference, model-config, statistics) stay open; these can load
# code, map memory or write files on the server.
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
# A server bound to every address is reached on this machine through loopback: its key is stored there.
WILDCARD_HOSTS = ("0.0.0.0",)


class AdminKeyError(UserError):
    """The key store cannot be read or written."""


def keys_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "littlebig" / "admin-keys.json"


def new_key() -> str:
    return secrets.token_urlsafe(32)  # letters, digits, '-' and '_': safe in Triton's flag syntax


def normalize(address: str) -> str:
    """'http://localhost:8000/' -> '127.0.0.1:8000' (so is '0.0.0.0:8000') so one server has one spelling."""
    address = address.split("://", 1)[-1].rstrip("/").lower()
    host, _, port = address.rpartition(":")
    return f"{'127.0.0.1' if host in ('localhost', *WILDCARD_HOSTS) else host}:{port}"


def _read_keys(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        keys = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdminKeyError(f"cannot read the admin key store {path} ({err}); if it is damaged, delete it "
                            f"and restart the servers it named (they get new keys)") from None
    if not isinstance(keys, dict):
        raise AdminKeyError(f"the admin key store {path} is not a JSON object of address -> key; delete it "
                            "and restart the servers it named (they get new keys)")
    return keys


@contextlib.contextmanager
def _locked_keys() -> Iterator[dict[str, str]]:
    """The stored keys, locked against concurrent writers; changes are written back atomically."""
    path = keys_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = open(path.with_suffix(".lock"), "a")
    except OSError as err:
        raise AdminKeyError(f"cannot use the admin key store in {path.parent}: {err}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        keys = _read_keys(path)
        before = dict(keys)
        yield keys
        if keys != before:
            _write_keys(path, keys)


def _write_keys(path: Path, keys: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(keys, out, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as err:
        raise AdminKeyError(f"cannot write the admin key store {path}: {err}") from None


def remember(addresses: Iterable[str], key: str) -> Path:
    with _locked_keys() as keys:
        keys.update({normalize(a): key for a in addresses})
    return keys_file()


def forget(addresses: Iterable[str], key: str) -> None:
    """Drop the entries of a stopped server (only if they still hold its key)."""
    with _locked_keys() as keys:
        for address in map(normalize, addresses):
            if keys.get(address) == key:
                del keys[address]


def find_key(address: str) -> str | None:
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    return _read_keys(keys_file()).get(normalize(address))


def admin_headers(address: str, protocol: str = "grpc") -> dict[str, str]:
    """Headers for an admin call to the server at ``address``; empty when no key is known (an
    unlocked server accepts the call, a locked one refuses it naming the header it expects)."""
    key = find_key(address)
    if key is None:
        return {}
    return {GRPC_HEADER if protocol == "grpc" else HEADER: key}


def restricted_api_args(key: str) -> list[str]:
    """tritonserver flags that lock the admin APIs of both protocols behind ``key``."""
    apis = ",".join(RESTRICTED_APIS)
    return [f"--http-restricted-api={apis}:{HEADER}={key}", f"--grpc-restricted-protocol={apis}:{HEADER}={key}"]
