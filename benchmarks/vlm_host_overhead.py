"""CPU proxy of the VLM benchmark's host overhead: per intervention, prefill and per-decode-step time, the aten ops
launched and the host-device syncs (ops that read a tensor's value on the host) per step, and the KV-cache size.

HF eager decoding of a 7B model on a GPU is host-bound, so every extra op and every sync shows up in latency; this
script counts them on the CPU with a reduced LLaVA-shaped random model (benchmarks/vlm.py SIZES["proxy"]: 576 image
tokens, 651-token prompt, float32). Its numbers are for comparing versions of mmattn, not results tables.

    python benchmarks/vlm_host_overhead.py [--new-tokens 16] [--repeats 3] [--profile VAR]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from vlm import SIZES, build, generated_cache, inputs, kv_bytes, methods, pruning_methods

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


def fastest(fn, repeats: int) -> float:
    """Least CPU seconds of `repeats` calls after one warm-up (the CPU may be shared: process time, minimum)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def measure(model, batch: dict, new_tokens: int, repeats: int) -> dict:
    with torch.no_grad():
        prefill_s = fastest(lambda: generate(model, batch, 1), repeats)
        total_s = fastest(lambda: generate(model, batch, new_tokens), repeats)
        prompt_cache = generated_cache(generate(model, batch, 1))
        cache = generated_cache(generate(model, batch, new_tokens))
    one, many = counted(model, batch, 1), counted(model, batch, new_tokens)
    steps = new_tokens - 1
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=("proxy", "host"), default="proxy", help="a reduced model of vlm.SIZES")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="method names to run (default: all)")
    parser.add_argument("--profile", help="cProfile one generate call of this method and print the hot spots")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps timings steadier)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.size, "cpu", torch.float32)
    batch = inputs("cpu", torch.float32)
    rows = {}
    layers = SIZES[args.size][1]["num_hidden_layers"]
    pruning = {label: row.intervention for label, row in pruning_methods("llava-1.5-7b", layers, 576).items()}
    for name, intervention in {**methods(args.size), **pruning}.items():
        if args.only and name not in args.only and name != "none":
            continue
        handle = None if intervention is None else vlm.apply(model, intervention)
        try:
            if name == args.profile:
                with torch.no_grad(), cProfile.Profile() as profile:
                    generate(model, batch, args.new_tokens)
                pstats.Stats(profile).sort_stats("tottime").print_stats(25)
            rows[name] = measure(model, batch, args.new_tokens, args.repeats)
        finally:
            if handle is not None:
                handle.remove()
        print(name, rows[name].pop("top_step_ops"), flush=True)
    base = rows["none"]
    print(f"\nmodel vlm.SIZES[{args.size!r}], prompt {batch['input_ids'].shape[1]} tokens, "
          f"{args.new_tokens} new tokens, best of {args.repeats}, {torch.get_num_threads()} threads\n")
    print("| method | prefill ms | x none | step ms | x none | ops/step | syncs/step | prefill ops | prefill syncs "
          "| prompt KV x none | KV x none |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['prefill_ms']:.1f} | {row['prefill_ms'] / base['prefill_ms']:.2f} | "
              f"{row['step_ms']:.2f} | {row['step_ms'] / base['step_ms']:.2f} | {row['step_ops']:.0f} | "
              f"{row['step_syncs']:.1f} | {row['prefill_ops']} | {row['prefill_syncs']} | "
              f"{row['prompt_kv'] / base['prompt_kv']:.3f} | {row['kv'] / base['kv']:.3f} |")


if __name__ == "__main__":
    main()
