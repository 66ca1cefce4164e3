"""pytest plugin that runs timm's own ``tests/test_models.py`` on the mmattn models only.

Loaded with ``-p timm_tests_plugin`` by ``test_timm_model_tests.py``. Before timm's test module collects its model
lists, it places the mmattn models where timm places its own models of the same kind: every mmattn module joins
``FEAT_INTER_FILTERS`` (the modules with ``forward_intermediates()``), and Agent-DeiT, a ViT with tokens out of
``forward_features``, joins ``NON_STD_FILTERS`` as timm's ``deit*`` does. Collection then keeps the tests
parametrized by a model in ``MMATTN_TIMM_MODELS`` (comma-separated; default: every mmattn model).
"""

from __future__ import annotations

import inspect
import os

import pytest
import timm
from timm.models import model_entrypoint

import mmattn.vision  # noqa: F401  (registers the models)

MMATTN_MODELS = [name for name in timm.list_models() if model_entrypoint(name).__module__.startswith("mmattn.")]
MMATTN_MODULES = sorted({model_entrypoint(name).__module__.rsplit(".", 1)[-1] for name in MMATTN_MODELS})
SELECTED = os.environ["MMATTN_TIMM_MODELS"].split(",") if os.environ.get("MMATTN_TIMM_MODELS") else MMATTN_MODELS
NON_STD = ["agent_deit*"]
# Need a download (the hubs are not reachable from the test machines) or TorchScript (deprecated by torch: no goal).
SKIPPED = {
    "test_model_load_pretrained": "downloads the weights",
    "test_model_features_pretrained": "downloads the weights",
    "test_model_forward_torchscript": "TorchScript is deprecated by torch; not a goal of mmattn",
    "test_model_forward_fx_torchscript": "TorchScript is deprecated by torch; not a goal of mmattn",
}

_list_models = timm.list_models
_signature = inspect.signature(_list_models)


def _list_models_with_mmattn(*args, **kwargs):
    """``timm.list_models`` with the mmattn modules in timm's module lists and Agent-DeiT in its ViT lists."""
    call = _signature.bind(*args, **kwargs)
    module = call.arguments.get("module")
    if isinstance(module, (list, tuple)):  # FEAT_INTER_FILTERS
        call.arguments["module"] = [*module, *MMATTN_MODULES]
    for key in ("filter", "exclude_filters"):
        patterns = call.arguments.get(key)
        if isinstance(patterns, (list, tuple)) and "deit*" in patterns:  # NON_STD_FILTERS (or a copy of it)
            call.arguments[key] = [*patterns, *NON_STD]
    return _list_models(*call.args, **call.kwargs)


def pytest_configure(config):
    timm.list_models = _list_models_with_mmattn  # test_models.py imports it from timm


def pytest_collection_modifyitems(config, items):
    kept, dropped = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        model = params.params.get("model_name", "") if params else ""
        if model.split(".")[0] in SELECTED:  # some tests take "arch.tag" names
            reason = SKIPPED.get(item.originalname)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
            kept.append(item)
        else:
            dropped.append(item)
    items[:] = kept
    config.hook.pytest_deselected(items=dropped)
