import pytest
import torch

from mmattn.kernels import Neighborhood, reference

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


REFERENCES = {  # family -> the reference on (q, k, v) of 256 tokens
    "block_sparse": lambda q, k, v: reference.block_sparse_attention(q, k, v, random_mask(1, 2, 256, 256, (16, 16)), 0.3),
    "neighborhood": lambda q, k, v: reference.neighborhood_attention(q, k, v, Neighborhood.create((16, 16), 5), None, 0.3),
    "routed": lambda q, k, v: reference.routed_attention(
        q, k, v, torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)).topk(2).indices, None, 16, 16, 0.3),
}


@pytest.mark.parametrize("family", REFERENCES)
def test_training_memory_stays_within_the_chunk_budget(monkeypatch, family):
    """Autograd saves no chunk's scores (each chunk is recomputed in the backward), so training memory does not grow
    with Lq x Lk (the routed reference of a BiFormer test with 1369-token regions ran an H200 out of memory)."""
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 2, 256, 256, 8, torch.float64))
    whole = torch.autograd.grad(REFERENCES[family](q, k, v)[0].square().sum(), (q, k, v))
    budget = 4096
    monkeypatch.setattr(reference, "_SCORE_BUDGET", budget)
    saved = {}  # storage -> bytes, for tensors autograd keeps beyond the inputs

    def pack(t):
        storage = t.untyped_storage()
        if all(storage.data_ptr() != x.untyped_storage().data_ptr() for x in (q, k, v)):
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = REFERENCES[family](q, k, v)
    assert sum(saved.values()) <= budget * 8, f"{sum(saved.values())} bytes saved for the backward"
    for a, b in zip(torch.autograd.grad(out.square().sum(), (q, k, v)), whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
