"""timm model families (one module per family); importing registers them with timm."""
from . import agent_deit, agent_pvt, agent_swin, ela, nat  # noqa: F401
