"""The backbones under DistributedDataParallel: 2 gloo processes on the CPU (issue 8).

One spawned group of 2 ranks trains a tiny model of every attention family (BiFormer's routed attention, LITv2's
HiLo, NAT and DiNAT, Agent-DeiT/PVT/Swin, ELA) for two SGD steps, each rank on its half of the batch, in float64.
DDP must leave the same parameters on both ranks, equal to one process taking the same two steps, and must not
need `find_unused_parameters` (every parameter gets a gradient). The one-process reference takes the whole batch
at once; for models with BatchNorm it takes each rank's half separately and averages the gradients, because
per-rank BatchNorm statistics are what DDP computes (SyncBatchNorm, timm's `--sync-bn`, is GPU-only in torch).
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import mmattn.vision  # noqa: F401  (registers the models)

from ..gloo import run_gloo

WORLD = 2
STEPS = 2  # DDP reports a parameter without gradient at the forward after the step that left it out
PER_RANK = 2
NUM_CLASSES = 3
SIZE = 64

# name -> (timm model, kwargs, extra run options); tiny widths, drop path off (its masks are random per rank)
CASES: dict[str, tuple[str, dict, dict]] = {
    "biformer": ("biformer_tiny", {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 48, 64), "num_heads": (1, 2, 3, 8)},
                 {}),
    "litv2_hilo": ("litv2_small", {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 4)}, {}),
    "nat": ("nat_mini", {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8), "kernel_size": 3,
                         "layer_scale": 1e-2}, {}),
    "dinat": ("dinat_mini", {"embed_dim": 16, "depths": (2, 2, 1, 1), "num_heads": (1, 2, 4, 8), "kernel_size": 3,
                             "dilations": ([1, 4], [1, 2], [1], [1])}, {}),
    "agent_deit": ("agent_deit_tiny", {"img_size": SIZE, "embed_dim": 32, "depth": 2, "num_heads": 2, "agent_num": 4,
                                       "agent_layers": 1}, {}),
    "agent_pvt": ("agent_pvt_tiny", {"img_size": SIZE, "embed_dims": (16, 32, 48, 64), "depths": (1, 1, 1, 1),
                                     "num_heads": (1, 2, 3, 4), "agent_nums": (4, 4, 4, 4),
                                     "mlp_ratios": (2, 2, 2, 2)}, {}),
    "agent_swin": ("agent_swin_tiny", {"img_size": SIZE, "embed_dim": 16, "depths": (2, 2, 1, 1),
                                       "agent_depths": (1, 1, 1, 0), "num_heads": (1, 2, 4, 8),
                                       "agent_nums": (4, 4, 4, 4), "window_size": 4}, {}),
    "ela_resnet": ("ela_resnet18", {"channels": (16, 32, 64, 128), "stem_width": 16, "zero_init_last": False}, {}),
}
# gradient checkpointing under DDP: checkpoint_seq over a stage (BiFormer), timm's per-block checkpoint (NAT)
CASES["biformer_grad_checkpointing"] = (*CASES["biformer"][:2], {"grad_checkpointing": True})
CASES["nat_grad_checkpointing"] = (*CASES["nat"][:2], {"grad_checkpointing": True})
# detection/segmentation backbones whose out_indices stop before the last level (the pruned last level's
# downsampler used to run with no gradient, so DDP needed find_unused_parameters)
CASES["nat_features_0_1_2"] = ("nat_mini", {**CASES["nat"][1], "features_only": True, "out_indices": (0, 1, 2)}, {})
CASES["agent_swin_features_0_1"] = (
    "agent_swin_tiny", {**CASES["agent_swin"][1], "features_only": True, "out_indices": (0, 1)}, {})


def _create(name: str, kwargs: dict) -> nn.Module:
    head = {} if kwargs.get("features_only") else {"num_classes": NUM_CLASSES}
    return timm.create_model(name, drop_path_rate=0.0, **head, **kwargs).double()


def _loss(output: torch.Tensor | list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    if isinstance(output, (list, tuple)):  # feature maps
        return sum(feature.square().mean() for feature in output)
    return F.cross_entropy(output, targets)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(WORLD * PER_RANK, 3, SIZE, SIZE, generator=g, dtype=torch.float64),
             torch.randint(0, NUM_CLASSES, (WORLD * PER_RANK,), generator=g)) for _ in range(STEPS)]


def _optimizer(parameters) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=0.1, momentum=0.9, weight_decay=1e-4)


def _train_ddp(case: dict, batches: list, rank: int) -> dict[str, torch.Tensor]:
    model = _create(case["name"], case["kwargs"])
    model.load_state_dict(case["init"])
    if case["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    ddp = DistributedDataParallel(model)  # find_unused_parameters=False, as timm's train.py
    optimizer = _optimizer(ddp.parameters())
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for images, targets in batches:
        optimizer.zero_grad(set_to_none=True)
        _loss(ddp(images[mine]), targets[mine]).backward()
        missing = [name for name, p in model.named_parameters() if p.grad is None]
        if missing:
            raise RuntimeError(f"parameters without gradient (DDP would need find_unused_parameters): {missing}")
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _rank_main(rank: int, world: int, job_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    job = torch.load(job_path, weights_only=False)
    results = {}
    for key, case in job["cases"].items():
        try:
            results[key] = {"params": _train_ddp(case, job["batches"], rank)}
        except Exception:  # noqa: BLE001  (reported per case by the test; the next case still runs)
            results[key] = {"error": traceback.format_exc()}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _train_single_process(case: dict, batches: list) -> dict[str, torch.Tensor]:
    """The same steps in one process: the whole batch at once, or (BatchNorm) rank by rank, gradients averaged."""
    model = _create(case["name"], case["kwargs"])
    model.load_state_dict(case["init"])
    optimizer = _optimizer(model.parameters())
    per_rank = _has_batchnorm(model)
    for images, targets in batches:
        optimizer.zero_grad(set_to_none=True)
        if per_rank:
            for part_images, part_targets in zip(images.split(PER_RANK), targets.split(PER_RANK)):
                (_loss(model(part_images), part_targets) / WORLD).backward()
        else:
            _loss(model(images), targets).backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tiny models run fastest on one thread; the ranks run beside this process on a shared CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Every case trained once by one group of WORLD gloo ranks: (cases, batches, {rank: results})."""
    root = tmp_path_factory.mktemp("ddp")
    cases = {}
    for key, (name, kwargs, options) in CASES.items():
        torch.manual_seed(0)
        init = _create(name, kwargs).state_dict()
        cases[key] = {"name": name, "kwargs": kwargs, "init": init,
                      "grad_checkpointing": options.get("grad_checkpointing", False)}
    batches = _batches()
    torch.save({"cases": cases, "batches": batches}, root / "job.pt")
    run_gloo(_rank_main, WORLD, str(root / "job.pt"), str(root))
    ranks = {rank: torch.load(root / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)}
    return cases, batches, ranks


