import pytest
import torch

from mmattn.kernels import reference

from .helpers import dense_oracle, random_mask, random_qkv


@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (17, 129), (129, 17), (200, 200)])
def test_reference_matches_the_dense_oracle(q_len, kv_len):
    mask = random_mask(2, 4, q_len, kv_len, (32, 16))
    q, k, v = random_qkv(2, 4, 2, q_len, kv_len, 16, torch.float64)
    out, lse = reference.block_sparse_attention(q, k, v, mask, 0.3)
    want_out, want_lse = dense_oracle(q, k, v, mask, 0.3)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)


def test_reference_chunks_bound_memory_without_changing_results(monkeypatch):
    mask = random_mask(1, 2, 300, 100, (32, 32))
    q, k, v = random_qkv(1, 2, 2, 300, 100, 8, torch.float64)
    whole, _ = reference.block_sparse_attention(q, k, v, mask, 0.5)
    monkeypatch.setattr(reference, "_SCORE_BUDGET", 2 * 100 * 40)
    calls = []
    original = reference.masked_attention
    monkeypatch.setattr(reference, "masked_attention", lambda *a: calls.append(a[0].shape[2]) or original(*a))
    chunked, _ = reference.block_sparse_attention(q, k, v, mask, 0.5)
    assert max(calls) <= 32 and len(calls) == 10
    torch.testing.assert_close(chunked, whole)


def test_empty_rows_give_zero_output_minus_inf_lse_and_zero_gradients():
    mask = random_mask(1, 2, 64, 64, (32, 32), density=1.0)
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 2, 64, 64, 8, torch.float64))
    out, lse = reference.block_sparse_attention(q, k, v, mask, 1.0)
    assert torch.all(out[:, :, :32] == 0) and torch.all(lse[:, :, :32] == float("-inf"))
    (out.sum() + lse[:, :, 32:].sum()).backward()
    assert torch.all(q.grad[:, :, :32] == 0)
    assert not any(t.grad.isnan().any() for t in (q, k, v))


def test_half_precision_is_computed_in_float32():
    mask = random_mask(1, 1, 40, 40, (16, 16))
    q, k, v = random_qkv(1, 1, 1, 40, 40, 16, torch.float16)
    out, lse = reference.block_sparse_attention(q, k, v, mask, 0.25)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    want, _ = dense_oracle(q, k, v, mask, 0.25)
    torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=0)
