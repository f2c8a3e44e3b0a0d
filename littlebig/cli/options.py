"""What the commands share: how a command's parser is made, the argument types that check a value
where the option is declared, and the default server addresses."""

from __future__ import annotations

import argparse

from littlebig.errors import UsageError

GRPC_URL, HTTP_URL = "127.0.0.1:8001", "127.0.0.1:8000"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except for flags and options with no default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def require_export_extra(name: str) -> None:
    """export, example and demo run torch models: say which extra to install when it is missing."""
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as err:
        raise UsageError(f"`littlebig {name}` needs torch, torchvision and timm ({err.name} is not installed): "
                         "pip install 'littlebig[export]'") from None


def command(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """A command's parser, with every option's default shown in --help."""
    return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def add_debug(parser: argparse.ArgumentParser) -> None:
    """--debug after the command, as before it (added last: it ends every command's --help)."""
    # SUPPRESS: a --debug given before the command is not reset by the subcommand's default.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback when the command fails")


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (a confidence threshold), got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def positive_int_list(text: str) -> list[int]:
    try:
        return [positive_int(part) for part in text.split(",")]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1 (e.g. 1,4,16), got {text!r}") from None


def port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a whole number from 1 to 65535, got {text}")
    return value


def server_address(text: str) -> str:
    """HOST:PORT, also when given as a URL (http://HOST:PORT/)."""
    address = text.split("://", 1)[-1].rstrip("/")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. {GRPC_URL}), got {text!r}")
    port_number(port)
    return address
