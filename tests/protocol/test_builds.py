"""What the pure-Python and the mypyc-compiled builds of the tunnel core must do alike.

The compiled core checks argument types at every function boundary and its
frozen classes do not pickle; these are the places where a user's value or a
snapshot crosses into or out of it. CI runs this file on both builds.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _build import COMPILED, child_env
from _harness import B_ADDR, echo_round_trip, make_pair

from overlay_httpx import Identity, LocalProtocolError, Node
from overlay_httpx._protocol._config import TunnelConfig
from overlay_httpx._protocol._endpoint import Endpoint


def test_tunnel_and_endpoint_statistics_pickle_and_copy() -> None:
    net, a, b = make_pair()
    echo_round_trip(net, a, b)
    tunnel = a.endpoint.tunnel(b.endpoint.public)
    assert tunnel is not None
    for snapshot in (tunnel.statistics(), a.endpoint.statistics()):
        assert pickle.loads(pickle.dumps(snapshot)) == snapshot
        assert copy.deepcopy(snapshot) == snapshot
        assert copy.copy(snapshot) == snapshot
        assert dataclasses.replace(snapshot) == snapshot
    config = TunnelConfig(idle_timeout=60)
    assert pickle.loads(pickle.dumps(config)) == config


def test_an_int_is_a_fine_number_of_seconds() -> None:
    config = TunnelConfig(idle_timeout=60, keepalive=20, handshake_timeout=2)
    assert config.idle_timeout == 60.0
    assert isinstance(config.idle_timeout, float)
    assert isinstance(config.keepalive, float)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"persistent_keepalive": 1}, "persistent_keepalive=1: expected True or False"),
        ({"max_tunnels": 100.0}, "max_tunnels=100.0: expected a whole number below 2**62"),
        ({"max_tunnels": True}, "max_tunnels=True: expected a whole number below 2**62"),
        (
            {"max_tunnels": 2**62},
            "max_tunnels=4611686018427387904: expected a whole number below 2**62",
        ),
        ({"idle_timeout": "120"}, "idle_timeout='120': expected a finite number"),
        ({"idle_timeout": float("inf")}, "idle_timeout=inf: expected a finite number"),
        ({"idle_timeout": float("nan")}, "idle_timeout=nan: expected a finite number"),
        ({"keepalive": False}, "keepalive=False: expected a finite number"),
    ],
)
def test_a_value_of_the_wrong_type_is_one_clear_error(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        TunnelConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match=f"^{re.escape(message)}$"):
        Node(Identity.generate(), **kwargs)  # type: ignore[arg-type]


def test_an_integer_like_is_a_whole_number() -> None:
    class Index:
        def __index__(self) -> int:
            return 64

    config = TunnelConfig(max_streams=Index())  # type: ignore[arg-type]
    assert config.max_streams == 64
    assert type(config.max_streams) is int


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_a_datagram_need_not_be_bytes(kind: type) -> None:
    """`receive_datagram` never raises, whatever buffer type it is handed."""
    net, a, b = make_pair()
    tunnel = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    [(init, _)] = a.endpoint.datagrams_to_send(net.now)
    server: Endpoint = b.endpoint
    server.receive_datagram(kind(init), ("10.0.0.1", 4000), net.now)
    assert server.tunnel(a.endpoint.public) is not None  # the handshake was taken
    server.receive_datagram(kind(b"\x7f garbage"), ("10.0.0.1", 4000), net.now)
    assert server.statistics().drops["malformed"] == 1
    assert "internal_error" not in server.statistics().drops
    assert not tunnel.is_closed


def test_children_started_from_the_repository_run_the_build_under_test(tmp_path: Path) -> None:
    """`child_env` keeps a compiled build on PYTHONPATH ahead of the source tree for
    children that import the repository's modules (the pipeline demo, NAT nodes).
    Run from elsewhere: Python 3.10 has no PYTHONSAFEPATH, and there a child started
    in the repository still finds its source tree first."""
    code = "from overlay_httpx._protocol import COMPILED; print(COMPILED)"
    for argv in (
        [sys.executable, "-c", code],
        [sys.executable, "-m", "overlay_httpx", "--version"],
    ):
        done = subprocess.run(
            argv, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        out = done.stdout.strip()
        assert out in ("True", "False") or "tunnel core" in out, out
        assert (out == "True" or "(compiled tunnel core)" in out) == COMPILED, out
