"""Vision backbones on the GPU: mmattn's kernels vs the same model on the official algorithm (`attn_backend="torch"`:
BRA gather, explicit-softmax windows) and vs FlexAttention where a family has it. Writes benchmarks/results/vision.md.

Per case and path: images/s at 224 (batch 128, bf16 autocast) for inference and for a training step (forward,
cross-entropy, backward, SGD step), and peak activation memory (peak allocated minus the weights) of a batch-1
inference at 1024x1024. Ratios are ours / reference for throughput and reference / ours for memory (above 1: we
win). "grad rel. err" is |g_ours - g_ref| / |g_ref| over all parameter gradients as one vector, after one bf16
forward+backward of both paths on the same weights and batch (4 images at 224).

    python benchmarks/vision.py [--quick] [--only biformer_tiny,...] [--rounds N] [--out benchmarks/results/vision.md]

`--quick` runs tiny shapes (batch 2, 64x64 and 128x128) and also works on the CPU (wall-clock medians there).
Families add rows to CASES: the timm name, the kwargs selecting the reference path, and optionally Flex's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm

import mmattn.vision  # noqa: F401  (registers the models with timm)


@dataclass(frozen=True)
class Case:
    family: str
    model: str
    reference: dict = field(default_factory=lambda: {"attn_backend": "torch"})
    flex: dict | None = None
    ours: dict = field(default_factory=dict)


NA_FLEX = {"attn_backend": "flex"} if torch.cuda.is_available() else None  # FlexAttention has no CPU backward
# FlexAttention compiles one graph per shape and grad mode; past dynamo's default limit of 8 it silently runs eager
# (unfused, full score matrix), which a run over several NAT models reaches
torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.accumulated_recompile_limit = 4096

CASES = [
    Case("BiFormer", "biformer_tiny"),
    Case("BiFormer", "biformer_small"),
    Case("BiFormer", "biformer_base"),
    Case("LITv2", "litv2_small"),
    Case("LITv2", "litv2_medium"),
    Case("LITv2", "litv2_base"),
    Case("NAT", "nat_mini", flex=NA_FLEX),
    Case("NAT", "nat_tiny", flex=NA_FLEX),
    Case("NAT", "nat_base", flex=NA_FLEX),
    Case("DiNAT", "dinat_tiny", flex=NA_FLEX),
    Case("DiNAT", "dinat_base", flex=NA_FLEX),
    Case("Agent", "agent_deit_small"),
    Case("Agent", "agent_pvt_small"),
    Case("Agent", "agent_swin_tiny"),
]


@dataclass(frozen=True)
class Setting:
    batch: int
    size: int
    memory_size: int
    device: str


SLOW_CALL_MS = 250.0


def wall_median_ms(fn, device: str, calls: int = 3) -> float:
    """Median wall-clock time of `calls` calls of `fn()` (synchronized on CUDA)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def median_ms(fn, device: str) -> float:
    """Median time of `fn()` after a warm-up call: `triton.testing.do_bench` on CUDA, except for calls slower than
    SLOW_CALL_MS (the unfused NA references at batch 128), which take the median of 3 wall-clock calls instead of
    do_bench's 5 estimation calls plus warm-up and repeats; wall clock on the CPU."""
    first = wall_median_ms(fn, device, calls=1)
    if device == "cuda" and first < SLOW_CALL_MS:
        import triton

        return triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")
    return wall_median_ms(fn, device)


