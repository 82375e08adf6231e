"""Overlay nodes behind real (nft masquerade) NATs in network namespaces: hole punching
gives a direct path where the NATs allow it, the relay carries the rest (root only)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _netns import NatMode, NatTopology

PEER = str(Path(__file__).with_name("_nat_overlay_peer.py"))


def _run_case(make: Callable[..., NatTopology], nat_a: NatMode, nat_b: NatMode) -> dict[str, Any]:
    topo = make(nat_a=nat_a, nat_b=nat_b)
    bind = f"{topo.rendezvous_ip}:9000"
    rv = topo.spawn(topo.pub, [sys.executable, PEER, "rendezvous", bind])
    spec = f"{rv.read_json(timeout=15)['identity']}@{topo.rendezvous_ip}:9000"
    server = topo.spawn(topo.host_a, [sys.executable, PEER, "server", spec])
    ready = server.read_json(timeout=15)
    assert ready["registered"], server.stderr_tail()
    public_a = topo.router_a_public if nat_a else topo.host_a_ip
    assert ready["observed"][0] == public_a, topo.diagnostics()
    client = topo.spawn(topo.host_b, [sys.executable, PEER, "client", spec, ready["address"]])
    result: dict[str, Any] = client.read_json(timeout=20)
    assert result["answer"] == "THROUGH THE NAT", client.stderr_tail()
    return result


@pytest.mark.parametrize(("nat_a", "nat_b"), [("preserve", "preserve"), (None, "preserve")])
def test_port_preserving_nats_get_a_direct_path_by_hole_punching(
    nat_topology_factory: Callable[..., NatTopology], nat_a: NatMode, nat_b: NatMode
) -> None:
    result = _run_case(nat_topology_factory, nat_a, nat_b)
    assert result["path"] == "direct", result
    assert result["seconds"] < 2.0, result


@pytest.mark.parametrize(("nat_a", "nat_b"), [("preserve", "random"), ("random", "random")])
def test_random_port_nats_fall_back_to_the_relay_and_the_request_succeeds(
    nat_topology_factory: Callable[..., NatTopology], nat_a: NatMode, nat_b: NatMode
) -> None:
    result = _run_case(nat_topology_factory, nat_a, nat_b)
    assert result["path"] == "relayed", result
    assert result["seconds"] < 5.0, result
