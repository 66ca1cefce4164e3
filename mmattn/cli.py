"""The ``mmattn`` command line.

Each subcommand is one entry in ``COMMANDS``: its help line, a function that adds its arguments, and a
function that runs it and returns the exit status. Add ``demo``, ``bench`` or ``masks`` the same way.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from mmattn import __version__
from mmattn._argparse import OneLineParser

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class Command(NamedTuple):
    """A subcommand: help line, ``add_arguments(parser)`` and ``run(args) -> exit status``."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _fail(message: str, status: int = 2) -> int:
    """Print `message` as one error line on stderr; returns `status` (2: bad argument)."""
    print(f"error: {message}", file=sys.stderr)
    return status


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in [`low`, `high`] (unbounded above where `high` is None)."""
    expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def _device(text: str) -> torch.device:
    """An argparse type: `cpu`, or `cuda[:index]` of a GPU this machine has."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:<index>, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"expected cpu (CUDA is not available here), got {text!r}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"expected cuda:0 to cuda:{torch.cuda.device_count() - 1}, got {text!r}")
    return device


def _host(text: str) -> str:
    """An argparse type: an IPv4 address or host name of this machine (a socket binds to it; Gradio takes no IPv6)."""
    try:
        socket.create_server((text, 0)).close()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"expected an IPv4 address of this machine such as 127.0.0.1 or 0.0.0.0, "
                                         f"got {text!r} ({error.strerror or error})") from None
    return text


def _png_out(text: str) -> Path:
    """An argparse type: a .png file name in an existing, writable folder."""
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"expected a file name ending in .png, got {text!r}")
    folder = path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"expected a file in an existing, writable folder, got {text!r} "
                                         f"({folder} {'is not writable' if folder.is_dir() else 'does not exist'})")
    return path


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=_device, default=None,
                        help="cpu or cuda[:index], to check the backends on (default: cuda if present, else cpu)")


