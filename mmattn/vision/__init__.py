"""Vision backbones as timm models; importing this package registers every model with timm.

Needs the ``vision`` extra: ``pip install "mmattn[vision]"``.
"""

try:
    import timm  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('mmattn.vision needs timm: pip install "mmattn[vision]"') from err

from . import layers, models  # noqa: F401
