"""NAT topology tests: hosts behind home-router NATs in network namespaces (root only)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
from _netns import NatMode, NatTopology, nat_topology, require_netns


@pytest.fixture
def nat_topology_factory() -> Iterator[Callable[..., NatTopology]]:
    """``make(nat_a=..., nat_b=..., with_public_host=...)`` builds a topology; all the test's
    topologies are torn down after it. Skips the test where namespaces can't work."""
    require_netns()
    with contextlib.ExitStack() as stack:

        def make(
            *,
            nat_a: NatMode = "preserve",
            nat_b: NatMode = "preserve",
            with_public_host: bool = False,
        ) -> NatTopology:
            return stack.enter_context(
                nat_topology(nat_a=nat_a, nat_b=nat_b, with_public_host=with_public_host)
            )

        yield make
