"""`autograd.kernel_op`: the custom ops, their fakes and autograd, and the eager `autograd.Function`, made from a
forward and a backward launcher. A dense attention written in torch stands for the Triton launchers (no interpreter
needed); the routed Triton op, whose custom ops no other test compiles, runs under the interpreter."""

import pytest
import torch

from mmattn.kernels import backend_info, reference, routed_attention
from mmattn.kernels.autograd import kernel_op

needs_interpreter = pytest.mark.skipif(not backend_info("cpu")["triton"][0], reason="needs TRITON_INTERPRET=1")


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    scores = q @ k.transpose(-1, -2) * scale
    lse = torch.logsumexp(scores, -1)
    return torch.exp(scores - lse[..., None]) @ v, lse


def _backward(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
              q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention's backward: dS = P (dP - delta), delta = rowsum(dO * O) - dLSE."""
    probs = torch.exp(q @ k.transpose(-1, -2) * scale - lse[..., None])
    delta = (grad_out * out).sum(-1) - (0 if grad_lse is None else grad_lse)
    grad_scores = probs * (grad_out @ v.transpose(-1, -2) - delta[..., None])
    return grad_scores @ k * scale, grad_scores.transpose(-1, -2) @ q * scale, probs.transpose(-1, -2) @ grad_out


def _save(inputs, needs_input_grad):
    q, k, v, scale = inputs
    return (q, k, v), (scale,)


def _forward_fake(q, k, v, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3])  # lse in q's dtype (float64 here, for gradcheck)


dense_op = kernel_op("mmattn_test::dense", _forward, _backward, save=_save, grads=3, forward_fake=_forward_fake)


def _leaves(seed=0, requires_grad=(True, True, True)):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 5, 8, dtype=torch.float64, generator=generator).requires_grad_(grad)
            for grad in requires_grad]


def _reference(q, k, v, scale=0.3):
    return _forward(q, k, v, scale)  # plain torch: autograd differentiates it


@pytest.mark.parametrize("use", ["out", "lse", "both"])
def test_eager_op_matches_autograd_of_the_reference(use):
    def loss(out, lse):
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
        return {"out": (out * weight).sum(), "lse": lse.square().sum(), "both": (out * weight).sum() + lse.sum()}[use]

    leaves = _leaves()
    got = torch.autograd.grad(loss(*dense_op(*leaves, 0.3)), leaves)
    want = torch.autograd.grad(loss(*_reference(*leaves)), leaves, materialize_grads=True)  # lse: dv = 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_gradcheck_eager_and_through_the_custom_op():
    leaves = _leaves(seed=1)
    assert torch.autograd.gradcheck(lambda q, k, v: dense_op(q, k, v, 0.3), leaves)
    assert torch.autograd.gradcheck(lambda q, k, v: dense_op.forward_op(q, k, v, 0.3), leaves)


def test_inputs_without_gradient_get_none():
    q, k, v = _leaves(seed=2, requires_grad=(True, False, False))
    out, _ = dense_op(q, k, v, 0.3)
    (grad_q,) = torch.autograd.grad(out.sum(), q)
    torch.testing.assert_close(grad_q, torch.autograd.grad(_reference(q, k, v)[0].sum(), q)[0])


def test_compiles_in_a_full_graph_with_autograd():
    leaves = _leaves(seed=3)

    def attend(q, k, v):
        out, lse = dense_op(q, k, v, 0.3)
        return out.square().sum() + lse.sum()

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(attend(*leaves), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_custom_ops_pass_opcheck():
    torch.library.opcheck(dense_op.forward_op, (*_leaves(seed=4), 0.3))
    q, k, v = (t.detach() for t in _leaves(seed=5))
    out, lse = _forward(q, k, v, 0.3)
    torch.library.opcheck(dense_op.backward_op, (torch.randn_like(out), None, out, lse, q, k, v, 0.3),
                          test_utils=("test_schema", "test_faketensor"))


@needs_interpreter
def test_routed_triton_op_compiles_in_a_full_graph_and_passes_opcheck():
    from mmattn.kernels.triton.routed import routed_op

    generator = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=generator, requires_grad=True) for _ in range(3))
    indices = torch.tensor([[[1, 0], [1, 1]]])  # (B, n_q_regions, topk), regions of 16 tokens

    def attend(q, k, v, backend="triton"):
        out, lse = routed_attention(q, k, v, indices, q_region_size=16, backend=backend, return_lse=True)
        return out.double().square().sum() + lse.double().sum()

    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v), (q, k, v))
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = reference.routed_attention(*exact, indices[:, None], None, 16, 16, 16 ** -0.5)
    want = torch.autograd.grad(out.square().sum() + lse.sum(), exact)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    args = (q, k, v, indices[:, None].int(), None, 16, 16, 0.25)
    torch.library.opcheck(routed_op.forward_op, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
