"""The vision models on a CUDA GPU: a bf16 (autocast) training step through the fast attention path against the same
model, weights and inputs on the reference path (backend="torch"), per parameter group.

Truth: the reference path in float32 (no TF32). Yardstick: the reference path under the same bf16 autocast, whose
error against the truth is what bf16 itself costs. The logits and the gradient of each parameter group (stage x
layer: attention projections, relative position bias tables, LePE / depthwise convs, norms, MLP, stem, head) must
have a relative error (norm of the difference over norm of the truth) within twice the yardstick's plus a small
slack, so that one wrong gradient (an rpb gradient scattered to the wrong offsets, a dropped dK tile) fails its group
where a norm over the whole model would hide it.

BiFormer's region routing is a top-k of detached region affinities: bf16 rounding may flip a near tie and route a
region elsewhere, a discrete difference no kernel causes. The routing of the float32 run is replayed in the bf16 runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmattn.kernels.backends import INTERPRETED

timm = pytest.importorskip("timm")

import mmattn.vision  # noqa: E402, F401  (registers the models)
from mmattn.vision.layers import BiLevelRoutingAttention  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                                reason="needs a CUDA GPU and MMATTN_TEST_GPU=1 (compiled Triton, bf16)")

# The smallest model of each family and its fast attention path.
MODELS = {
    "biformer_tiny": "triton",  # routed attention (BRA) and SDPA in the last stage
    "litv2_small": "triton",  # HiLo: Hi-Fi windows through routed attention, Lo-Fi through SDPA
    "nat_mini": "triton",  # fused neighborhood attention with the relative position bias
    "dinat_mini": "triton",  # the same, dilated
    "agent_deit_tiny": "auto",  # agent attention with fewer launches
    "agent_pvt_tiny": "auto",
    "agent_swin_tiny": "auto",
}
SLACK = 2e-3
_STAGE = ("stages", "levels", "layers")


def parameter_group(name: str) -> str:
    """`stages.2 attn.qkv`, `levels.0 attn.rpb`, `stages.1 mlp`, `norm1`, `head`: the stage, then the attention
    submodule or the block's layer (blocks of a stage are pooled)."""
    parts = name.split(".")
    stage = parts[:2] if parts[0] in _STAGE and parts[1].isdigit() else []
    rest = parts[len(stage):]
    if rest[0] == "blocks":
        rest = rest[2:]
    layer = ".".join(rest[:2]) if rest[0] == "attn" else rest[0]
    return " ".join([".".join(stage), layer]).strip()


class SharedRouting:
    """Records `BiLevelRoutingAttention.route`'s region indices in call order, then replays them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.recorded: list[torch.Tensor] = []
        self.queue: list[torch.Tensor] | None = None
        original = BiLevelRoutingAttention.route

        def route(module, *args):
            if self.queue is None:
                self.recorded.append(original(module, *args))
                return self.recorded[-1]
            return self.queue.pop(0)

        monkeypatch.setattr(BiLevelRoutingAttention, "route", route)

    def replay(self) -> None:
        assert not self.queue, "the previous run did not route every recorded layer"
        self.queue = list(self.recorded)


def training_step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, bf16: bool):
    """Logits and the gradient of every parameter, float32."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    F.cross_entropy(logits.float(), target).backward()
    grads = {name: p.grad.float() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", MODELS)
def test_gpu_bf16_training_step_matches_the_reference_path_per_parameter_group(name, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    routing = SharedRouting(monkeypatch)
    torch.manual_seed(0)
    truth_model, naive_model, fast_model = (
        timm.create_model(name, backend=backend, drop_rate=0.0, drop_path_rate=0.0).cuda()
        for backend in ("torch", "torch", MODELS[name]))
    for model in (naive_model, fast_model):
        model.load_state_dict(truth_model.state_dict())
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(4, 3, 224, 224, generator=g).cuda(), torch.randint(0, 1000, (4,), generator=g).cuda()

    truth = training_step(truth_model, x, target, bf16=False)
    routing.replay()
    naive = training_step(naive_model, x, target, bf16=True)
    routing.replay()
    fast = training_step(fast_model, x, target, bf16=True)
    assert not routing.queue

    assert fast[1].keys() == truth[1].keys() == naive[1].keys()
    groups: dict[str, list[str]] = {"logits": []}
    for param in truth[1]:
        groups.setdefault(parameter_group(param), []).append(param)
    failures = []
    for group, params in groups.items():
        if group == "logits":
            ours, yardstick, exact = fast[0], naive[0], truth[0]
        else:
            ours, yardstick, exact = (torch.cat([run[1][p].flatten() for p in params]) for run in (fast, naive, truth))
        assert torch.isfinite(ours).all(), f"{group}: not finite"
        err, naive_err = relative_error(ours, exact), relative_error(yardstick, exact)
        if err > 2 * naive_err + SLACK:
            failures.append(f"{group}: {err:.3g} vs bf16 reference {naive_err:.3g}")
    assert not failures, f"{name} ({MODELS[name]} vs torch), relative error per group: " + "; ".join(failures)
