"""LVLM intervention overhead: prefill latency, decode tokens/s and KV-cache memory on a LLaVA-1.5-7B-shaped model
with random weights (576 image tokens), for no hook, VAR, GIFT, FastV (K=2, R=0.75) and VFlowOpt keep 10 %.

GPU:   python benchmarks/vlm.py                              (bf16, writes benchmarks/results/vlm.md)
       python benchmarks/vlm.py --interleaved --repeats 4    (latency in rounds, writes benchmarks/results/vlm_interleaved.md)
CPU:   python benchmarks/vlm.py --quick                      (tiny config, smoke test only; prints the table)

Before timing, VAR's and GIFT's fused decode rows (`backend="auto"`) are checked against their explicit decode rows
(`backend="torch"`) on the benchmark prompt: the logits of the prefill and of the first decoding step may differ by at
most 2x the model's bf16 noise floor (the difference between SDPA and eager attention for the unedited model, same
logits) + 1e-3 x max(1, max|logit|) (benchmarks/common.py), or the run stops.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS as RESULTS_DIR
from common import command_line, judge, max_abs_diff, results_target

from mmattn import vlm

RESULTS = RESULTS_DIR / "vlm.md"
INTERLEAVED_RESULTS = RESULTS_DIR / "vlm_interleaved.md"
FUSED_DECODE = ("VAR", "GIFT")  # methods whose decode rows have a fused kernel, also timed on the explicit path


#: Model sizes: "full" is llava-hf/llava-1.5-7b-hf (CLIP ViT-L/14-336 + Vicuna-7B); "proxy" keeps its 576 image tokens
#: and prompt but shrinks widths and depth for CPU measurements; "host" keeps the 32 layers with tiny widths, so CPU
#: time is mostly host overhead (the regime of HF decoding on a GPU); "quick" is a smoke test.
SIZES = {
    "full": ({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
             {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}),
    "proxy": ({"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4},
              {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 16, "num_attention_heads": 8}),
    "host": ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
             {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 32, "num_attention_heads": 4}),
    "quick": ({"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4},
              {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4}),
}


def build(size: str, device: str, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    vision, text = SIZES[size]
    vision = {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14, "projection_dim": 768, **vision}
    text = {"model_type": "llama", "num_key_value_heads": text["num_attention_heads"], "vocab_size": 32064,
            "max_position_embeddings": 4096, "pad_token_id": 0, **text}
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                         vision_feature_layer=-2)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    torch.set_default_dtype(default)
    model.eval().set_attn_implementation("sdpa")
    plant_sinks(model, sink_dims(size))
    return model


def sink_dims(size: str) -> tuple[int, ...]:
    """VAR's D_sink: LLaMA-2-7B's for the full size (the preset), two small dims otherwise."""
    return (2533, 1415) if size == "full" else (3, 7)


def plant_sinks(model: LlavaForConditionalGeneration, dims: tuple[int, ...]) -> None:
    """Random weights have no massive activations, and VAR leaves a layer without visual sinks alone: from layer 2
    on, BOS and every 64th image token of the prompt get 100x their RMS on the sink dims `dims` (phi = 100 /
    sqrt(1 + 20000 / hidden size): 41 at 4096, 5.6 at 64), as LLaVA-1.5 has a few such tokens, so that VAR edits as
    on the real model. In unpruned prefills only; every compared method runs on this model."""
    positions = [0, *range(35, 35 + 576, 64)]  # the layout of `inputs`: BOS, 34 text tokens, 576 image tokens

    def plant(module, args, hidden):
        if hidden.shape[1] != 1 + 34 + 576 + 40:
            return hidden
        hidden = hidden.clone()
        rms = hidden[:, positions].float().pow(2).mean(-1).sqrt().to(hidden.dtype)
        for dim in dims:
            hidden[:, positions, dim] = 100 * rms
        return hidden

    model.model.language_model.layers[1].register_forward_hook(plant)


def inputs(device: str, dtype: torch.dtype, batch: int = 1) -> dict:
    """`batch` copies of one 651-token prompt (34 text tokens, 576 image tokens, 40 text tokens) and its image."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([1]), torch.randint(2, 31000, (34,), generator=generator), torch.full((576,), 32000),
                     torch.randint(2, 31000, (40,), generator=generator)])[None].expand(batch, -1)
    pixels = torch.randn(1, 3, 336, 336, generator=generator).expand(batch, -1, -1, -1)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def kernel_ms(fn, device: str) -> float:
    """GPU busy time of one call: its CUDA kernels' summed time (NaN on the CPU). Eager prefill of a 651-token prompt
    is host-bound, so this shows how much of the compute pruning removes even where the wall clock cannot."""
    if device != "cuda":
        return float("nan")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        fn()
        sync(device)
    return sum(event.self_device_time_total for event in trace.key_averages()) / 1e3


def kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def generated_cache(output):
    """The KV cache a `generate(..., return_dict_in_generate=True)` output holds: `.cache` from transformers 5.24 on
    (where `.past_key_values` is deprecated), `.past_key_values` before."""
    return output.cache if "cache" in output else output.past_key_values


def measure(model, batch: dict, device: str, new_tokens: int, repeats: int) -> dict:
    def prefill():
        return model.generate(**batch, max_new_tokens=1, min_new_tokens=1, do_sample=False,
                              return_dict_in_generate=True)

    def decode():
        return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              return_dict_in_generate=True)

    with torch.no_grad():
        prefill_s = timed(prefill, device, repeats)
        if new_tokens == 1:
            return {"prefill_ms": prefill_s * 1e3, "prefill_kernel_ms": kernel_ms(prefill, device)}
        total_s = timed(decode, device, repeats)
        prefill_kernels = kernel_ms(prefill, device)
        prompt_cache = generated_cache(prefill())
        cache = generated_cache(decode())
    text_tokens = int((batch["input_ids"] != model.config.image_token_id).sum())
    per_token = prompt_cache.layers[0].keys[0, :, 0].numel() * prompt_cache.layers[0].keys.element_size() * 2
    image_kv = sum(layer.keys.shape[2] - text_tokens for layer in prompt_cache.layers) * per_token
    return {"prefill_ms": prefill_s * 1e3, "prefill_kernel_ms": prefill_kernels, "total_ms": total_s * 1e3,
            "decode_tok_s": (new_tokens - 1) / max(total_s - prefill_s, 1e-9), "kv_mib": kv_bytes(cache) / 2**20,
            "prompt_kv_mib": kv_bytes(prompt_cache) / 2**20, "image_kv_mib": image_kv / 2**20}


