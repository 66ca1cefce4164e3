"""timm model families (one module per family); importing registers them with timm."""
from . import biformer, litv2  # noqa: F401
from . import agent_deit, agent_pvt, agent_swin, ela, nat  # noqa: F401
