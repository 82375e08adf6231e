"""Discovery: the rendezvous server, its registry store and protocol, and the node's client."""

from ._server import Rendezvous, RendezvousStatistics
from ._spec import REGISTRY_PORT, RendezvousSpec, parse_rendezvous
from ._store import NodeRecord, SqliteStore, Store

__all__ = [
    "REGISTRY_PORT",
    "NodeRecord",
    "Rendezvous",
    "RendezvousSpec",
    "RendezvousStatistics",
    "SqliteStore",
    "Store",
    "parse_rendezvous",
]
