import warnings

import pytest
import torch

from mmattn.kernels import backend_info, block_sparse_attention
from mmattn.kernels.flex import tile_options

from .helpers import dense_oracle, random_mask, random_qkv


def test_auto_runs_the_reference_on_the_cpu():
    mask = random_mask(1, 2, 50, 60, (16, 32))
    q, k, v = random_qkv(1, 2, 1, 50, 60, 16, torch.float64)
    out = block_sparse_attention(q, k, v, mask, scale=0.2)
    torch.testing.assert_close(out, dense_oracle(q, k, v, mask, 0.2)[0])


def test_default_scale_is_inverse_sqrt_head_dim():
    mask = random_mask(1, 1, 32, 32, (16, 16))
    q, k, v = random_qkv(1, 1, 1, 32, 32, 16, torch.float64)
    torch.testing.assert_close(block_sparse_attention(q, k, v, mask), block_sparse_attention(q, k, v, mask, scale=0.25))


def test_flex_backend_equals_the_reference():
    mask = random_mask(2, 4, 70, 90, (32, 16), seed=1)
    q, k, v = random_qkv(2, 4, 2, 70, 90, 16, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FlexAttention warns that eager mode is unfused
        out, lse = block_sparse_attention(q, k, v, mask, backend="flex", return_lse=True)
    want_out, want_lse = dense_oracle(q, k, v, mask, 0.25)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))


@pytest.mark.parametrize("block_size", [(64, 64), (64, 384), (32, 16), (128, 64), (128, 128), (256, 384)])
def test_flex_tiles_divide_blocks_under_128(block_size):
    """Compiled FlexAttention on torch 2.11 refuses a block its 128-token tiles do not divide (the Wan2.2-TI2V-5B
    preset's 64-token blocks on the H200): every tile must divide both block sizes, and the backward's pairs each
    other (BLOCK_N1 % BLOCK_M1 == BLOCK_M2 % BLOCK_N2 == 0)."""
    options = tile_options(block_size)
    if min(block_size) >= 128:
        assert options is None
        return
    q_block, kv_block = block_size
    for name in ("BLOCK_M", "BLOCK_M1", "BLOCK_M2"):
        assert q_block % options[name] == 0, name
    for name in ("BLOCK_N", "BLOCK_N1", "BLOCK_N2"):
        assert kv_block % options[name] == 0, name
    assert options["BLOCK_N1"] % options["BLOCK_M1"] == 0 and options["BLOCK_M2"] % options["BLOCK_N2"] == 0


def test_compiles_fullgraph_with_autograd():
    mask = random_mask(1, 2, 64, 48, (32, 16), seed=4)
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 2, 64, 48, 16, torch.float64))

    def attend(q, k, v):
        return block_sparse_attention(q, k, v, mask).square().sum()

    torch._dynamo.reset()
    loss = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    want = attend(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v))
    torch.testing.assert_close(loss, want)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp)


def test_backend_info_lists_every_backend_with_a_reason():
    info = backend_info("cpu")
    assert list(info) == ["fa4", "triton", "flex", "torch"]
    assert not info["fa4"][0] and "Hopper/Blackwell GPU" in info["fa4"][1]
    assert info["torch"][0] and all(isinstance(reason, str) and reason for _, reason in info.values())


def _inputs(**change):
    mask = random_mask(1, 2, 32, 32, (16, 16))
    q, k, v = random_qkv(1, 2, 2, 32, 32, 16, torch.float32)
    args = {"q": q, "k": k, "v": v, "mask": mask}
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"q": torch.zeros(2, 32, 16)}, ValueError, "q must be"),
        ({"k": torch.zeros(1, 2, 32, 16, dtype=torch.float16)}, TypeError, "share a dtype"),
        ({"v": torch.zeros(1, 2, 31, 16)}, ValueError, "k and v"),
        ({"k": torch.zeros(1, 3, 32, 16), "v": torch.zeros(1, 3, 32, 16)}, ValueError, "multiple"),
        ({"k": torch.zeros(1, 2, 32, 8), "v": torch.zeros(1, 2, 32, 8)}, ValueError, "head_dim"),
        ({"q": torch.zeros(1, 2, 33, 16)}, ValueError, "mask: built for"),
        ({"q": torch.zeros(1, 2, 32, 16, dtype=torch.int32)}, TypeError, "q must be float"),
        ({"mask": torch.ones(2, 2, dtype=torch.bool)}, TypeError, "mask must be a BlockSparseMask"),
        ({"q": torch.zeros(1, 3, 32, 16)}, ValueError, "multiple"),
    ],
)
def test_bad_inputs_raise_errors_naming_the_argument(change, error, match):
    with pytest.raises(error, match=match):
        block_sparse_attention(**_inputs(**change))


def test_mask_heads_must_broadcast_to_the_query_heads():
    args = _inputs(mask=random_mask(1, 3, 32, 32, (16, 16)))
    with pytest.raises(ValueError, match="mask: batch/heads"):
        block_sparse_attention(**args)


def test_unknown_backend_and_bad_scale_are_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        block_sparse_attention(**_inputs(), backend="cuda")
    with pytest.raises(ValueError, match="scale"):
        block_sparse_attention(**_inputs(), scale=float("nan"))


def test_triton_backend_rejects_float64_and_odd_head_dims():
    if not backend_info("cpu")["triton"][0]:
        pytest.skip("the Triton interpreter runs only with TRITON_INTERPRET=1")
    with pytest.raises(TypeError, match="backend='triton'"):
        block_sparse_attention(**_inputs(q=torch.zeros(1, 2, 32, 16, dtype=torch.float64),
                                         k=torch.zeros(1, 2, 32, 16, dtype=torch.float64),
                                         v=torch.zeros(1, 2, 32, 16, dtype=torch.float64)), backend="triton")
    with pytest.raises(ValueError, match="head_dim"):
        block_sparse_attention(**_inputs(q=torch.zeros(1, 2, 32, 12), k=torch.zeros(1, 2, 32, 12),
                                         v=torch.zeros(1, 2, 32, 12)), backend="triton")