def build(case: Case, kwargs: dict, device: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(case.model, **kwargs).to(device)


def autocast(device: str):
    return torch.autocast(device, dtype=torch.bfloat16)


def out_of_memory_as_result(measurement):
    """A measurement that reports "OOM" instead of raising when the path does not fit on the GPU (an honest result
    for the reference paths at batch 128 or 1024x1024), freeing what the failed attempt held."""

    def measured(model: torch.nn.Module, setting: Setting):
        try:
            return measurement(model, setting)
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return "OOM"

    return measured


@out_of_memory_as_result
def inference_ips(model: torch.nn.Module, setting: Setting) -> float:
    x = torch.randn(setting.batch, 3, setting.size, setting.size, device=setting.device)
    model.eval()
    with torch.no_grad(), autocast(setting.device):
        ms = median_ms(lambda: model(x), setting.device)
    return setting.batch / ms * 1e3


@out_of_memory_as_result
def training_ips(model: torch.nn.Module, setting: Setting) -> float:
    x = torch.randn(setting.batch, 3, setting.size, setting.size, device=setting.device)
    target = torch.randint(0, 1000, (setting.batch,), device=setting.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(setting.device):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()

    return setting.batch / median_ms(step, setting.device) * 1e3


@out_of_memory_as_result
def peak_memory_mib(model: torch.nn.Module, setting: Setting) -> float | str:
    """Peak activation memory of a batch-1 bf16 inference at `memory_size` (CUDA only)."""
    if setting.device != "cuda":
        return "n/a"
    x = torch.randn(1, 3, setting.memory_size, setting.memory_size, device="cuda")
    model.eval()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), autocast("cuda"):
        model(x)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def gradient_error(case: Case, kwargs: dict, setting: Setting) -> float:
    """Relative gradient difference (all parameters as one vector) of `kwargs`' path vs the reference path."""
    x = torch.randn(4, 3, setting.size, setting.size, device=setting.device)
    target = torch.arange(4, device=setting.device)
    grads = []
    for path in (kwargs, case.reference):
        model = build(case, path, setting.device)
        model.train()
        with autocast(setting.device):
            torch.nn.functional.cross_entropy(model(x), target).backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    diff = torch.stack([(grads[0][n] - g).norm() for n, g in grads[1].items()]).norm()
    return (diff / torch.stack([g.norm() for g in grads[1].values()]).norm()).item()


def median_or_failure(samples: list) -> float | str:
    """The median of a path's rounds, or its failure ("OOM") if any round failed."""
    failures = [s for s in samples if isinstance(s, str)]
    return failures[0] if failures else statistics.median(samples)


def measure(case: Case, paths: dict[str, dict], setting: Setting, rounds: int) -> dict[str, dict]:
    """Throughput of every path, `rounds` times in turn and in alternating order (so drift in clocks or allocator
    state hits all paths alike), each path's median kept; then each path's peak memory."""
    models = {name: build(case, kwargs, setting.device) for name, kwargs in paths.items()}
    samples = {name: {"infer": [], "train": []} for name in paths}
    for round_index in range(rounds):
        order = list(models.items())
        for name, model in order[::-1] if round_index % 2 else order:  # ABBA: position in a round cancels out
            samples[name]["infer"].append(inference_ips(model, setting))
            samples[name]["train"].append(training_ips(model, setting))
    results = {}
    for name, model in models.items():
        results[name] = {key: median_or_failure(values) for key, values in samples[name].items()}
        results[name]["memory"] = peak_memory_mib(model, setting)
        print(case.model, name, results[name], flush=True)
    del models
    if setting.device == "cuda":
        torch.cuda.empty_cache()
    return results


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else "-"


def fmt(value) -> str:
    return f"{value:,.0f}" if isinstance(value, float) else str(value)


def run(cases: list[Case], setting: Setting, out: Path, rounds: int = 1) -> None:
    if setting.device == "cuda":
        from common import environment

        env = environment()
    else:
        env = f"Device: CPU (quick smoke run, wall clock); torch {torch.__version__}"
    header = (
        "# Vision backbones: mmattn kernels vs the official algorithm\n\n"
        f"{env}. bf16 autocast; images/s at {setting.size}x{setting.size}, batch {setting.batch}; peak activation "
        f"memory (MiB, weights excluded) of a batch-1 inference at {setting.memory_size}x{setting.memory_size}.\n"
        "Reference = the same model with `attn_backend=\"torch\"` (official algorithm). Ratios above 1: mmattn wins.\n\n"
        "| family | model | infer img/s | ref | speedup | train img/s | ref | speedup | mem MiB | ref | "
        "mem saving | vs flex (infer / train) | grad rel. err |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for case in cases:
        paths = {"ours": case.ours, "reference": case.reference}
        if case.flex is not None:
            paths["flex"] = case.flex
        results = measure(case, paths, setting, rounds)
        ours, ref = results["ours"], results["reference"]
        grad_err = gradient_error(case, case.ours, setting)
        flex = results.get("flex")
        lines.append(
            f"| {case.family} | {case.model} | {fmt(ours['infer'])} | {fmt(ref['infer'])} | "
            f"{ratio(ours['infer'], ref['infer'])} | {fmt(ours['train'])} | {fmt(ref['train'])} | "
            f"{ratio(ours['train'], ref['train'])} | {fmt(ours['memory'])} | {fmt(ref['memory'])} | "
            f"{ratio(ref['memory'], ours['memory'])} | "
            + (f"{ratio(ours['infer'], flex['infer'])} / {ratio(ours['train'], flex['train'])}" if flex else "-")
            + f" | {grad_err:.1e} |")
        out.write_text(header + "\n".join(lines) + "\n")  # after every model: a run cut short keeps its rows
        print(lines[-1], flush=True)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes; runs on the CPU too")
    parser.add_argument("--only", default="", help="comma-separated timm model names to run, in this order")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each model's paths in turn this many times and keep the medians")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default benchmarks/results/vision.md, vision_quick.md with --quick)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.quick and device != "cuda":
        raise SystemExit("benchmarks/vision.py needs a CUDA GPU (or --quick for a CPU smoke run)")
    setting = Setting(2, 64, 128, device) if args.quick else Setting(128, 224, 1024, device)
    by_model = {c.model: c for c in CASES}
    only = [name for name in args.only.split(",") if name]
    if unknown := [name for name in only if name not in by_model]:
        parser.error(f"--only: unknown models {unknown}; known: {sorted(by_model)}")
    cases = [by_model[name] for name in only] if only else CASES
    if args.quick and not only:
        cases = list({c.family: c for c in reversed(CASES)}.values())  # the smallest model of each family
    results = Path(__file__).parent / "results"
    run(cases, setting, args.out or results / ("vision_quick.md" if args.quick else "vision.md"), args.rounds)


if __name__ == "__main__":
    main()
