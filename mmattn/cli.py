"""The ``mmattn`` command line.

Each subcommand is one entry in ``COMMANDS``: its help line, a function that adds its arguments, and a
function that runs it and returns the exit status. Add ``demo``, ``bench`` or ``masks`` the same way.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from mmattn import __version__

logger = logging.getLogger(__name__)


class Command(NamedTuple):
    """A subcommand: help line, ``add_arguments(parser)`` and ``run(args) -> exit status``."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="device to check the backends on (default: cuda if present, else cpu)")


def _info(args: argparse.Namespace) -> int:
    """Print versions, the device and which kernel backends can run on it."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"error: --device {args.device} but CUDA is not available", file=sys.stderr)
            return 1
        major, minor = torch.cuda.get_device_capability(device)
        device_desc = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    else:
        device_desc = str(device)

    print(f"mmattn  {__version__}")
    print(f"python  {platform.python_version()}")
    print(f"torch   {torch.__version__}")
    print(f"triton  {triton_version}")
    print(f"device  {device_desc}")

    from mmattn.kernels import backend_info

    rows = [("backend", "usable", "detail")]
    rows += [(name, "yes" if usable else "no", detail) for name, (usable, detail) in backend_info(device).items()]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    print()
    for name, usable, detail in rows:
        print(f"{name:<{widths[0]}}  {usable:<{widths[1]}}  {detail}")
    return 0


COMMANDS: dict[str, Command] = {
    "info": Command("print versions, the device and the usable kernel backends", _info_arguments, _info),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per entry in ``COMMANDS``."""
    parser = argparse.ArgumentParser(prog="mmattn", description="Sparse and structured attention toolkit.")
    parser.add_argument("--version", action="version", version=f"mmattn {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mmattn`` command; returns the exit status (2 when no subcommand is given)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logger.debug("running %s with %s", args.command, args)
    return args.run(args)
