"""Vision backbones on the GPU: each model on mmattn's kernels (`backend="auto"`) against the same model, same
weights, on a baseline path. One results table per family, each written whole by one run:
benchmarks/results/vision_<family>.md (biformer, litv2, nat, dinat, agent).

Baselines (the `backend` of the same timm model; each results file describes its own):
- BiFormer, LITv2, Agent: `"torch"`, the official algorithm (BASELINES says what differs from the official code);
- NAT, DiNAT: `"flex"`, FlexAttention with the NA mask (the fastest peer here: NATTEN is not installed). mmattn's
  `"torch"` path for NA is its memory-bounded chunked reference, not an official formulation, and is not timed.

Per model and path: images/s at 224 (batch 128, bf16 autocast) for inference and for a training step (forward,
cross-entropy, backward, SGD step), and peak activation memory (peak allocated minus the weights) of a batch-1
inference at 1024x1024. Ratios are ours / baseline for throughput and baseline / ours for memory (above 1: mmattn
wins).

Before a model is timed, its outputs are checked (benchmarks/common.py): on the timing batch, in eval mode (no
dropout or drop-path), the logits and all parameter gradients (of the cross-entropy, as one vector) of both paths
under bf16 autocast are compared with the `"torch"` path in float32 without autocast (float64 on the CPU); the
relative error (Frobenius) of ours must be at most 2x the baseline's + 1e-3, or the run stops.

    python benchmarks/vision.py [--fast]                    # every family; writes one file per family
    python benchmarks/vision.py --family nat [--fast]       # one family's whole table: vision_nat.md
    python benchmarks/vision.py --only nat_tiny --out /tmp/v.md   # a subset (never a committed file)
    python benchmarks/vision.py --quick                     # tiny shapes, smallest model per family, also CPU

`--fast` takes fewer timing iterations (and one round for the Agent models); the checks and cases are the same.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm
from common import (
    RESULTS, Agreement, Disagreement, check_agreement, highest_precision, median_ms, provenance, relative_diff,
    results_target, set_fast, write_results,
)

import mmattn.vision  # noqa: F401  (registers the models with timm)

FAMILIES = ("BiFormer", "LITv2", "NAT", "DiNAT", "Agent")


def family_file(family: str) -> Path:
    return RESULTS / f"vision_{family.lower()}.md"

OFFICIAL, FLEX = "official (torch)", "FlexAttention"

BASELINES = {
    "BiFormer": (OFFICIAL, {"backend": "torch"},
                 "`backend=\"torch\"`: the official Bi-Level Routing Attention algorithm, the routed regions' keys "
                 "and values gathered (a top-k-fold copy) and attended with an explicit softmax region by region "
                 "(`mmattn.kernels.reference.gather_attention`), and the last stage's global attention with an explicit "
                 "softmax. It is mmattn's reference code, not the official file: the attention matmuls and softmax "
                 "run in float32 on the bf16 activations, and every routed layer checks the routing indices on the "
                 "host (one device synchronization), where the official code under autocast runs those matmuls in "
                 "bf16 without a synchronization; so this baseline may be slower than the official code by a margin "
                 "not measured here."),
    "LITv2": (OFFICIAL, {"backend": "torch"},
              "`backend=\"torch\"`: HiLo's official formulation, Hi-Fi attention inside 2x2 windows and Lo-Fi "
              "attention to the average-pooled map, both with an explicit softmax. As for BiFormer it is mmattn's "
              "reference code: float32 attention math on bf16 activations, the windows gathered through the routed "
              "reference (one copy of their keys and values that the official reshape avoids, and one host "
              "synchronization per layer)."),
    "NAT": (FLEX, {"backend": "flex"},
            "`backend=\"flex\"`: compiled FlexAttention with the neighborhood `mask_mod` and the relative position "
            "bias as `score_mod` (NATTEN's own FlexAttention formulation). The official implementation, NATTEN's CUDA "
            "kernels, is not installed here; mmattn's `\"torch\"` path is a memory-bounded chunked reference, not an "
            "official formulation, and is not timed."),
    "DiNAT": (FLEX, {"backend": "flex"}, "as for NAT, with the dilated neighborhoods."),
    "Agent": (OFFICIAL, {"backend": "torch"},
              "`backend=\"torch\"`: the official order of operations (the softmax scale applied to the queries, "
              "the agent biases rebuilt every forward), matmuls in bf16 under autocast as in the official code: the "
              "official algorithm."),
}


@dataclass(frozen=True)
class Case:
    family: str
    model: str
    rounds: int = 1  # default rounds of a full run (`--rounds` overrides; `--fast` takes 1)

    @property
    def baseline(self) -> dict:
        return BASELINES[self.family][1]

    @property
    def baseline_name(self) -> str:
        return BASELINES[self.family][0]


CASES = [
    Case("BiFormer", "biformer_tiny"),
    Case("BiFormer", "biformer_small"),
    Case("BiFormer", "biformer_base"),
    Case("LITv2", "litv2_small"),
    Case("LITv2", "litv2_medium"),
    Case("LITv2", "litv2_base"),
    Case("NAT", "nat_mini"),
    Case("NAT", "nat_tiny"),
    Case("NAT", "nat_base"),
    Case("DiNAT", "dinat_tiny"),
    Case("DiNAT", "dinat_base"),
    # at parity with their baseline: 4 rounds in alternating order, so that drift does not decide the ratio
    Case("Agent", "agent_deit_small", rounds=4),
    Case("Agent", "agent_pvt_small", rounds=4),
    Case("Agent", "agent_swin_tiny", rounds=4),
]


@dataclass(frozen=True)
class Setting:
    batch: int
    size: int
    memory_size: int
    device: str


def build(case: Case, kwargs: dict, device: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(case.model, **kwargs).to(device)


def autocast(device: str):
    return torch.autocast(device, dtype=torch.bfloat16)


def out_of_memory_as_result(measurement):
    """A measurement that reports "OOM" instead of raising when the path does not fit on the GPU (an honest result
    for a baseline at batch 128 or 1024x1024), freeing what the failed attempt held."""

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

    ips = setting.batch / median_ms(step, setting.device) * 1e3
    optimizer.zero_grad(set_to_none=True)
    return ips


@out_of_memory_as_result
def peak_memory_mib(model: torch.nn.Module, setting: Setting) -> float | str:
    """Peak activation memory of a batch-1 bf16 inference at `memory_size` (CUDA only)."""
    if setting.device != "cuda":
        return "n/a"
    x = torch.randn(1, 3, setting.memory_size, setting.memory_size, device="cuda")
    model.eval()
    with torch.no_grad(), autocast("cuda"):
        model(x)  # warm-up: compiles and autotunes outside the measured peak
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), autocast("cuda"):
        model(x)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def logits_and_grads(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, low: bool) -> dict[str, torch.Tensor]:
    """Eval-mode logits (no grad) and the parameter gradients of the cross-entropy as one float64 vector; under
    bf16 autocast if `low`, else in the model's own precision."""
    model.eval()
    device = x.device.type
    context = autocast(device) if low else highest_precision()
    with torch.no_grad(), context:
        logits = model(x).double()
    model.zero_grad(set_to_none=True)
    with autocast(device) if low else highest_precision():
        torch.nn.functional.cross_entropy(model(x), target).backward()
    grads = torch.cat([p.grad.double().flatten() if p.grad is not None else torch.zeros(p.numel(), dtype=torch.float64,
                                                                                          device=p.device)
                       for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return {"logits": logits, "gradients": grads}


BF16_BOUND = 2e-2
"""Relative error of a bf16 result that the check accepts when the baseline itself does not fit on the GPU (the
spec's sanity bound for bf16 attention outputs, specs/kernels.md section 8)."""


def check(case: Case, models: dict[str, torch.nn.Module], baseline_name: str, setting: Setting):
    """Ours and the baseline against the `"torch"` path in float32 (CPU: float64), same weights, same batch."""
    torch.manual_seed(1)
    x = torch.randn(setting.batch, 3, setting.size, setting.size, device=setting.device)
    target = torch.randint(0, 1000, (setting.batch,), device=setting.device)
    high = torch.float32 if setting.device == "cuda" else torch.float64
    reference_model = build(case, {"backend": "torch"}, setting.device).to(high)
    reference_model.load_state_dict(models["ours"].state_dict())
    reference = logits_and_grads(reference_model, x.to(high), target, low=False)
    del reference_model
    ours = logits_and_grads(models["ours"], x, target, low=True)
    reference_name = f"the torch path in {high}"
    try:
        baseline = logits_and_grads(models["baseline"], x, target, low=True)
    except torch.cuda.OutOfMemoryError:  # the baseline does not fit: ours against the reference alone
        models["baseline"].zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        measured = {}
        for name, ref in reference.items():
            error = relative_diff(ours[name], ref)
            if not error <= BF16_BOUND:
                raise Disagreement(f"{case.model}: mmattn's {name} has relative error {error:.3e} against "
                                   f"{reference_name}, above the bf16 bound {BF16_BOUND:g} (the {baseline_name} "
                                   "baseline ran out of memory, so it could not calibrate the check)")
            measured[name] = Agreement(error, float("nan"), BF16_BOUND, float("nan"))
        return measured
    return check_agreement(case.model, ours, baseline, reference, peer_name=f"the {baseline_name} baseline",
                           reference_name=reference_name, metric="relative")


def median_or_failure(samples: list) -> float | str:
    """The median of a path's rounds, or its failure ("OOM") if any round failed."""
    failures = [s for s in samples if isinstance(s, str)]
    return failures[0] if failures else statistics.median(samples)


def measure(case: Case, setting: Setting, rounds: int) -> tuple[dict[str, dict], dict]:
    """Check, then the throughput of both paths, `rounds` times in turn and in alternating order (so that drift in
    clocks or allocator state hits both alike), each path's median kept; then each path's peak memory."""
    models = {"ours": build(case, {}, setting.device), "baseline": build(case, case.baseline, setting.device)}
    models["baseline"].load_state_dict(models["ours"].state_dict())  # the same weights, whatever the build order
    start = time.perf_counter()
    agreement = check(case, models, case.baseline_name, setting)
    print(f"{case.model}: check passed in {time.perf_counter() - start:.0f} s: "
          + ", ".join(f"{name} {a.ours_err:.2e} vs baseline {a.peer_err:.2e}" for name, a in agreement.items()),
          flush=True)
    samples = {name: {"infer": [], "train": []} for name in models}
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
    return results, agreement


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else "-"


def fmt(value) -> str:
    return f"{value:,.0f}" if isinstance(value, float) else str(value)


def errors(agreement) -> str:
    peer = "baseline OOM" if agreement.peer_err != agreement.peer_err else f"{agreement.peer_err:.1e}"
    return f"{agreement.ours_err:.1e} / {peer}"


def format_row(case: Case, results: dict, agreement: dict, rounds: int) -> str:
    ours, base = results["ours"], results["baseline"]
    logits, grads = agreement["logits"], agreement["gradients"]
    return (
        f"| {case.model} | {case.baseline_name} | {fmt(ours['infer'])} | {fmt(base['infer'])} | "
        f"{ratio(ours['infer'], base['infer'])} | {fmt(ours['train'])} | {fmt(base['train'])} | "
        f"{ratio(ours['train'], base['train'])} | {fmt(ours['memory'])} | {fmt(base['memory'])} | "
        f"{ratio(base['memory'], ours['memory'])} | {rounds} | {errors(logits)} | {errors(grads)} |"
    )


def goals(rows: dict[str, tuple[Case, dict]]) -> list[str]:
    """The vision goals, judged on this run's rows (those of the models it ran)."""
    lines = []

    def value(model, path, key):
        return rows[model][1][path][key] if model in rows else None

    ours, base = value("biformer_tiny", "ours", "infer"), value("biformer_tiny", "baseline", "infer")
    if isinstance(ours, float) and isinstance(base, float):
        lines.append(f"- BiFormer-T inference >= 1.5x its baseline (the gather algorithm): {ours / base:.2f}x, "
                     f"{'met' if ours / base >= 1.5 else 'missed'}.")
    ours, base = value("biformer_tiny", "ours", "memory"), value("biformer_tiny", "baseline", "memory")
    if isinstance(ours, float) and isinstance(base, float):
        lines.append(f"- BiFormer-T activation memory at 1024x1024 <= 1/4 of its baseline: 1/{base / ours:.1f}, "
                     f"{'met' if base / ours >= 4 else 'missed'}.")
    if "nat_tiny" in rows:
        parts = []
        for key, label in (("infer", "inference"), ("train", "training")):
            ours, base = value("nat_tiny", "ours", key), value("nat_tiny", "baseline", key)
            parts.append(f"{label} {ratio(ours, base)}" + (
                f" ({'met' if ours / base >= 1.5 else 'missed'})" if isinstance(ours, float) and isinstance(base, float)
                else ""))
        lines.append(f"- NAT-T >= 1.5x FlexAttention: {', '.join(parts)}.")
    slower = [f"{model} {key} {ratio(result['ours'][key], result['baseline'][key])}"
              for model, (_, result) in rows.items() for key in ("infer", "train")
              if isinstance(result["ours"][key], float) and isinstance(result["baseline"][key], float)
              and result["ours"][key] < result["baseline"][key]]
    lines.append("- No model slower than its baseline: " + ("met." if not slower else "missed: " + ", ".join(slower) + "."))
    return lines


def table(family: str, lines: list[str], rows: dict, setting: Setting) -> str:
    precision = "float32 without autocast (TF32 off)" if setting.device == "cuda" else "float64"
    name, _, description = BASELINES[family]
    return (
        f"# Vision backbones, {family}: mmattn kernels vs {name}\n\n"
        f"{provenance(setting.device, ('timm',))}\n\n"
        f"bf16 autocast; images/s at {setting.size}x{setting.size}, batch {setting.batch}; peak activation memory "
        f"(MiB, weights excluded) of a batch-1 inference at {setting.memory_size}x{setting.memory_size}, after a "
        "warm-up call. Ours = `backend=\"auto\"` (mmattn's kernels); baseline = the same model, same weights, "
        "on the path below. Ratios above 1: mmattn wins. \"OOM\": the path did not fit. Each model's two paths are "
        "timed one after the other, `rounds` times in alternating order (medians).\n\n"
        f"Baseline, {name}: {description}\n\n"
        "Check, before each model was timed: on the timing batch, in eval mode, the logits and all parameter gradients "
        "of the cross-entropy (one vector) of both paths under bf16 autocast against the `\"torch\"` path in "
        f"{precision}, same weights; every model met relative error (Frobenius) ours <= 2 x baseline's + 1e-3 "
        "(benchmarks/common.py). The last two columns give the two errors.\n\n"
        "| model | baseline | infer img/s | baseline | speedup | train img/s | baseline | speedup | mem MiB | "
        "baseline | mem saving | rounds | logits rel. err ours / baseline | grads rel. err ours / baseline |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(lines) + "\n\nGoals:\n" + "\n".join(goals(rows)) + "\n"
    )


def run(cases: list[Case], setting: Setting, rounds: int | None, targets: dict[str, Path | None],
        combined: Path | None) -> None:
    """Measure family by family; each family's table is written (whole) as soon as its last model is done, to
    `targets[family]`, or all of them together to `combined`."""
    texts = []
    for family in dict.fromkeys(case.family for case in cases):
        lines, rows = [], {}
        for case in (c for c in cases if c.family == family):
            case_rounds = rounds if rounds is not None else case.rounds
            results, agreement = measure(case, setting, case_rounds)
            rows[case.model] = (case, results)
            lines.append(format_row(case, results, agreement, case_rounds))
            print(lines[-1], flush=True)
        text = table(family, lines, rows, setting)
        if combined is None:
            write_results(text, targets.get(family))
        else:
            print(text, flush=True)
            texts.append(text)
    if combined is not None:
        write_results("\n".join(texts), combined)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, smallest model per family; runs on the CPU too")
    parser.add_argument("--fast", action="store_true", help="every model with fewer timing iterations and 1 round")
    parser.add_argument("--family", default="", help=f"comma-separated families to run, of {', '.join(FAMILIES)} "
                                                     "(default: all); each writes its whole table")
    parser.add_argument("--only", default="", help="comma-separated timm model names to run, in this order: a subset")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per model (default: 4 for the Agent models, 1 for the others; 1 with --fast)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write every table of this run to this one file (default: benchmarks/results/"
                             "vision_<family>.md per family, for full runs of a family)")
    args = parser.parse_args()
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.quick and device != "cuda":
        parser.error("needs a CUDA GPU (or --quick for a smoke run on the CPU)")
    by_lower = {family.lower(): family for family in FAMILIES}
    families = [name.strip() for name in args.family.split(",") if name.strip()]
    if unknown := [name for name in families if name.lower() not in by_lower]:
        parser.error(f"--family: unknown families {unknown}; known: {list(FAMILIES)}")
    families = [by_lower[name.lower()] for name in families] or list(FAMILIES)
    by_model = {c.model: c for c in CASES}
    only = [name for name in args.only.split(",") if name]
    if unknown := [name for name in only if name not in by_model]:
        parser.error(f"--only: unknown models {unknown}; known: {sorted(by_model)}")
    cases = [by_model[name] for name in only] if only else [c for c in CASES if c.family in families]
    if args.quick and not only:
        smallest = {c.family: c for c in reversed(CASES)}  # the smallest model of each family
        cases = [smallest[family] for family in FAMILIES if family in families]
    ran = {family: {c.model for c in cases if c.family == family} for family in dict.fromkeys(c.family for c in cases)}
    complete = {family: not args.quick and models == {c.model for c in CASES if c.family == family}
                for family, models in ran.items()}
    why = "--quick" if args.quick else "--only"
    if args.out is not None:
        committed = {family_file(family).resolve(): family for family in FAMILIES}
        family = committed.get(args.out.resolve())
        if family is not None and (list(ran) != [family] or not complete[family]):
            parser.error(f"--out {args.out}: {args.out.name} is the committed table of {family}, written only by a "
                         f"full run of {family} alone; give another --out")
    targets = {family: results_target(parser, None, family_file(family), complete[family], why) for family in ran}
    set_fast(args.fast)
    rounds = 1 if (args.fast or args.quick) and args.rounds is None else args.rounds
    setting = Setting(2, 64, 128, device) if args.quick else Setting(128, 224, 1024, device)
    if args.quick and device != "cuda":  # FlexAttention has no CPU backward: the NA smoke run takes the reference
        for family in ("NAT", "DiNAT"):
            BASELINES[family] = ("torch (CPU stand-in)", {"backend": "torch"},
                                 "the chunked torch reference, standing in for FlexAttention (no CPU backward).")
    run(cases, setting, rounds, targets, args.out)


if __name__ == "__main__":
    main()
