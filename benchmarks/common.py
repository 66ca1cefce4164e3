"""Shared by the benchmark scripts: timing (medians, warm-up first), the agreement check every script runs before it
times, and the results file (written whole by one run, headed by the device, the versions and the command line).

The agreement check (`check_agreement`) is FlashAttention's accuracy criterion (specs/kernels.md section 8) with the
peer as the calibration: on the same inputs, our result, the peer's and a higher-precision run of the same
computation (float32 on the GPU, float64 on the CPU) are compared, and for every tensor (output, and the input
gradients where a benchmark times the backward)

    err(ours) <= FACTOR * err(peer) + SLACK * max(1, max|reference|)

where err is the largest absolute difference to the higher-precision run: mmattn may be at most twice as far from
the exact result as the peer it is timed against, plus a little slack for results the peer gets (nearly) exact. For
results whose scale varies (model logits, all parameter gradients as one vector) err is the relative Frobenius
difference instead, and the slack is SLACK itself. A benchmark whose result disagrees stops with `Disagreement`
before it times anything.

Results: `results_target` decides before a run measures anything where its table goes (the committed file in
benchmarks/results/ only for a run of the full set of cases), `provenance` heads it with the device, the versions,
the command line and the source revision, and `write_results` writes it in one piece.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo

FACTOR = 2.0
"""How many times the peer's error against the higher-precision run ours may have (FlashAttention's tests use 2)."""
SLACK = 1e-3
"""Absolute slack, relative to the largest reference value (at least 1): the GPU tests' `atol`."""
SLOW_CALL_MS = 250.0
"""Calls slower than this are timed as the median of 3 synchronized wall-clock calls instead of by `do_bench`
(whose 5 estimation calls, warm-up and repeats would cost seconds per number without making it steadier)."""

RESULTS = Path(__file__).resolve().parent / "results"

# FlexAttention compiles one graph per shape, dtype and grad mode, and a benchmark with its checks needs more than
# dynamo's default 8 per function; past the limit dynamo silently runs flex_attention eagerly (unfused, the full score
# matrix) and a benchmark would time that. Raise the limit, and make reaching it an error instead of a fallback.
torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.accumulated_recompile_limit = 4096
if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
    torch._dynamo.config.fail_on_recompile_limit_hit = True


class Disagreement(RuntimeError):
    """Our result and the peer's differ by more than the tolerance: the benchmark stops before timing."""


# ----------------------------------------------------------------------------------------------------- timing

@dataclass(frozen=True)
class TimingSettings:
    warmup_ms: int
    rep_ms: int

    def describe(self, device: str = "cuda") -> str:
        if device != "cuda":
            return "one wall-clock call after a warm-up call (CPU smoke run: not a measurement)"
        return (f"medians of `triton.testing.do_bench` (warm-up {self.warmup_ms} ms, repeats {self.rep_ms} ms, L2 "
                f"flushed before each call); calls over {SLOW_CALL_MS:.0f} ms: median of 3 synchronized wall-clock "
                "calls; every number after a warm-up call")


FULL_TIMING = TimingSettings(warmup_ms=50, rep_ms=300)
FAST_TIMING = TimingSettings(warmup_ms=10, rep_ms=100)
_timing = FULL_TIMING


def set_fast(fast: bool) -> TimingSettings:
    """Use fewer timing iterations (`--fast`): same cases, same checks, noisier medians."""
    global _timing
    _timing = FAST_TIMING if fast else FULL_TIMING
    return _timing


def timing() -> TimingSettings:
    return _timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def wall_median_ms(fn: Callable[[], object], device: str, calls: int = 3) -> float:
    """Median wall-clock time of `calls` calls of `fn()`, each synchronized on CUDA."""
    times = []
    for _ in range(calls):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def median_ms(fn: Callable[[], object], device: str = "cuda") -> float:
    """Median milliseconds of `fn()`: on CUDA after a warm-up call, `do_bench` (or 3 wall-clock calls for calls
    slower than SLOW_CALL_MS); on the CPU (smoke runs, where an interpreted kernel call takes seconds and compiles
    nothing) one call, with no warm-up."""
    if device != "cuda":
        return wall_median_ms(fn, device, calls=1)
    fn()  # warm-up: compiles, autotunes
    if wall_median_ms(fn, device, calls=1) >= SLOW_CALL_MS:
        return wall_median_ms(fn, device)
    import triton

    return triton.testing.do_bench(fn, warmup=_timing.warmup_ms, rep=_timing.rep_ms, return_mode="median")


@dataclass
class Timing:
    fwd_ms: float
    fwd_bwd_ms: float


def bench(fn_fwd, q, k, v, grad: torch.Tensor | None = None, backward: bool = True) -> Timing:
    """Median times of `fn_fwd(q, k, v)` (under no_grad) and of its forward+backward (NaN if not `backward`)."""
    device = q.device.type
    grad = torch.randn_like(q) if grad is None else grad
    with torch.no_grad():
        fwd_ms = median_ms(lambda: fn_fwd(q, k, v), device)
    if not backward:
        return Timing(fwd_ms, float("nan"))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def fwd_bwd():
        for leaf in leaves:
            leaf.grad = None
        fn_fwd(*leaves).backward(grad)

    return Timing(fwd_ms, median_ms(fwd_bwd, device))


def tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


# --------------------------------------------------------------------------------------------- agreement check

def outputs_and_grads(fn, q, k, v, grad: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """`{"out": fn(q, k, v)}`, and with `grad` the input gradients `dq`, `dk`, `dv` of `(out * grad).sum()`, on
    fresh leaves (the inputs are left untouched)."""
    if grad is None:
        with torch.no_grad():
            return {"out": fn(q, k, v)}
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return {"out": out.detach(), **{name: t.grad for name, t in zip(("dq", "dk", "dv"), leaves)}}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius norms) in float64: for results whose scale varies (model logits, all parameter
    gradients as one vector)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@dataclass(frozen=True)
class Agreement:
    """What the check measured for one tensor: the largest differences to the higher-precision run (ours, the
    peer's), the tolerance ours had to meet, and our largest difference to the peer."""

    ours_err: float
    peer_err: float
    tolerance: float
    vs_peer: float

    @property
    def ratio(self) -> float:
        """Our error over the peer's (1: as accurate as the peer)."""
        return self.ours_err / self.peer_err if self.peer_err > 0 else (1.0 if self.ours_err == 0 else float("inf"))


def check_agreement(
    case: str,
    ours: Mapping[str, torch.Tensor],
    peer: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    *,
    peer_name: str,
    reference_name: str,
    metric: str = "max",
    factor: float = FACTOR,
    slack: float = SLACK,
) -> dict[str, Agreement]:
    """Our results against the peer's on the same inputs, each against `reference` (the same computation in higher
    precision); raises `Disagreement` naming the case, the tensor, both errors and the tolerance when
    err(ours) > factor * err(peer) + slack * max(1, max|reference|), or when ours is not finite.

    `metric="max"`: err is the largest absolute difference (kernel outputs and gradients of N(0, 1) inputs);
    `"relative"`: the Frobenius norm of the difference over the reference's (model logits, parameter gradients),
    with the slack alone as the absolute term. Returns what was measured per tensor, for the results table."""
    if metric not in ("max", "relative"):
        raise ValueError(f"metric must be 'max' or 'relative', got {metric!r}")
    measured = {}
    for name, ref in reference.items():
        mine, theirs = ours[name], peer[name]
        if mine.shape != ref.shape or theirs.shape != ref.shape:
            raise Disagreement(f"{case}: {name} has shape {tuple(mine.shape)} (mmattn), {tuple(theirs.shape)} "
                               f"({peer_name}), {tuple(ref.shape)} ({reference_name})")
        if not torch.isfinite(mine).all():
            raise Disagreement(f"{case}: mmattn's {name} is not finite ({(~torch.isfinite(mine)).sum().item()} "
                               "NaN/Inf entries)")
        if metric == "max":
            errors = max_abs_diff(mine, ref), max_abs_diff(theirs, ref), max_abs_diff(mine, theirs)
            scale = ref.abs().max().item()
        else:
            errors = relative_diff(mine, ref), relative_diff(theirs, ref), relative_diff(mine, theirs)
            scale = 0.0
        measured[name] = judge(case, name, *errors, scale=scale, peer_name=peer_name, reference_name=reference_name,
                               metric=metric, factor=factor, slack=slack)
    return measured


def judge(
    case: str, name: str, ours_err: float, peer_err: float, vs_peer: float, *, scale: float, peer_name: str,
    reference_name: str, metric: str = "max", factor: float = FACTOR, slack: float = SLACK,
) -> Agreement:
    """The verdict of `check_agreement` on errors measured elsewhere (e.g. reduced over the ranks of a distributed
    run): `Disagreement` unless ours_err <= factor * peer_err + slack * max(1, scale) (`metric="max"`) or
    + slack (`"relative"`; `scale` unused)."""
    tolerance = factor * peer_err + slack * (max(1.0, scale) if metric == "max" else 1.0)
    if not ours_err <= tolerance:  # also catches NaN
        kind = "max abs" if metric == "max" else "relative"
        raise Disagreement(
            f"{case}: mmattn's {name} disagrees with {peer_name}: {kind} error against {reference_name} "
            f"{ours_err:.3e} > tolerance {tolerance:.3e} (= {factor:g} x {peer_name}'s own error {peer_err:.3e} "
            f"+ {slack:g}{' x max(1, max|reference|)' if metric == 'max' else ''}); {kind} difference to "
            f"{peer_name} {vs_peer:.3e}. Not timing a result that disagrees with its peer.")
    return Agreement(ours_err, peer_err, tolerance, vs_peer)


