"""timm model families (one module per family); importing registers them with timm."""
from . import agent_deit, agent_pvt, agent_swin, biformer, ela, litv2, nat  # noqa: F401
