"""littlebig's errors, and one-line messages for the failures a user can fix.

Every error littlebig raises is a LittlebigError. A UserError (and its kinds: ExportError,
RepositoryError, ServerError, CalibrationError, ...) is a failure the user can fix, with a message
written for them: the CLI prints it in one line and exits 2. The gate's own ConfigError and
RequestError (it imports nothing of littlebig) count as user errors too, and so do the failures of the
libraries underneath that name a fixable cause (an unreachable server, a file that is not an image),
recognised by type. Anything else is a bug: the CLI names it in one line, exits 1, and --debug shows
the traceback. Decided by type, never by where an exception comes from.
"""

from __future__ import annotations

import dataclasses
import socket

from littlebig.gate.config import ConfigError, RequestError


class LittlebigError(Exception):
    """A failure littlebig itself raises."""


class UserError(LittlebigError, ValueError):
    """A failure the user can fix (a bad option, file, model or server answer); its message says how.
    A ValueError too, so that callers catching bad values keep catching it."""


class UsageError(UserError):
    """A mistake in how a command was called, found by the command itself."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """The server a command talks to, for messages about reaching it."""

    url: str
    protocol: str  # "gRPC" or "HTTP"


def _unreachable(endpoint: Endpoint | None, reason: str) -> str:
    where = f"{endpoint.url} ({endpoint.protocol})" if endpoint else "the server"
    return (
        f"cannot reach a Triton server at {where}: {reason}. Is `littlebig serve` running there? "
        "Pass its address with --url HOST:PORT"
    )


def _grpc_reason(message: str) -> str:
    if "Connection refused" in message:
        return "connection refused"
    if "resolving" in message or "lookup" in message:
        return "unknown host"
    return message.split(";")[0]


def _triton_message(err, endpoint: Endpoint | None) -> str:
    status = str(err.status() or "")
    text = err.message() or str(err)
    # Something accepted the connection but does not speak gRPC: Triton's HTTP port, most likely
    # (Triton's HTTP server closes the socket; other HTTP/1 servers answer with a non-HTTP/2 frame).
    if "HTTP/2" in text or "Socket closed" in text:
        where = f" ({endpoint.url})" if endpoint else ""
        return (f"the server port{where} accepted the connection but does not speak gRPC: is it the HTTP port? "
                "Add --http, or use the gRPC port (8001 by default)")
    if "UNAVAILABLE" in status or "DEADLINE_EXCEEDED" in status:
        return _unreachable(endpoint, _grpc_reason(text))
    if "unknown model" in text or "is not found" in text:
        return f"{text}: is this server serving a littlebig repository (`littlebig repo`, `littlebig serve`)?"
    where = f" at {endpoint.url}" if endpoint else ""
    return f"the server{where} refused the request: {text}"


def _library_message(err: BaseException, endpoint: Endpoint | None) -> str | None:
    """Messages for failures reported by the libraries underneath (recognised by name: not imported here)."""
    kind = type(err).__name__
    if kind == "InferenceServerException":
        return _triton_message(err, endpoint)
    if kind == "UnidentifiedImageError":  # Pillow: "cannot identify image file 'x.jpg'"
        return f"{err}: it is not an image Pillow can read (JPEG, PNG, BMP, GIF, WebP, TIFF)"
    if kind == "DecodeError" and type(err).__module__.startswith("google.protobuf"):
        return f"a file is not in the expected protobuf format (ONNX or Triton config): {err}"
    if kind == "HTTPParseError":  # geventhttpclient got something that is not HTTP: a gRPC port
        port = f" ({endpoint.url})" if endpoint else ""
        return f"the server port{port} does not speak HTTP: is it the gRPC port? Triton's HTTP port is 8000 by default"
    return None


def describe(err: BaseException, endpoint: Endpoint | None = None) -> str | None:
    """The message for an expected failure, or None when ``err`` looks like a bug."""
    if isinstance(err, ConnectionRefusedError):
        return _unreachable(endpoint, "connection refused")
    if isinstance(err, socket.gaierror):
        return _unreachable(endpoint, "unknown host")
    if isinstance(err, (socket.timeout, TimeoutError)):
        return _unreachable(endpoint, "timed out")
    message = _library_message(err, endpoint)
    if message is not None:
        return message
    if isinstance(err, (UserError, ConfigError, RequestError)):  # messages written for the user
        return str(err)
    if isinstance(err, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return f"{err.strerror}: {err.filename}" if err.filename else str(err)
    return None
