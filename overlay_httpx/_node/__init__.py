"""The IO half: `Node` drives the sans-IO tunnels on a real UDP socket (asyncio or trio)."""

from ._node import Node, NodeStatistics, PeerInfo, default_address
from ._stream import OverlayAttribute, OverlayListener, OverlayStream

__all__ = [
    "Node",
    "NodeStatistics",
    "OverlayAttribute",
    "OverlayListener",
    "OverlayStream",
    "PeerInfo",
    "default_address",
]
