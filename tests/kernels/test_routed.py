"""Routed attention (BiFormer BRA's token level): the Triton kernel (interpreter on the CPU, compiled on a GPU) and
the gather path against the float64 dense reference that masks every non-routed region.

Accuracy follows specs/kernels.md section 8: the kernel's error against float64 is at most twice the error of the
naive computation on the same low-precision inputs, plus a small slack, for the output, the lse and all gradients.
"""

import pytest
import torch

from mmattn.kernels import backend_info, reference, routed_attention
from mmattn.kernels.triton.routed import transpose_routing

from .helpers import assert_flash_criterion, random_qkv

needs_interpreter = pytest.mark.skipif(
    not backend_info("cpu")["triton"][0], reason="the Triton interpreter runs only with TRITON_INTERPRET=1"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_routing(batch, heads, n_q_regions, n_kv_regions, topk, seed=0):
    """Distinct routed key regions per query region, like torch.topk of the region affinity graph."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, heads, n_q_regions, n_kv_regions, generator=g)
    return scores.topk(topk, dim=-1).indices


def run(q, k, v, indices, backend, grad_out, grad_lse=None, **kw):
    """Output, lse and the gradients of q, k, v for fixed upstream gradients."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if backend == "reference":
        kv_valid = kw.get("kv_valid")
        q_region = kw["q_region_size"]
        out, lse = reference.routed_attention(
            q, k, v, indices if indices.dim() == 4 else indices[:, None], None if kv_valid is None else
            kv_valid.view(-1, k.shape[2]), q_region, kw.get("kv_region_size") or q_region, q.shape[-1] ** -0.5)
    else:
        out, lse = routed_attention(q, k, v, indices, backend=backend, return_lse=True, **kw)
    loss = (out.double() * grad_out).sum()
    if grad_lse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0).double() * grad_lse).sum()
    loss.backward()
    return [out, lse, q.grad, k.grad, v.grad]


def check(q, k, v, indices, backend="triton", with_lse_grad=False, **kw):
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(q.shape, generator=g, dtype=torch.float64).to(q.device)
    grad_lse = torch.randn(q.shape[:3], generator=g, dtype=torch.float64).to(q.device) if with_lse_grad else None
    ours = run(q, k, v, indices, backend, grad_out, grad_lse, **kw)
    naive = run(q, k, v, indices, "reference", grad_out, grad_lse, **kw)
    exact = run(q.double(), k.double(), v.double(), indices, "reference", grad_out, grad_lse, **kw)
    assert_flash_criterion(ours, naive, exact, q.dtype)
    return ours


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("region, topk", [(4, 3), (16, 2), (20, 1), (9, 4)])
def test_triton_matches_reference_for_any_region_size(dtype, region, topk):
    n_regions = 6
    q, k, v = random_qkv(2, 2, 2, n_regions * region, n_regions * region, 32, dtype, seed=region)
    check(q, k, v, random_routing(2, 1, n_regions, n_regions, topk, seed=region)[:, 0], q_region_size=region)


@needs_interpreter
def test_triton_gqa_per_head_routing_padding_and_lse_gradient():
    q, k, v = random_qkv(1, 4, 2, 5 * 8, 7 * 4, 16, torch.float32, seed=3, layout="blhd")
    assert not q.is_contiguous()
    kv_valid = torch.rand(1, 28, generator=torch.Generator().manual_seed(1)) > 0.3
    check(q, k, v, random_routing(1, 4, 5, 7, 3, seed=4), with_lse_grad=True, q_region_size=8, kv_region_size=4,
          kv_valid=kv_valid)


@needs_interpreter
def test_triton_rows_without_valid_keys_are_zero_without_nan():
    q, k, v = random_qkv(1, 2, 2, 4 * 4, 4 * 4, 16, torch.float32, seed=5)
    kv_valid = torch.ones(16, dtype=torch.bool)
    kv_valid[:4] = False  # key region 0 is pure padding
    indices = torch.tensor([[[0], [1], [0], [2]]])
    out, lse, _dq, dk, _dv = check(q, k, v, indices, q_region_size=4, kv_valid=kv_valid)
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4])) and torch.isinf(lse[:, :, :4]).all()
    assert torch.equal(dk[:, :, :4], torch.zeros_like(dk[:, :, :4]))


