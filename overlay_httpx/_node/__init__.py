"""The IO half: `Node` drives the sans-IO tunnels on a real UDP socket (asyncio or trio)."""

from ._node import Node, NodeStatistics, PeerInfo, default_address
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