@pytest.mark.parametrize("key", list(CASES))
def test_ddp_step_matches_one_process(ddp_run, key):
    cases, batches, ranks = ddp_run
    for rank in range(WORLD):
        assert "error" not in ranks[rank][key], f"rank {rank}:\n{ranks[rank][key].get('error')}"
    params = [ranks[rank][key]["params"] for rank in range(WORLD)]
    for name, value in params[0].items():  # one allreduced gradient, one optimizer: bit-identical replicas
        assert torch.equal(value, params[1][name]), f"{name} differs between the ranks"
    expected = _train_single_process(cases[key], batches)
    assert params[0].keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(
            params[0][name], value, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}"
        )
    init = cases[key]["init"]
    moved = sum(not torch.equal(value, init[name]) for name, value in params[0].items())
    assert moved > len(params[0]) // 2, f"only {moved} of {len(params[0])} parameters changed"


@pytest.mark.parametrize("name, kwargs, out_indices", [
    ("nat_mini", CASES["nat"][1], (0, 1, 2)),
    ("nat_mini", CASES["nat"][1], (1,)),
    ("dinat_mini", CASES["dinat"][1], (0, 1)),
    ("agent_swin_tiny", CASES["agent_swin"][1], (0, 1, 2)),
    ("agent_swin_tiny", CASES["agent_swin"][1], (0,)),
    ("agent_pvt_tiny", CASES["agent_pvt"][1], (1,)),
    ("biformer_tiny", CASES["biformer"][1], (0, 1, 2)),
    ("litv2_small", CASES["litv2_hilo"][1], (1,)),
])
def test_truncated_feature_backbones_give_every_parameter_a_gradient(name, kwargs, out_indices):
    """What DDP without find_unused_parameters needs from a features_only backbone: no parameter that runs (or
    sits) without a gradient, also when out_indices stop before the last level."""
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=True, out_indices=out_indices, **kwargs).double()
    features = model(torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64))
    assert len(features) == len(out_indices)
    _loss(features, None).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