def _info(args: argparse.Namespace) -> int:
    """Print versions, the device, which kernel backends can run on it and the Triton kernels' switches."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
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
    if triton_version == "not installed":
        return 0
    from mmattn.kernels.triton import kernel_switches

    try:
        switches = kernel_switches()
    except ValueError as error:
        return _fail(str(error))
    width = max(map(len, switches))
    print()
    for name, (on, default) in switches.items():
        print(f"{name:<{width}}  {'on' if on else 'off'}  (default {'on' if default else 'off'})")
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", type=_host, default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=_int_in(0, 65535), default=7860, help="port (default: 7860; 0 picks a free one)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")


def _demo(args: argparse.Namespace) -> int:
    """Serve the Gradio demo (Vision, VLM and Video tabs) until interrupted."""
    try:
        from mmattn.demo import launch
    except ImportError as error:
        return _fail(str(error), status=1)
    try:
        launch(args.host, args.port, args.share)
    except OSError as error:
        return _fail(f"--host {args.host} --port {args.port}: cannot serve there ({error})")
    return 0


BENCHMARKS = ("block_sparse", "neighborhood", "vision", "vlm", "diffusion", "context_parallel", "rotary")
_LAUNCHERS = {"context_parallel": ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")}
"""Benchmarks that run as several processes: how Python starts them (the rest run as plain scripts)."""
_WROTE = re.compile(r"^wrote (.+)$")


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=BENCHMARKS, help="which benchmarks/<name>.py to run")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (runs on the CPU)")


def _bench(args: argparse.Namespace) -> int:
    """Run benchmarks/<name>.py with a progress line per result row, then print its results table."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        return _fail(f"mmattn bench needs a source checkout of mmattn: it runs benchmarks/{args.name}.py, "
                     f"which an installed package lacks ({script} not found)")
    command = [sys.executable, *_LAUNCHERS.get(args.name, ()), str(script), *(["--quick"] if args.quick else [])]
    start, rows, output = time.monotonic(), 0, []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        for line in process.stdout:
            output.append(line.rstrip("\n"))
            rows += 1
            print(f"\r[{args.name}] {time.monotonic() - start:6.1f}s  {rows} lines  {line.strip()[:60]:<60}",
                  end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    if process.returncode:
        print("\n".join(output[-20:]), file=sys.stderr)
        print(f"error: {script.name} exited with status {process.returncode}", file=sys.stderr)
        return process.returncode
    written = [match[1] for match in map(_WROTE.match, output) if match]
    if written and Path(written[-1]).is_file():
        print(Path(written[-1]).read_text().rstrip())
        print(f"\n(results in {written[-1]})")
    else:
        print("\n".join(line for line in output if line.startswith("|")))
    return 0


def _masks_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    radial = kinds.add_parser("radial", help="Radial attention's block mask of a video (Wan / HunyuanVideo rule)")
    radial.add_argument("--frames", type=_int_in(1), required=True, help="latent frames")
    radial.add_argument("--tokens-per-frame", type=_int_in(1), required=True, help="tokens per latent frame")
    radial.add_argument("--block-size", type=_int_in(1), default=128)
    radial.add_argument("--decay-factor", type=float, default=1.0)
    radial.add_argument("--model", choices=("wan", "hunyuan"), default="wan", help="mask rule (wan: frame-0 sink)")
    radial.add_argument("--text-tokens", type=_int_in(0), default=0, help="text tokens after the video (dense rows/columns)")
    neighborhood = kinds.add_parser("neighborhood", help="the token mask of 2-D neighborhood attention (NAT / DiNAT)")
    neighborhood.add_argument("--height", type=_int_in(1), required=True)
    neighborhood.add_argument("--width", type=_int_in(1), required=True)
    neighborhood.add_argument("--kernel-size", type=_int_in(1), default=7)
    neighborhood.add_argument("--dilation", type=_int_in(1), default=1)
    for kind in (radial, neighborhood):
        kind.add_argument("--out", type=_png_out, required=True, help="PNG file to write (in an existing folder)")


MAX_MASK_SIDE = 4096
"""`mmattn masks` draws masks of at most 4096 x 4096 entries (16.8 M pixels), checked before anything is allocated."""


def _mask_side(args: argparse.Namespace) -> tuple[int, str]:
    """The row count of the mask `args` asks for, and the arguments that set it."""
    if args.kind == "radial":
        tokens = args.frames * args.tokens_per_frame + args.text_tokens
        return -(-tokens // args.block_size), "--frames x --tokens-per-frame + --text-tokens, in blocks of --block-size"
    return args.height * args.width, "--height x --width"


def _mask(args: argparse.Namespace):
    import torch

    if args.kind == "radial":
        from mmattn.diffusion import radial_block_mask

        mask = radial_block_mask(args.frames, args.tokens_per_frame, block_size=args.block_size,
                                 decay_factor=args.decay_factor, model=args.model, text_tokens=args.text_tokens)
        return mask, f"radial {args.frames}x{args.tokens_per_frame}, {mask.shape[0]}x{mask.shape[1]} blocks of {args.block_size}"
    from mmattn.kernels import Neighborhood

    nbhd = Neighborhood.create((args.height, args.width), args.kernel_size, args.dilation)
    tokens = torch.arange(args.height * args.width)
    mask = nbhd.allowed(tokens[:, None], tokens[None, :])
    return mask, f"neighborhood {args.height}x{args.width}, kernel {args.kernel_size}, dilation {args.dilation}"


def _masks(args: argparse.Namespace) -> int:
    """Render a mask to PNG and print its size and density."""
    side, source = _mask_side(args)
    if side > MAX_MASK_SIDE:
        return _fail(f"{source}: expected a mask of at most {MAX_MASK_SIDE} x {MAX_MASK_SIDE}, got {side} x {side}")
    try:
        from mmattn.demo.rendering import mask_image
    except ImportError as error:
        return _fail(str(error), status=1)
    try:
        mask, description = _mask(args)
    except ValueError as error:
        return _fail(str(error))
    mask_image(mask).save(args.out)
    print(f"{description}: density {mask.float().mean():.4f}, wrote {args.out}")
    return 0


COMMANDS: dict[str, Command] = {
    "info": Command("print versions, the device and the usable kernel backends", _info_arguments, _info),
    "demo": Command("serve the Gradio demo (Vision, VLM, Video tabs) on 127.0.0.1", _demo_arguments, _demo),
    "bench": Command("run a benchmark script and print its results table", _bench_arguments, _bench),
    "masks": Command("render an attention mask (radial, neighborhood) to PNG", _masks_arguments, _masks),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per entry in ``COMMANDS``."""
    parser = OneLineParser(prog="mmattn", description="Sparse and structured attention toolkit.")
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