def interleaved_latency(model, batch: dict, device: str, new_tokens: int, repeats: int, plan: dict) -> dict:
    """Median and least generate latency (s) per method of `plan` (label -> (intervention, backend)), timed in
    rounds that run every method once, so drifts of a shared host's speed hit all methods alike."""
    times = {label: [] for label in plan}
    with torch.no_grad():
        for round_index in range(repeats + 1):  # round 0 warms up
            for label, (intervention, backend) in plan.items():
                handle = None if intervention is None else vlm.apply(model, intervention, backend=backend)
                sync(device)
                start = time.perf_counter()
                model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                sync(device)
                if round_index:
                    times[label].append(time.perf_counter() - start)
                if handle is not None:
                    handle.remove()
    return {label: (sorted(t)[len(t) // 2], min(t)) for label, t in times.items()}


def first_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy generation of 2 tokens: the prefill's last logits, the first decoding step's logits, the tokens."""
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    prompt = batch["input_ids"].shape[1]
    return output.logits[0].float(), output.logits[1].float(), output.sequences[:, prompt:]


def check_decode_rows(model, batch: dict, chosen: dict) -> list[str]:
    """VAR's and GIFT's fused decode rows against their explicit ones, within twice the model's bf16 noise floor
    (SDPA vs eager attention, no intervention); raises `Disagreement` otherwise. Returns one line per method."""
    sdpa = first_logits(model, batch)
    model.set_attn_implementation("eager")
    try:
        eager = first_logits(model, batch)
    finally:
        model.set_attn_implementation("sdpa")
    noise = [max_abs_diff(a, b) for a, b in zip(sdpa[:2], eager[:2])]
    lines = []
    for name in FUSED_DECODE:
        results = {}
        for backend in ("auto", "torch"):
            with vlm.apply(model, chosen[name], backend=backend):
                results[backend] = first_logits(model, batch)
        fused, explicit = results["auto"], results["torch"]
        parts = []
        for index, label in enumerate(("prefill logits", "first decode-step logits")):
            if index == 1 and not torch.equal(fused[2][:, 0], explicit[2][:, 0]):
                parts.append(f"{label}: not compared (the prefills picked different tokens, a near-tie)")
                continue
            diff = max_abs_diff(fused[index], explicit[index])
            verdict = judge(f"{name} (fused vs explicit decode rows)", label, diff, noise[index], diff,
                            scale=explicit[index].abs().max().item(), peer_name="SDPA vs eager attention",
                            reference_name="the explicit decode rows")
            parts.append(f"{label} max abs diff {diff:.2e} (tolerance {verdict.tolerance:.2e})")
        lines.append(f"- {name}: " + "; ".join(parts) + ".")
        print(lines[-1], flush=True)
    return lines


def methods(size: str) -> dict:
    """The compared interventions; layer settings scale with depth (the LLaVA-1.5-7B presets at 32 layers)."""
    layers = SIZES[size][1]["num_hidden_layers"]
    if size == "full":
        var, gift = vlm.load_preset("llava-1.5-7b", "var"), vlm.load_preset("llava-1.5-7b", "gift")
    else:
        saliency = max(round(11 * layers / 32), 1)
        var = vlm.VAR(sink_dims=sink_dims(size), tau=4.0)  # planted sinks have phi >= 5.6 at these widths
        gift = vlm.GIFT(saliency_layers=(saliency,), enhance_layers=tuple(range(saliency + 1, round(23 * layers / 32))))
    llm_layers = (round(9 * layers / 32), round(18 * layers / 32))
    return {"none": None, "VAR": var, "GIFT": gift, "FastV K=2 R=0.75": vlm.FastV(k=2, ratio=0.75),
            "VFlowOpt keep 10%": vlm.VFlowOpt(keep=0.1, llm_layers=llm_layers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny config on the CPU (smoke test)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="prompts per batch of the batched-prefill table")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results file (default {RESULTS.name}, or {INTERLEAVED_RESULTS.name} with --interleaved; "
                             "a --quick run writes only where --out says)")
    parser.add_argument("--interleaved", action="store_true",
                        help="only the latency of none, VAR and GIFT (fused and explicit decode rows), in rounds")
    args = parser.parse_args()
    target = results_target(parser, args.out, INTERLEAVED_RESULTS if args.interleaved else RESULTS, not args.quick,
                            "--quick")
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    new_tokens, repeats = (8, 1) if args.quick else (args.new_tokens, args.repeats)
    size = "quick" if args.quick else "full"
    model = build(size, device, dtype)
    batch = inputs(device, dtype)
    check_lines = check_decode_rows(model, batch, methods(size))
    check_text = ["", ("Check, before timing: fused decode rows (`backend=\"auto\"`) against explicit ones "
                       "(`backend=\"torch\"`), max abs logit difference <= 2 x that of SDPA vs eager attention on the "
                       "unedited model + 1e-3 x max(1, max|logit|):"), *check_lines]
    provenance_line = f"Command: `{command_line()}`. Every row below comes from this one run."
    if args.interleaved:
        chosen = methods(size)
        plan = {"none": (None, "auto")}
        for name in FUSED_DECODE:
            plan[name] = (chosen[name], "auto")
            plan[f"{name}, explicit decode rows"] = (chosen[name], "torch")
        latency = interleaved_latency(model, batch, device, new_tokens, repeats, plan)
        base_median, base_least = latency["none"]
        title = (f"Total latency of greedy generation ({new_tokens} new tokens) in {repeats} interleaved rounds; "
                 f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}.")
        lines = ["# LVLM interventions: latency in interleaved rounds", "", title, "", provenance_line, "",
                 "| method | median ms | x none | least ms | x none |", "|---|---:|---:|---:|---:|"]
        for label, (median, least) in latency.items():
            lines.append(f"| {label} | {median * 1e3:.0f} | {median / base_median:.2f} | {least * 1e3:.0f} | "
                         f"{least / base_least:.2f} |")
        write(lines + check_text, target)
        return
    rows, batched = {}, {}
    prompts = inputs(device, dtype, args.batch)
    for name, intervention in methods(size).items():
        if intervention is None:
            rows[name] = measure(model, batch, device, new_tokens, repeats)
            batched[name] = measure(model, prompts, device, 1, repeats)
            continue
        # VAR and GIFT also once with their decode rows on the explicit path, to show what the fused kernel saves
        for backend in ("auto", "torch") if name in FUSED_DECODE else ("auto",):
            label = name if backend == "auto" else f"{name}, explicit decode rows"
            with vlm.apply(model, intervention, backend=backend):
                rows[label] = measure(model, batch, device, new_tokens, repeats)
                if name not in FUSED_DECODE:
                    batched[label] = measure(model, prompts, device, 1, repeats)
            print(label, {k: round(v, 2) for k, v in rows[label].items()}, flush=True)
    base = rows["none"]
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    import transformers

    lines = [
        "# LVLM interventions: overhead and pruning speed-up",
        "",
        (
            f"LLaVA-1.5-7B-shaped random model ({'tiny --quick config' if args.quick else 'full size'}), {dtype}, "
            f"{batch['input_ids'].shape[1]}-token prompt with 576 image tokens, greedy, {new_tokens} new tokens, "
            f"median of {repeats}. Device {device_name}; torch {torch.__version__}, triton {triton_version}, "
            f"transformers {transformers.__version__}. Ratios are to `none` (plain greedy, SDPA) in the same process."
        ),
        "",
        provenance_line,
        "",
        (
            "| method | prefill ms | x none | prefill GPU kernels ms | x none | decode tok/s | total latency x none "
            "| KV cache MiB | KV x none | prompt KV x none | image-token KV x none |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['prefill_ms']:.1f} | {row['prefill_ms'] / base['prefill_ms']:.2f} | "
            f"{row['prefill_kernel_ms']:.1f} | {row['prefill_kernel_ms'] / base['prefill_kernel_ms']:.2f} | "
            f"{row['decode_tok_s']:.1f} | {row['total_ms'] / base['total_ms']:.2f} | {row['kv_mib']:.1f} | "
            f"{row['kv_mib'] / base['kv_mib']:.2f} | {row['prompt_kv_mib'] / base['prompt_kv_mib']:.2f} | "
            f"{row['image_kv_mib'] / base['image_kv_mib']:.2f} |"
        )
    prompt = batch["input_ids"].shape[1]
    goals = (
        "Goals: VAR total latency <= 1.2x, GIFT <= 1.15x; pruning 90 % of visual tokens: prefill >= 3x "
        f"faster (x none <= 0.33), KV cache >= 85 % smaller (KV x none <= 0.15). The KV cache after {new_tokens} new "
        f"tokens holds every text and generated token in every layer: with all 576 image tokens gone it would still be "
        f"({prompt - 576} + {new_tokens}) / ({prompt} + {new_tokens}) = {(prompt - 576 + new_tokens) / (prompt + new_tokens):.2f} "
        "of none's; the image-token KV is the part pruning removes (VFlowOpt reports -89 %)."
    )
    batched_title = (f"Prefill of a batch of {args.batch} copies of the prompt (pruning only; the single prompt's "
                     "prefill is bound by host time, not by the tokens pruning removes):")
    lines += ["", goals, "", batched_title, "",
              "| method | prefill ms | x none | prefill GPU kernels ms | x none |", "|---|---:|---:|---:|---:|"]
    for name, row in batched.items():
        lines.append(f"| {name} | {row['prefill_ms']:.1f} | {row['prefill_ms'] / batched['none']['prefill_ms']:.2f} | "
                     f"{row['prefill_kernel_ms']:.1f} | "
                     f"{row['prefill_kernel_ms'] / batched['none']['prefill_kernel_ms']:.2f} |")
    write(lines + check_text, target)


def write(lines: list[str], target: Path | None) -> None:
    print("\n".join(lines), flush=True)
    if target is None:
        print("(not written: a --quick run writes only where --out says)")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
