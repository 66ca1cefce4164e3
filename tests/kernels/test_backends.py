"""The backend registry: capability predicates, `supported_backends` in preference order, and `resolve_backend`."""

from types import SimpleNamespace

import pytest
import torch

from mmattn.kernels import BlockSparseMask, backends, supported_backends
from mmattn.kernels.backends import (
    FAMILIES,
    REGISTRY,
    backend_choices,
    can_run_fa4,
    can_run_flex,
    can_run_torch,
    can_run_triton,
    resolve_backend,
)


def cpu_q(dtype=torch.float32, head_dim=16, batch=1):
    return torch.zeros(batch, 2, 8, head_dim, dtype=dtype)


def cuda_like(dtype=torch.float16, head_dim=64):
    """What the predicates read of a CUDA tensor (device, dtype, shape), without a GPU."""
    return SimpleNamespace(device=torch.device("cuda"), is_cuda=True, dtype=dtype, shape=(1, 2, 8, head_dim),
                           numel=lambda: 16 * head_dim)


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "INTERPRETED", False)


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setattr(backends, "INTERPRETED", True)


def test_every_family_lists_torch_and_takes_auto():
    assert set(REGISTRY) == set(FAMILIES)
    for family in FAMILIES:
        assert "torch" in REGISTRY[family]
        assert backend_choices(family) == ("auto", *REGISTRY[family])
    assert backend_choices("routed") == ("auto", "triton", "torch")
    assert backend_choices("na") == ("auto", "triton", "flex", "torch")
    assert backend_choices("block_sparse") == ("auto", "fa4", "triton", "flex", "torch")


@pytest.mark.usefixtures("no_interpreter")
def test_on_the_cpu_without_the_interpreter_triton_is_not_supported():
    q = cpu_q()
    assert not can_run_triton("block_sparse", q)
    assert can_run_flex("block_sparse", q) and can_run_torch("block_sparse", q)
    assert supported_backends("block_sparse", q) == ("torch", "flex")
    assert supported_backends("routed", q) == ("torch",)
    assert supported_backends("column_sets", q) == ("torch",)
    assert resolve_backend("na", "auto", q) == "torch"


@pytest.mark.usefixtures("no_interpreter")
def test_an_explicit_backend_that_cannot_run_raises_naming_backend():
    with pytest.raises(ValueError, match=r"^backend='triton' cannot run here: needs a CUDA GPU, or TRITON_INTERPRET=1"):
        resolve_backend("block_sparse", "triton", cpu_q())
    with pytest.raises(ValueError, match="backend='triton'"):
        can_run_triton("routed", cpu_q(), raise_error=True)


@pytest.mark.usefixtures("interpreter")
def test_under_the_interpreter_triton_runs_on_the_cpu_but_auto_keeps_the_reference():
    q = cpu_q()
    assert can_run_triton("block_sparse", q)
    assert supported_backends("block_sparse", q) == ("torch", "triton", "flex")
    assert supported_backends("routed", q) == ("torch", "triton")
    assert resolve_backend("routed", "auto", q) == "torch"
    assert resolve_backend("routed", "triton", q) == "triton"


@pytest.mark.usefixtures("interpreter")
def test_triton_limits_dtype_and_head_dim_per_family():
    assert not can_run_triton("na", cpu_q(torch.float64))
    with pytest.raises(TypeError, match=r"^backend='triton' takes float16, bfloat16 or float32 inputs, got torch.float64"):
        resolve_backend("na", "triton", cpu_q(torch.float64))
    with pytest.raises(ValueError, match=r"^backend='triton' takes head_dim a multiple of 8 in \[16, 256\], got 12"):
        resolve_backend("block_sparse", "triton", cpu_q(head_dim=12))
    assert can_run_triton("column_sets", cpu_q(head_dim=12))  # no dots: any head dim up to 256
    assert not can_run_triton("column_sets", cpu_q(head_dim=260))


@pytest.mark.usefixtures("interpreter")
def test_an_empty_batch_runs_the_reference():
    assert resolve_backend("block_sparse", "triton", cpu_q(batch=0)) == "torch"
    assert resolve_backend("block_sparse", "flex", cpu_q(batch=0)) == "torch"


@pytest.mark.skipif(not backends._HAS_TRITON, reason="needs triton installed")
def test_on_cuda_auto_prefers_triton_then_flex_then_the_reference(monkeypatch):
    from mmattn.kernels import fa4

    monkeypatch.setattr(fa4, "fa4_available", lambda device: (False, "flash_attn.cute does not import"))
    assert supported_backends("block_sparse", cuda_like()) == ("triton", "flex", "torch")
    assert supported_backends("column_sets", cuda_like()) == ("triton", "torch")
    assert resolve_backend("block_sparse", "auto", cuda_like()) == "triton"
    assert supported_backends("na", cuda_like(head_dim=20)) == ("flex", "torch")  # Triton's dots need multiples of 8
    assert supported_backends("block_sparse", cuda_like(head_dim=12)) == ("torch",)  # and flex's compiled ones >= 16
    with pytest.raises(ValueError, match=r"^backend='flex' takes head_dim >= 16 on CUDA .*, got 12$"):
        resolve_backend("na", "flex", cuda_like(head_dim=12))
    assert supported_backends("na", cuda_like(torch.float64)) == ("torch",)
    with pytest.raises(TypeError, match=r"^backend='flex' takes float16, bfloat16 or float32 inputs on CUDA"):
        resolve_backend("na", "flex", cuda_like(torch.float64))


