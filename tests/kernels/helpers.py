"""Shared builders for the kernel tests: random inputs, an independent dense oracle and the block-sparse accuracy
check."""

import math

import torch

from mmattn.kernels import BlockSparseMask, block_sparse_attention


def random_mask(batch, heads, q_len, kv_len, block_size, density=0.6, seed=0, empty_row=True):
    q_block, kv_block = block_size
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand((batch, heads, math.ceil(q_len / q_block), math.ceil(kv_len / kv_block)), generator=g) < density
    blocks[..., -1, -1] = True  # the partial corner block is always exercised
    if empty_row and blocks.shape[-2] > 1:
        blocks[..., 0, :] = False  # a query block with no key at all
    return BlockSparseMask.from_dense(blocks, block_size, q_len, kv_len)


def random_qkv(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, seed=0, layout="bhld"):
    """Random q, k, v; layout "blhd" gives non-contiguous (B, H, L, D) views of (B, L, H, D) storage."""
    g = torch.Generator().manual_seed(seed)

    def make(h, length):
        if layout == "blhd":
            return torch.randn(batch, length, h, head_dim, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(batch, h, length, head_dim, generator=g).to(dtype)

    return make(heads, q_len), make(kv_heads, kv_len), make(kv_heads, kv_len)


def dense_oracle(q, k, v, mask: BlockSparseMask, scale):
    """Float64 attention over the token mask expanded in one piece: independent of the chunked reference."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    allowed = mask.to_dense().repeat_interleave(mask.block_size[0], -2).repeat_interleave(mask.block_size[1], -1)
    allowed = allowed[..., : q.shape[2], : k.shape[2]]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - lse.unsqueeze(-1).clamp_min(-1e300)).nan_to_num(0.0)
    return weights @ v, lse


ATOL = {torch.float16: 2e-3, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def assert_flash_criterion(ours, naive, exact, dtype) -> None:
    """FlashAttention's accuracy criterion (specs/kernels.md section 8) on [out, lse, dq, dk, dv]: no NaN, the -inf
    pattern of the float64 `exact`, and an error against it at most twice the `naive` same-dtype error plus ATOL."""
    for name, a, n, e in zip(("out", "lse", "dq", "dk", "dv"), ours, naive, exact):
        assert not a.isnan().any(), f"{name} has NaN"
        finite = torch.isfinite(e)
        assert torch.equal(torch.isfinite(a), finite), f"{name}: -inf pattern differs"
        err = (a.double() - e)[finite].abs().max().item() if finite.any() else 0.0
        naive_err = (n.double() - e)[finite].abs().max().item() if finite.any() else 0.0
        assert err <= 2 * naive_err + ATOL[dtype], f"{name}: error {err:.3g} vs naive {naive_err:.3g}"


def block_sparse_run(q, k, v, mask, backend, grad_out=None, grad_lse=None):
    """Output, lse and the gradients of q, k, v for a fixed upstream gradient."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = block_sparse_attention(q, k, v, mask, backend=backend, return_lse=True)
    loss = (out.float() * grad_out).sum()
    if grad_lse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0) * grad_lse).sum()
    loss.backward()
    return [out, lse, q.grad, k.grad, v.grad]


def check_against_reference(q, k, v, mask, with_lse_grad=False):
    """`block_sparse_attention(backend="triton")` against the reference to the FlashAttention criterion."""
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(q.shape, generator=g)
    grad_lse = torch.randn(q.shape[:3], generator=g) if with_lse_grad else None
    ours = block_sparse_run(q, k, v, mask, "triton", grad_out, grad_lse)
    naive = block_sparse_run(q, k, v, mask, "torch", grad_out, grad_lse)
    exact = block_sparse_run(q.double(), k.double(), v.double(), mask, "torch", grad_out.double(),
                             None if grad_lse is None else grad_lse.double())
    assert_flash_criterion(ours, naive, exact, q.dtype)
