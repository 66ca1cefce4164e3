"""Training the mmattn models with timm's training stack on a tiny synthetic ImageFolder (ecosystem.md 1).

timm's `train.py` is not shipped in the timm wheel nor in its sdist; `test_train_py_runs_one_step` runs it when
TIMM_TRAIN_PY names a checkout's `train.py` (e.g. `git clone -b v1.0.31 .../pytorch-image-models`). The other test
drives the same pieces train.py uses (dataset, loader, optimizer, scheduler, loss) for one step, always.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import mmattn.vision  # noqa: F401  (registers the models)

TINY_BIFORMER = {"depths": (1, 1, 1, 1), "embed_dims": (32, 64, 96, 128), "num_heads": (1, 2, 3, 8)}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """`train/` and `validation/` splits of two classes, two 40x40 RGB images each."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for split in ("train", "validation"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                pixels = torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


@pytest.mark.parametrize("name, kwargs", [("biformer_tiny", TINY_BIFORMER),
                                          ("litv2_small", {"embed_dim": 16, "depths": (1, 1, 1, 1),
                                                           "num_heads": (1, 2, 4, 4)})])
def test_one_step_with_timms_training_stack(image_folder, name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=2, drop_path_rate=0.1, **kwargs)
    model.set_grad_checkpointing(True)
    config = resolve_data_config({"input_size": (3, 64, 64)}, model=model)
    dataset = create_dataset("", root=str(image_folder), split="train", is_training=True)
    loader = create_loader(dataset, input_size=config["input_size"], batch_size=2, is_training=True,
                           mean=config["mean"], std=config["std"], num_workers=0, device=torch.device("cpu"))
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=1)
    before = [p.detach().clone() for p in model.parameters()]
    images, targets = next(iter(loader))
    loss = LabelSmoothingCrossEntropy(0.1)(model(images), targets)
    loss.backward()
    optimizer.step()
    scheduler.step(1)
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters())) > len(before) // 2


def _train_py_args(data: Path, output: Path, batch_size: int) -> list[str]:
    """The README's command on the tiny folder: one epoch of one batch per process, a tiny BiFormer, the CPU."""
    return [
        os.environ["TIMM_TRAIN_PY"], "--data-dir", str(data), "--model", "biformer_tiny",
        "--device-modules", "mmattn.vision", "--device", "cpu", "--num-classes", "2", "--epochs", "1",
        "-b", str(batch_size), "--workers", "0", "--input-size", "3", "64", "64", "--output", str(output),
        "--model-kwargs", "depths=(1,1,1,1)", "embed_dims=(32,64,96,128)", "num_heads=(1,2,3,8)",
    ]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


@pytest.mark.skipif(not os.environ.get("TIMM_TRAIN_PY"), reason="set TIMM_TRAIN_PY to timm's train.py (repo only)")
def test_train_py_runs_one_step(image_folder, tmp_path):
    """The README's command: timm's train.py with `--device-modules mmattn.vision`, one epoch of one batch."""
    result = _run([sys.executable, *_train_py_args(image_folder, tmp_path, batch_size=4)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.glob("*/summary.csv")), "train.py wrote no summary.csv"


# timm.utils.init_distributed_device gives gloo and torch.device("cpu") under torchrun with `--device cpu`, but
# train.py then wraps the model with `NativeDDP(model, device_ids=[device], ...)`, and torch's DDP refuses
# device_ids for a CPU module. On GPUs (nccl, device cuda:LOCAL_RANK) the same command runs.
_DDP_CPU_DEVICE_IDS = "device_ids and output_device arguments only work"


@pytest.mark.skipif(not os.environ.get("TIMM_TRAIN_PY"), reason="set TIMM_TRAIN_PY to timm's train.py (repo only)")
def test_train_py_under_torchrun_runs_one_step(image_folder, tmp_path):
    """The README's distributed command, `torchrun --nproc_per_node=2 train.py ...`, on 2 gloo processes: one
    step of one batch of 2 per process (tests/vision/test_distributed.py checks what DDP computes, always)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = _run([*torchrun, *_train_py_args(image_folder, tmp_path, batch_size=2)], tmp_path)
    output = result.stdout + result.stderr
    if result.returncode != 0 and _DDP_CPU_DEVICE_IDS in output:
        pytest.xfail("timm's train.py passes device_ids=[device] to DDP, which torch refuses for CPU modules")
    assert result.returncode == 0, output[-3000:]
    assert "distributed mode" in output, output[-3000:]  # train.py logs "Training in distributed mode ..."
    assert list(tmp_path.glob("*/summary.csv")), "train.py wrote no summary.csv"


@pytest.mark.parametrize("name, kwargs", [("biformer_tiny", TINY_BIFORMER),
                                          ("litv2_small", {"embed_dim": 16, "depths": (1, 1, 1, 1),
                                                           "num_heads": (1, 2, 4, 4)})])
def test_timm_model_conventions(name, kwargs):
    """What timm's tests/test_models.py checks: pooled/unpooled heads, classifier reset, grad checkpointing."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[1] == model.num_features and features.shape[2:] == (2, 2)
        assert model.forward_head(features, pre_logits=True).shape == (1, model.head_hidden_size)
        logits = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), logits, rtol=1e-4, atol=1e-5)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)
        model.reset_classifier(0, "")
        assert model(x).shape == features.shape
    assert isinstance(model.no_weight_decay(), set)
    cfg = model.pretrained_cfg
    assert cfg["url"] and hasattr(model, cfg["classifier"]) and cfg["pool_size"] == (7, 7)
    unpooled = timm.create_model(name, num_classes=0, global_pool="", **kwargs)
    assert unpooled(x).dim() == 4