def test_unknown_backends_and_families_are_refused():
    with pytest.raises(ValueError, match=r"^backend must be one of \('auto', 'triton', 'torch'\), got 'flex'$"):
        resolve_backend("routed", "flex", cpu_q())
    with pytest.raises(ValueError, match=r"^backend must be one of .*, got None$"):
        resolve_backend("na", None, cpu_q())
    with pytest.raises(ValueError, match="^family must be one of"):
        supported_backends("dense", cpu_q())
    assert not can_run_flex("routed", cpu_q())
    with pytest.raises(ValueError, match="^backend='flex' has no routed kernel$"):
        can_run_flex("routed", cpu_q(), raise_error=True)


def test_fa4_is_block_sparse_only_and_needs_cuda():
    with pytest.raises(ValueError, match=r"^backend='fa4' cannot run here: cpu is not CUDA"):
        resolve_backend("block_sparse", "fa4", cpu_q())
    with pytest.raises(ValueError, match=r"^backend must be one of \('auto', 'triton', 'flex', 'torch'\), got 'fa4'$"):
        resolve_backend("na", "fa4", cpu_q())
    assert not can_run_fa4("routed", cuda_like())


@pytest.mark.skipif(not backends._HAS_TRITON, reason="needs triton installed")
def test_on_cuda_auto_prefers_fa4_where_it_imports_and_runs_the_case(monkeypatch):
    from mmattn.kernels import fa4

    monkeypatch.setattr(fa4, "fa4_available", lambda device: (False, "flash_attn.cute does not import"))
    assert supported_backends("block_sparse", cuda_like()) == ("triton", "flex", "torch")
    with pytest.raises(ValueError, match=r"^backend='fa4' cannot run here: flash_attn.cute does not import"):
        resolve_backend("block_sparse", "fa4", cuda_like())
    monkeypatch.setattr(fa4, "fa4_available", lambda device: (True, "sm90"))
    assert supported_backends("block_sparse", cuda_like()) == ("fa4", "triton", "flex", "torch")
    assert supported_backends("na", cuda_like()) == ("triton", "flex", "torch")
    # given the case, FA4's own check decides, and it is told when torch asks for deterministic algorithms
    asked = []

    def supports(q, k, v, mask, *, deterministic=False):
        asked.append(deterministic)
        return (False, "kv block 64: FA4's backward on sm90 (head_dim 128) needs kv block == tile_n=128")

    monkeypatch.setattr(fa4, "fa4_supports", supports)
    large = BlockSparseMask.from_dense(torch.ones(1, 1, 256, 256, dtype=torch.bool), 128)  # not host-bound
    case = {"k": cuda_like(), "v": cuda_like(), "mask": large}
    assert resolve_backend("block_sparse", "auto", cuda_like(), **case) == "triton"
    with pytest.raises(ValueError, match=r"^backend='fa4' cannot run this case: kv block 64"):
        resolve_backend("block_sparse", "fa4", cuda_like(), **case)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        supported_backends("block_sparse", cuda_like(), **case)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert asked == [False, False, True]


@pytest.mark.skipif(not backends._HAS_TRITON, reason="needs triton installed")
@pytest.mark.parametrize("batch,heads,length,kept,head_dim,block,first", [
    (1, 12, 16384, 20, 64, 128, "triton"),  # 12 x 128 rows x 20 = 30,720 blocks, x 64 = 1.97e6: host-bound
    (1, 12, 16384, 21, 64, 128, "fa4"),     # 32,256 x 64 = 2.06e6
    (8, 16, 4096, 3, 128, 128, "triton"),   # 8 x 16 x 32 rows x 3 = 12,288 x 128 = 1.57e6
    (8, 16, 4096, 4, 128, 128, "fa4"),      # 16,384 x 128 = 2.10e6
    (8, 16, 4096, 3, 128, 64, "triton"),    # 24,576 blocks of 64x64 count a quarter: 6,144 x 128 = 0.79e6
])
def test_on_cuda_auto_puts_triton_first_where_a_block_sparse_call_is_host_bound(monkeypatch, batch, heads, length,
                                                                                  kept, head_dim, block, first):
    from mmattn.kernels import fa4

    monkeypatch.setattr(fa4, "fa4_available", lambda device: (True, "sm90"))
    monkeypatch.setattr(fa4, "fa4_supports", lambda q, k, v, mask, *, deterministic=False: (True, "runs"))
    n = length // block
    blocks = torch.zeros(1, 1, n, n, dtype=torch.bool)
    blocks[..., :kept] = True  # the mask is shared by batch and heads: the count scales by both
    mask = BlockSparseMask.from_dense(blocks, block)
    q = SimpleNamespace(device=torch.device("cuda"), is_cuda=True, dtype=torch.bfloat16,
                        shape=(batch, heads, length, head_dim), numel=lambda: 1)
    order = supported_backends("block_sparse", q, k=q, v=q, mask=mask)
    assert order[0] == first and set(order) == {"fa4", "triton", "flex", "torch"}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # traced: no host read, FA4 first
    assert supported_backends("block_sparse", q, k=q, v=q, mask=mask)[0] == "fa4"
