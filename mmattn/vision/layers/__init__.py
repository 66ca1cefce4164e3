"""Attention modules, each usable on its own in any model."""
from .agent import AgentAttention, AgentBlock  # noqa: F401
from .bra import BiLevelRoutingAttention, GlobalAttentionLePE  # noqa: F401
from .ela import ELA  # noqa: F401
from .hilo import HiLoAttention  # noqa: F401
from .neighborhood import NeighborhoodAttention  # noqa: F401
