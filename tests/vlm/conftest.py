import pytest

pytest.importorskip("transformers")


@pytest.fixture
def fused_launches(monkeypatch) -> list:
    """Counts the launches of the fused column-set kernels (one entry per `_launch`, the split and combine pair)."""
    from mmattn.kernels.triton import column_sets

    launches, launch = [], column_sets._launch
    monkeypatch.setattr(column_sets, "_launch", lambda *args, **kwargs: launches.append(1) or launch(*args, **kwargs))
    return launches
