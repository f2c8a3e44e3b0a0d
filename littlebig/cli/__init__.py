"""The `littlebig` command line: one module per command (littlebig/cli/<command>.py, each with its
options beside its code: `add` declares them, `run` runs the command) and this dispatcher, which turns
a failure into one line and an exit status (littlebig/errors.py)."""

from __future__ import annotations

import argparse
import sys

from littlebig import __version__
from littlebig.errors import Endpoint, describe

from . import audit, batch, bench, calibrate, classify, demo, example, export, pairs, plan, repo, serve, threshold
from .options import add_debug

COMMANDS = (export, repo, serve, classify, calibrate, audit, pairs, threshold, bench, batch, plan, example, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="littlebig",
        description="Confidence-gated Little-Big classifier cascades on NVIDIA Triton Inference Server.",
        epilog="`littlebig COMMAND --help` describes a command. Start with `littlebig demo`.",
    )
    parser.add_argument("--version", action="version", version=f"littlebig {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback when a command fails")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add(sub)
    for command in sub.choices.values():
        add_debug(command)
    return parser


def _endpoint(args) -> Endpoint | None:
    url = getattr(args, "url", None)
    return Endpoint(url, "HTTP" if getattr(args, "http", False) else "gRPC") if url else None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"littlebig {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        if args.debug:
            raise
        message = describe(err, _endpoint(args))
        if message is None:  # not a failure we know: a bug, named in one line all the same
            print(f"littlebig {args.command}: unexpected error: {type(err).__name__}: {err} "
                  "(run again with --debug for the traceback)", file=sys.stderr)
            raise SystemExit(1) from None
        print(f"littlebig {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
