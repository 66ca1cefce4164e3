"""Where the VLM benchmark's decoding time goes: per intervention, prefill and per-decode-step time, the aten ops
launched and the host-device syncs (ops that read a tensor's value on the host) per step, the KV-cache size and,
on a GPU, the kernel time and kernel count per step beside the wall time (host time vs kernel time).

HF eager decoding of a 7B model on a GPU is host-bound, so every extra op and every sync shows up in latency. On the
CPU (the default) the script counts them with a reduced LLaVA-shaped random model (benchmarks/vlm.py SIZES["proxy"]:
576 image tokens, 651-token prompt, float32), whose numbers are for comparing versions of mmattn, not results
tables; with `--device cuda --size full` it profiles the benchmark's own LLaVA-1.5-7B-shaped model in bfloat16 with
the fused kernels the interventions run there: a step whose kernel time is far below its wall time is host-bound.
Every wall time is taken before the first torch.profiler session: after one, each launch of the process is slower
(plain decoding 25.2 -> 30.0 ms per step, GIFT's 26.1 -> 55.5 on an H100), which would bias the later rows.

    python benchmarks/vlm_host_overhead.py [--new-tokens 16] [--repeats 3] [--profile VAR]
    python benchmarks/vlm_host_overhead.py --device cuda --size full --only VAR GIFT --profile GIFT
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import time
from collections import Counter

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from vlm import SIZES, build, generated_cache, inputs, kv_bytes, methods, pruning_methods, sync

from mmattn import vlm

#: aten ops whose result the host must wait for on a GPU (item/bool/int, nonzero and its users, unique).
SYNC_OPS = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "masked_scatter", "repeat_interleave")
VIEW_OPS = ("view", "_unsafe_view", "expand", "slice", "select", "transpose", "t", "unsqueeze", "squeeze", "alias",
            "permute", "as_strided", "detach", "split", "unbind")


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched (views apart) and those that sync the host, plus Tensor.tolist calls."""

    def __init__(self) -> None:
        super().__init__()
        self.ops, self.syncs = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        self.syncs += name in SYNC_OPS or bool_index
        if name not in VIEW_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(tensor):
            counter.syncs += 1
            return counter._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def generate(model, batch: dict, new_tokens: int):
    return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          return_dict_in_generate=True)


def counted(model, batch: dict, new_tokens: int) -> OpCounter:
    with torch.no_grad(), OpCounter() as counter:
        generate(model, batch, new_tokens)
    return counter


def fastest(fn, repeats: int, device: str) -> float:
    """Least seconds of `repeats` calls after one warm-up: CPU seconds on the CPU (which may be shared), wall seconds
    up to the end of the GPU's work on CUDA."""
    fn()
    clock = time.process_time if device == "cpu" else time.perf_counter
    times = []
    for _ in range(repeats):
        sync(device)
        start = clock()
        fn()
        sync(device)
        times.append(clock() - start)
    return min(times)


def kernels(fn) -> tuple[float, int]:
    """(milliseconds, count) of the CUDA kernels (and copies) that one call of `fn` ran, from torch.profiler."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        fn()
        torch.cuda.synchronize()
    device_events = [event for event in profiler.key_averages() if event.device_type == DeviceType.CUDA]
    return sum(event.self_device_time_total for event in device_events) / 1e3, sum(e.count for e in device_events)


def measure(model, batch: dict, new_tokens: int, repeats: int, device: str) -> dict:
    steps = new_tokens - 1
    with torch.no_grad():
        prefill_s = fastest(lambda: generate(model, batch, 1), repeats, device)
        total_s = fastest(lambda: generate(model, batch, new_tokens), repeats, device)
        prompt_cache = generated_cache(generate(model, batch, 1))
        cache = generated_cache(generate(model, batch, new_tokens))
    one, many = counted(model, batch, 1), counted(model, batch, new_tokens)
    return {
        "prefill_ms": prefill_s * 1e3,
        "step_ms": (total_s - prefill_s) / steps * 1e3,
        "prefill_ops": sum(one.ops.values()),
        "step_ops": (sum(many.ops.values()) - sum(one.ops.values())) / steps,
        "prefill_syncs": one.syncs,
        "step_syncs": (many.syncs - one.syncs) / steps,
        "prompt_kv": kv_bytes(prompt_cache),
        "kv": kv_bytes(cache),
        "top_step_ops": (many.ops - one.ops).most_common(8),
    }


def measure_kernels(model, batch: dict, new_tokens: int) -> dict:
    """The prefill's kernel time, and the kernel time and count per decoding step (CUDA)."""
    with torch.no_grad():
        prefill_ms, prefill_kernels = kernels(lambda: generate(model, batch, 1))
        total_ms, total_kernels = kernels(lambda: generate(model, batch, new_tokens))
    steps = new_tokens - 1
    return {"prefill_kernel_ms": prefill_ms, "step_kernel_ms": (total_ms - prefill_ms) / steps,
            "step_kernels": (total_kernels - prefill_kernels) / steps}


