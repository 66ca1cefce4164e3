"""Diagnostic: host-side cost of one block_sparse_attention call vs its GPU time (CUDA graph replay)."""
import sys
import time
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import band_blocks  # noqa: E402

from mmattn.kernels import BlockSparseMask, block_sparse_attention  # noqa: E402
from mmattn.kernels.ops import block_sparse_fwd  # noqa: E402

B, H, L, D = 1, 12, 16384, 64
q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
mask = BlockSparseMask.from_dense(band_blocks(H, L // 128, 0.05), 128, L, L).to("cuda")
public = lambda: block_sparse_attention(q, k, v, mask, backend="triton")  # noqa: E731
op = lambda: block_sparse_fwd(q, k, v, mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices, 128, 128, 0.125)  # noqa: E731
qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
public_grad = lambda: block_sparse_attention(qg, kg, vg, mask, backend="triton")  # noqa: E731
op_grad = lambda: block_sparse_fwd(qg, kg, vg, mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices, 128, 128, 0.125)  # noqa: E731
for fn, name in ((public, "public"), (op, "op"), (public_grad, "public, requires grad"), (op_grad, "op, requires grad")):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(200):
        fn()
    cpu = (time.perf_counter() - t) / 200 * 1e3
    torch.cuda.synchronize()
    print(f"{name}: host {cpu:.3f} ms/call, wall {(time.perf_counter() - t) / 200 * 1e3:.3f} ms/call")
import cProfile  # noqa: E402
import pstats  # noqa: E402

profiler = cProfile.Profile()
profiler.enable()
for _ in range(200):
    public()
profiler.disable()
torch.cuda.synchronize()
pstats.Stats(profiler).sort_stats("tottime").print_stats(14)
profiler = cProfile.Profile()
grad = torch.randn_like(q)
qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
for _ in range(3):
    block_sparse_attention(qg, kg, vg, mask, backend="triton").backward(grad)
torch.cuda.synchronize()
start = time.perf_counter()
profiler.enable()
for _ in range(100):
    block_sparse_attention(qg, kg, vg, mask, backend="triton").backward(grad)
profiler.disable()
print("fwd+bwd host ms/call (profiled)", (time.perf_counter() - start) * 10)
pstats.Stats(profiler).sort_stats("tottime").print_stats(16)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    public()
print("graph replay ms", triton.testing.do_bench(graph.replay, return_mode="median"))
print("do_bench ms", triton.testing.do_bench(public, return_mode="median"))
grad = torch.randn_like(q)
for name, step in (("public", lambda: public_grad().backward(grad)), ("op", lambda: op_grad()[0].backward(grad))):
    print(f"fwd+bwd {name} do_bench ms", triton.testing.do_bench(step, grad_to_none=[qg, kg, vg], return_mode="median"))
for _ in range(3):
    block_sparse_attention(qg, kg, vg, mask, backend="triton").sum().backward()  # autotune outside the profile
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        block_sparse_attention(qg, kg, vg, mask, backend="triton").sum().backward()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))
