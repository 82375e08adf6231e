"""The IO half: `Node` drives the sans-IO tunnels on a real UDP socket (asyncio or trio)."""

from .._identity import default_address
from ._node import Node, PeerInfo
from ._stats import NodeStatistics
from ._stream import OverlayAttribute, OverlayListener, OverlayStream
from ._trust import TrustPolicy

__all__ = [
    "Node",
    "NodeStatistics",
    "OverlayAttribute",
    "OverlayListener",
    "OverlayStream",
    "PeerInfo",
    "TrustPolicy",
    "default_address",
]