@contextlib.contextmanager
def applied(model, intervention):
    """`model` with `intervention` applied (none: as it is) within the block."""
    handle = None if intervention is None else vlm.apply(model, intervention)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=tuple(SIZES), default="proxy", help="a model of vlm.SIZES")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: bfloat16, wall time and the kernel time per step")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="method names to run (default: all)")
    parser.add_argument("--profile", help="cProfile one warm generate call of this method and print the hot spots")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps timings steadier)")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error(f"--new-tokens: expected at least 2 (one decoding step), got {args.new_tokens}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device: cuda asked for, but torch sees no CUDA GPU here")
    torch.set_num_threads(args.threads)
    device, dtype = args.device, torch.float32 if args.device == "cpu" else torch.bfloat16
    model = build(args.size, device, dtype)
    batch = inputs(device, dtype)
    layers = SIZES[args.size][1]["num_hidden_layers"]
    pruning = {label: row.intervention for label, row in pruning_methods("llava-1.5-7b", layers, 576).items()}
    chosen = {name: intervention for name, intervention in {**methods(args.size), **pruning}.items()
              if not args.only or name in args.only or name == "none"}
    rows = {}
    for name, intervention in chosen.items():
        with applied(model, intervention):
            if name == args.profile:
                generate(model, batch, args.new_tokens)  # warm: kernels compiled, caches filled
                with torch.no_grad(), cProfile.Profile() as profiler:
                    generate(model, batch, args.new_tokens)
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
                pstats.Stats(profiler).sort_stats("cumtime").print_stats("mmattn|triton", 25)
            rows[name] = measure(model, batch, args.new_tokens, args.repeats, device)
        print(name, rows[name].pop("top_step_ops"), flush=True)
    if device == "cuda":  # after every wall time: a torch.profiler session slows every later launch of the process
        for name, intervention in chosen.items():
            with applied(model, intervention):
                rows[name].update(measure_kernels(model, batch, args.new_tokens))
    print_table(rows, args, batch, device)


def print_table(rows: dict[str, dict], args, batch: dict, device: str) -> None:
    base = rows["none"]
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nmodel vlm.SIZES[{args.size!r}], {where}, prompt {batch['input_ids'].shape[1]} tokens, "
          f"{args.new_tokens} new tokens, best of {args.repeats}\n")
    kernel_columns = device == "cuda"
    kernel_titles = " prefill kernel ms | kernel ms/step | kernels/step |" if kernel_columns else ""
    print("| method | prefill ms | x none | step ms | x none | ops/step | syncs/step | prefill ops | prefill syncs "
          "| prompt KV x none | KV x none |" + kernel_titles)
    print("|---|" + "---:|" * (10 + 3 * kernel_columns))
    for name, row in rows.items():
        kernel_cells = (f" {row['prefill_kernel_ms']:.1f} | {row['step_kernel_ms']:.2f} | {row['step_kernels']:.0f} |"
                        if kernel_columns else "")
        print(f"| {name} | {row['prefill_ms']:.1f} | {row['prefill_ms'] / base['prefill_ms']:.2f} | "
              f"{row['step_ms']:.2f} | {row['step_ms'] / base['step_ms']:.2f} | {row['step_ops']:.0f} | "
              f"{row['step_syncs']:.1f} | {row['prefill_ops']} | {row['prefill_syncs']} | "
              f"{row['prompt_kv'] / base['prompt_kv']:.3f} | {row['kv'] / base['kv']:.3f} |{kernel_cells}")


if __name__ == "__main__":
    main()