def worst(measured: Mapping[str, Agreement]) -> str:
    """The table cell of one check: the tensor whose error is the largest share of its tolerance, as
    `name ours/peer` errors (e.g. `dq 1.0e-2/9.8e-3`)."""
    name, a = max(measured.items(), key=lambda item: item[1].ours_err / max(item[1].tolerance, 1e-300))
    return f"{name} {a.ours_err:.1e}/{a.peer_err:.1e}"


@contextlib.contextmanager
def highest_precision():
    """float32 matmuls and convolutions without TF32 within the block (the higher-precision runs)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The inputs of the higher-precision run: float32 on the GPU, float64 on the CPU."""
    return [t.to(torch.float32 if t.is_cuda else torch.float64) for t in tensors]


# ------------------------------------------------------------------------------------------------ results file

def versions(*packages: str) -> str:
    """`torch X; triton Y; Python Z` plus the given packages' versions (those that import)."""
    parts = [f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("triton not installed")
    for name in packages:
        try:
            module = __import__(name)
            parts.append(f"{name} {module.__version__}")
        except ImportError:
            parts.append(f"{name} not installed")
    parts.append(f"Python {platform.python_version()}")
    return "; ".join(parts)


def device_name(device: str | None = None) -> str:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, smoke run: wall clock, not a measurement)"


def environment(device: str | None = None, packages: tuple[str, ...] = ()) -> str:
    """The device and versions line every results table starts with."""
    return f"Device: {device_name(device)}; {versions(*packages)}"


def command_line() -> str:
    """How this run was started, as a shell command from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(Path(__file__).resolve().parents[1])
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def source_revision() -> str | None:
    """The checkout's commit, marked when the working tree differs from it; None where git cannot tell (a copy
    without .git, as on the GPU machine)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + (" with uncommitted changes" if dirty else "") if commit else None


def provenance(device: str | None = None, packages: tuple[str, ...] = (), settings: str | None = None) -> str:
    """The header lines of a results file: device and versions, the command (with the settings in the environment
    that change what runs, such as MMATTN_AUTOTUNE), the source revision where known, the date, the timing."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    environ = " ".join(f"{name}={value}" for name, value in sorted(os.environ.items())
                       if name.startswith(("MMATTN_", "TRITON_", "TORCHINDUCTOR_", "TORCH_COMPILE")))
    revision = source_revision()
    return "\n".join([
        environment(device, packages) + ".",
        "",
        f"Command: `{(environ + ' ') if environ else ''}{command_line()}`"
        + (f" at {revision}" if revision else "") + f", run {now}. Every row below comes from this one run.",
        "",
        f"Timing: {settings or timing().describe(device)}.",
    ])


def benchmark_parser(doc: str, default_out: Path, quick_help: str = "tiny cases, also on the CPU: a smoke test"
                     ) -> argparse.ArgumentParser:
    """A benchmark script's parser with the options every script takes: --quick, --fast and --out."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--fast", action="store_true", help="every case with fewer timing iterations")
    parser.add_argument("--out", type=Path, default=None, help=f"results file (default {default_out} for a full run)")
    return parser


def run_device(parser, quick: bool) -> str:
    """The device to run on: "cuda" where there is a GPU, else the CPU for a --quick smoke run (any other run is
    refused)."""
    if torch.cuda.is_available():
        return "cuda"
    if not quick:
        parser.error("needs a CUDA GPU (or --quick for a smoke test on the CPU)")
    return "cpu"


def results_target(parser, out: Path | None, default: Path, complete: bool, why: str = "") -> Path | None:
    """Where a run writes its table, decided before it measures anything: the committed file `default` only for a run
    of the full set of cases (`complete`); a subset or smoke run writes where `--out` says (any other file) or
    nowhere (it prints the table). A subset run pointed at the committed file is refused: a table is written whole
    by one run, never patched row by row."""
    if out is None:
        return default if complete else None
    if not complete and out.resolve() == default.resolve():
        parser.error(f"--out {out}: a run of a subset of the cases ({why or 'see --help'}) may not write the "
                     f"committed results file {default.name}; give another --out, or run the full set")
    return out


def write_results(text: str, target: Path | None) -> None:
    """Print the table; write it to `target` (if any) in one piece."""
    print(text, flush=True)
    if target is None:
        print("(not written: a subset or smoke run writes only where --out says)", flush=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text if text.endswith("\n") else text + "\n")
    print(f"wrote {target}", flush=True)


def tiles_picked(kernels, describe: Callable[[dict], str], more: tuple = ()) -> str:
    """The tile the autotuner last picked for each kernel of a Triton family module (fwd, dQ, dK/dV, then the
    `(name, kernel)` pairs of `more`), its compile-time tile arguments worded by `describe`; "?" for one not run."""

    def word(kernel) -> str:
        config = getattr(kernel, "best_config", None)
        return "?" if config is None else f"{describe(config.kwargs)} w{config.num_warps} s{config.num_stages}"

    return ", ".join(f"{part} {word(kernel)}" for part, kernel in
                     (("fwd", kernels.fwd_kernel), ("dQ", kernels.dq_kernel), ("dK/dV", kernels.dkdv_kernel), *more))
