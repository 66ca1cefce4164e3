"""`RadialConfig`: the Radial attention hyper-parameters and the dense fallback schedule, with YAML presets.

Presets are `mmattn/presets/diffusion/<name>.yaml`; a file with a `pattern: sta` or `pattern: nabla` key holds
an `STAConfig` / `NABLAConfig` (`load_preset` reads any of them), the others a `RadialConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from mmattn import presets

from .masks import MASK_RULES, check_radial_args

__all__ = ["PRESET_DIR", "RadialConfig", "load_preset", "preset_names"]

_PATTERN_KEY = "pattern"

PRESET_DIR = presets.folder("diffusion")
"""Per-model presets from the official scripts: the package data `mmattn/presets/diffusion/<name>.yaml`."""


def _non_negative_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


@dataclass(frozen=True)
class RadialConfig:
    """Radial attention settings (paper: decay factor, dense warm-up timesteps and layers).

    Attention is dense (the stock processor's call) at denoising-loop indices `< dense_steps`, at the last
    `dense_last_steps` indices (a community fix for late-step artefacts) and in attention layers
    `< dense_layers`; elsewhere it is block-sparse with the Radial mask. `model` picks the mask rule
    (`"wan"`: frame-0 attention sink; `"hunyuan"`: none); `None` takes the transformer's own family.
    `backend` is passed to `mmattn.kernels.block_sparse_attention`.
    """

    decay_factor: float = 1.0
    dense_steps: int = 0
    dense_layers: int = 0
    dense_last_steps: int = 0
    block_size: int = 128
    model: str | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("dense_steps", "dense_layers", "dense_last_steps"):
            _non_negative_int(name, getattr(self, name))
        check_radial_args(self.block_size, self.decay_factor, MASK_RULES[0] if self.model is None else self.model)
        from mmattn.kernels import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> RadialConfig:
        """Reads a preset file whose keys are this class's fields."""
        import yaml

        values = yaml.safe_load(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or not set(values) <= known:
            extra = sorted(set(values) - known) if isinstance(values, dict) else values
            raise ValueError(f"{path}: expected a mapping with keys from {sorted(known)}, got {extra!r}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str) -> RadialConfig:
        """The named preset, e.g. `"wan2.1-t2v-14b"`, `"hunyuan-video"`; see `preset_names()`."""
        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"name must be one of {preset_names()}, got {name!r}")
        pattern = _pattern_of(path)
        if pattern != "radial":
            raise ValueError(f"name: {name!r} is a {pattern!r} preset, not a Radial one; read it with load_preset")
        return cls.from_yaml(path)


def _read(path) -> dict:
    import yaml

    values = yaml.safe_load(path.read_text())
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping, got {values!r}")
    return values


def _pattern_of(path) -> str:
    return _read(path).get(_PATTERN_KEY, "radial")


def load_preset(name: str):
    """The named preset of any pattern: a `RadialConfig`, `STAConfig` or `NABLAConfig` (by its `pattern` key)."""
    from .patterns import NABLAConfig, STAConfig

    path = PRESET_DIR / f"{name}.yaml"
    if not isinstance(name, str) or not path.is_file():
        raise ValueError(f"name must be one of {preset_names(None)}, got {name!r}")
    values = _read(path)
    pattern = values.pop(_PATTERN_KEY, "radial")
    classes = {"radial": RadialConfig, "sta": STAConfig, "nabla": NABLAConfig}
    if pattern not in classes:
        raise ValueError(f"{path}: pattern must be one of {sorted(classes)}, got {pattern!r}")
    cls = classes[pattern]
    known = {f.name for f in fields(cls)}
    if not set(values) <= known:
        raise ValueError(f"{path}: expected keys from {sorted(known)}, got {sorted(set(values) - known)!r}")
    return cls(**values)


def preset_names(pattern: str | None = "radial") -> list[str]:
    """Names of the presets in `PRESET_DIR` of `pattern` (`"radial"`, `"sta"`, `"nabla"`; None: all)."""
    names = presets.names("diffusion")
    if pattern is None:
        return names
    return [n for n in names if _pattern_of(PRESET_DIR / f"{n}.yaml") == pattern]