@needs_interpreter
def test_triton_skips_out_of_range_indices_while_torch_rejects_them():
    q, k, v = random_qkv(1, 1, 1, 3 * 16, 3 * 16, 16, torch.float32, seed=6)
    indices = torch.tensor([[[0, 5], [1, -1], [2, 0]]])
    check(q, k, v, indices, q_region_size=16)
    with pytest.raises(ValueError, match="region_indices must lie in"):
        routed_attention(q, k, v, indices, q_region_size=16, backend="torch")


@pytest.mark.parametrize("region, kv_region, topk", [(4, 4, 2), (6, 3, 3)])
def test_gather_path_is_exact(region, kv_region, topk):
    q, k, v = random_qkv(2, 4, 2, 5 * region, 6 * kv_region, 8, torch.float64, seed=topk)
    kv_valid = torch.rand(2, 6 * kv_region, generator=torch.Generator().manual_seed(2)) > 0.25
    indices = random_routing(2, 4, 5, 6, topk, seed=region)
    kw = {"q_region_size": region, "kv_region_size": kv_region, "kv_valid": kv_valid}
    ours = run(q, k, v, indices, "torch", torch.ones(q.shape, dtype=torch.float64), **kw)
    exact = run(q, k, v, indices, "reference", torch.ones(q.shape, dtype=torch.float64), **kw)
    for a, e in zip(ours, exact):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_transpose_routing_lists_the_query_regions_of_each_key_region():
    indices = random_routing(2, 3, 6, 5, 2, seed=9)
    starts, counts, query_regions = transpose_routing(indices, 5)
    for b in range(2):
        for h in range(3):
            for kv in range(5):
                listed = query_regions[b, h, starts[b, h, kv]: starts[b, h, kv] + counts[b, h, kv]].tolist()
                expected = [r for r in range(6) if kv in indices[b, h, r].tolist()]
                assert listed == expected


@pytest.mark.parametrize("kwargs, error, match", [
    ({"q_region_size": 5}, ValueError, "q_region_size=5 must divide"),
    ({"q_region_size": 0}, ValueError, "q_region_size must be a positive int"),
    ({"q_region_size": 4, "kv_region_size": 3}, ValueError, "kv_region_size=3"),
    ({"q_region_size": 4, "backend": "flex"}, ValueError, "backend must be one of"),
    ({"q_region_size": 4, "kv_valid": torch.ones(16)}, TypeError, "kv_valid must be a bool tensor"),
    ({"q_region_size": 4, "kv_valid": torch.ones(1, 15, dtype=torch.bool)}, ValueError, "kv_valid: expected"),
])
def test_bad_arguments_name_themselves(kwargs, error, match):
    q, k, v = random_qkv(1, 2, 2, 16, 16, 16, torch.float32)
    with pytest.raises(error, match=match):
        routed_attention(q, k, v, torch.zeros(1, 4, 1, dtype=torch.long), **kwargs)


def test_bad_index_shapes_and_dtypes():
    q, k, v = random_qkv(1, 2, 2, 16, 16, 16, torch.float32)
    with pytest.raises(TypeError, match="region_indices must be an integer tensor"):
        routed_attention(q, k, v, torch.zeros(1, 4, 1), q_region_size=4)
    with pytest.raises(ValueError, match="region_indices: expected"):
        routed_attention(q, k, v, torch.zeros(1, 3, 1, dtype=torch.long), q_region_size=4)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("region, topk, n_regions", [(64, 1, 49), (16, 4, 49), (4, 16, 49), (37 * 37, 1, 49)])
def test_gpu_biformer_shapes(dtype, region, topk, n_regions):
    q, k, v = (t.cuda() for t in random_qkv(2, 2, 2, n_regions * region, n_regions * region, 32, dtype, seed=topk))
    kv_valid = (torch.rand(2, n_regions * region) > 0.1).cuda()
    check(q, k, v, random_routing(2, 1, n_regions, n_regions, topk)[:, 0].cuda(), q_region_size=region,
          kv_valid=kv_valid)


@needs_cuda
def test_gpu_compiles_in_a_full_graph():
    q, k, v = (t.cuda() for t in random_qkv(2, 2, 2, 49 * 16, 49 * 16, 32, torch.bfloat16))
    indices = random_routing(2, 1, 49, 49, 4)[:, 0].cuda()
    compiled = torch.compile(lambda *a: routed_attention(*a, q_region_size=16), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, indices), routed_attention(q, k, v, indices, q_region_size=16))
