"""Prometheus exposition of overlay statistics: the text format, the collector, the ASGI app.

Real nodes on 127.0.0.1 (asyncio and trio) exchange data, and what they
export is read back with a strict parser of the text format 0.0.4 written
here (and with prometheus_client's own parser when it is installed).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from overlay_httpx import (
    Address,
    Identity,
    Node,
    NodeStatistics,
    OverlayTransport,
    Rendezvous,
    RendezvousStatistics,
    serve,
)
from overlay_httpx._metrics import (
    CONTENT_TYPE,
    OverlayCollector,
    RequestCounter,
    metrics_app,
    prometheus_text,
)
from overlay_httpx._protocol._stats import TunnelStatistics

pytestmark = pytest.mark.anyio

Labels = frozenset[tuple[str, str]]

TUNNEL_COUNTERS = (
    "overlay_tunnel_packets_sent_total",
    "overlay_tunnel_packets_received_total",
    "overlay_tunnel_packets_lost_total",
    "overlay_tunnel_frames_retransmitted_total",
    "overlay_tunnel_bytes_sent_total",
    "overlay_tunnel_bytes_received_total",
    "overlay_tunnel_handshakes_total",
    "overlay_tunnel_rekeys_total",
    "overlay_tunnel_path_changes_total",
)


# -- a strict parser of the text format 0.0.4 --------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'  # only \\, \" and \n are escapes
_SAMPLE = re.compile(
    rf"(?P<name>{_NAME})"
    rf"(?:\{{(?P<labels>(?:{_LABEL}={_VALUE}(?:,{_LABEL}={_VALUE})*)?)\}})?"
    r" (?P<value>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|Inf|NaN))"
    r"(?: -?\d+)?"
)
_PAIR = re.compile(rf"({_LABEL})=({_VALUE})")
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclasses.dataclass
class Family:
    type: str | None = None
    help: str | None = None
    samples: dict[Labels, float] = dataclasses.field(default_factory=dict)


def _unescape(quoted: str) -> str:
    return re.sub(r"\\[\\\"n]", lambda m: _ESCAPES[m.group()], quoted[1:-1])


def parse(text: str) -> dict[str, Family]:
    """Every family of an exposition, failing on anything the format does not allow
    (or that Prometheus would refuse: duplicate series, a family split in two)."""
    assert text.endswith("\n"), "the exposition ends with a line feed"
    families: dict[str, Family] = {}
    current: str | None = None
    finished: set[str] = set()

    def enter(name: str) -> Family:
        nonlocal current
        if name != current:
            assert name not in finished, f"family {name} is split"
            if current is not None:
                finished.add(current)
            current = name
        return families.setdefault(name, Family())

    for line in text[:-1].split("\n"):
        assert line, "no blank lines"
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                assert re.fullmatch(_NAME, name), line
                family = enter(name)
                assert not family.samples, f"{parts[1]} of {name} after its samples"
                rest = parts[3] if len(parts) == 4 else ""
                if parts[1] == "HELP":
                    assert family.help is None, f"second HELP for {name}"
                    assert re.fullmatch(r"(?:[^\\]|\\[\\n])*", rest), line
                    family.help = rest.replace("\\n", "\n").replace("\\\\", "\\")
                else:
                    assert family.type is None, f"second TYPE for {name}"
                    assert rest in ("counter", "gauge", "histogram", "summary", "untyped"), line
                    family.type = rest
            continue
        match = _SAMPLE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name = match["name"]
        family = enter(name)
        labels: Labels = frozenset(
            (key, _unescape(value)) for key, value in _PAIR.findall(match["labels"] or "")
        )
        assert len(labels) == len(_PAIR.findall(match["labels"] or "")), f"repeated label {line}"
        assert labels not in family.samples, f"duplicate series: {line}"
        family.samples[labels] = float(match["value"].replace("Inf", "inf"))
    return families


def value(families: dict[str, Family], name: str, **labels: str) -> float:
    return families[name].samples[frozenset(labels.items())]


# -- nodes -------------------------------------------------------------------------------------


@asynccontextmanager
async def node_pair() -> AsyncIterator[tuple[Node, Node]]:
    async with Node(Identity.generate()) as a, Node(Identity.generate()) as b:
        a.add_peer(b.address, b.public, b.endpoint)
        b.add_peer(a.address, a.public, a.endpoint)
        yield a, b


async def exchange(a: Node, b: Node, size: int = 64 * 1024) -> None:
    """`size` bytes from a to b and back, on one stream."""
    listener = await b.listen(7)

    async def echo_once() -> None:
        stream = await listener.accept()
        async with stream:
            received = 0
            while received < size:
                data = await stream.receive()
                received += len(data)
                await stream.send(data)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(echo_once)
            async with await a.connect(b.address, 7) as stream:
                await stream.send(b"m" * size)
                received = 0
                while received < size:
                    received += len(await stream.receive())
    listener.close()


def tunnel(peer_address: Address | None, key: bytes, **changes: Any) -> TunnelStatistics:
    fields: dict[str, Any] = {
        "peer": key,
        "peer_address": peer_address,
        "remote_addr": ("127.0.0.1", 1),
        "state": "established",
        "smoothed_rtt": 0.25,
        "min_rtt": 0.2,
        "latest_rtt": 0.25,
        "rttvar": 0.01,
        "congestion_window": 12000,
        "bytes_in_flight": 0,
        "packets_sent": 3,
        "packets_received": 4,
        "bytes_sent": 300,
        "bytes_received": 400,
        "packets_lost": 1,
        "frames_retransmitted": 2,
        "streams": 0,
        "handshakes": 1,
        "rekeys": 0,
        "path_changes": 0,
    }
    fields.update(changes)
    return TunnelStatistics(**fields)


NODE = Address(1, 7)


def synthetic(address: Address = NODE, **changes: Any) -> NodeStatistics:
    fields: dict[str, Any] = {
        "address": address,
        "endpoint": ("127.0.0.1", 4000),
        "receive_buffer": 1,
        "send_buffer": 1,
        "max_datagram_size": 1200,
        "tunnels": (),
        "streams": 0,
        "listeners": (),
        "datagrams_received": 10,
        "datagrams_sent": 11,
        "drops": {},
        "send_errors": {},
    }
    fields.update(changes)
    return NodeStatistics(**fields)


# -- the text ----------------------------------------------------------------------------------


async def test_a_node_pair_exports_its_tunnels_and_datagrams() -> None:
    async with node_pair() as (a, b):
        await exchange(a, b)
        live = parse(prometheus_text(a, b))
        stats = {a.address: a.statistics(), b.address: b.statistics()}
        text = prometheus_text(*stats.values())
    families = parse(text)
    assert set(live) == set(families)

    for name in ("overlay_tunnels", "overlay_streams", "overlay_tunnel_smoothed_rtt_seconds"):
        assert families[name].type == "gauge"
    for name in (
        "overlay_datagrams_received_total",
        "overlay_datagrams_sent_total",
        *TUNNEL_COUNTERS,
    ):
        assert families[name].type == "counter", name
    for name, family in families.items():
        assert name.startswith("overlay_")
        assert family.help, name
        assert family.type == "counter" if name.endswith("_total") else "gauge"
        for labels in family.samples:
            assert dict(labels)["node"] in {str(a.address), str(b.address)}
    assert "overlay_rendezvous_registered_nodes" not in families  # no rendezvous given
    assert "overlay_registered" not in families  # nodes without a rendezvous

    for node, peer in ((a, b), (b, a)):
        n, p = str(node.address), str(peer.address)
        [tunnel_stats] = stats[node.address].tunnels
        assert value(families, "overlay_tunnels", node=n, path="direct") == 1
        assert value(families, "overlay_tunnels", node=n, path="relayed") == 0
        assert value(families, "overlay_datagrams_sent_total", node=n) > 0
        assert value(families, "overlay_datagrams_received_total", node=n) > 0
        assert value(families, "overlay_streams", node=n) == stats[node.address].streams
        assert value(families, "overlay_tunnel_bytes_sent_total", node=n, peer=p) >= 64 * 1024
        assert value(families, "overlay_tunnel_bytes_received_total", node=n, peer=p) >= 64 * 1024
        assert value(families, "overlay_tunnel_packets_sent_total", node=n, peer=p) > 0
        assert value(families, "overlay_tunnel_packets_lost_total", node=n, peer=p) >= 0
        assert value(families, "overlay_tunnel_handshakes_total", node=n, peer=p) == 1
        assert value(families, "overlay_tunnel_rekeys_total", node=n, peer=p) == 0
        for name in TUNNEL_COUNTERS:  # exactly the snapshot's figures
            attribute = name.removeprefix("overlay_tunnel_").removesuffix("_total")
            assert value(families, name, node=n, peer=p) == getattr(tunnel_stats, attribute)
    # the side that sent first has measured its RTT: a real, small figure
    rtt = value(
        families, "overlay_tunnel_smoothed_rtt_seconds", node=str(a.address), peer=str(b.address)
    )
    assert 0 < rtt < 1


async def test_a_rendezvous_exports_its_registry_and_relay() -> None:
    async with (
        Rendezvous() as rv,
        Node(Identity.generate(), rendezvous=rv.spec) as a,
    ):
        families = parse(prometheus_text(rv, a, rv.node))  # rv.node: already exported
        rv_node, n = str(rv.address), str(a.address)
        assert value(families, "overlay_rendezvous_registered_nodes", node=rv_node) == 1
        assert value(families, "overlay_rendezvous_connected_nodes", node=rv_node) == 1
        assert value(families, "overlay_rendezvous_relayed_datagrams_total", node=rv_node) == 0
        assert value(families, "overlay_rendezvous_relayed_bytes_total", node=rv_node) == 0
        assert value(families, "overlay_registered", node=n) == 1
        assert value(families, "overlay_tunnels", node=rv_node, path="direct") == 1
        assert families["overlay_rendezvous_relayed_bytes_total"].type == "counter"
        assert "overlay_rendezvous_relay_drops_total" not in families  # nothing dropped yet

        stats = rv.statistics()
        drops = {"rate": 3, "unknown peer": 1}
        faked = dataclasses.replace(
            stats, relayed_datagrams=5, relayed_bytes=6000, relay_drops=drops
        )
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(rv, "statistics", lambda: faked)
            families = parse(prometheus_text(rv))
        assert value(families, "overlay_rendezvous_relayed_datagrams_total", node=rv_node) == 5
        assert value(families, "overlay_rendezvous_relayed_bytes_total", node=rv_node) == 6000
        for reason, count in drops.items():
            assert (
                value(families, "overlay_rendezvous_relay_drops_total", node=rv_node, reason=reason)
                == count
            )
        assert isinstance(faked, RendezvousStatistics)


async def test_closed_repeated_and_wrong_sources() -> None:
    async with node_pair() as (a, b):
        text = prometheus_text(a, a, a.statistics(), b)
        assert prometheus_text(a) != ""
    families = parse(text)
    assert {dict(labels)["node"] for labels in families["overlay_streams"].samples} == {
        str(a.address),
        str(b.address),
    }
    assert prometheus_text(a, b) == ""  # closed: left out, not an error
    assert prometheus_text(Node(Identity.generate())) == ""  # never started
    with pytest.raises(TypeError, match="expected a Node, Rendezvous or NodeStatistics"):
        prometheus_text("1:0001.0001.0001")  # type: ignore[arg-type]


def test_label_values_are_escaped_and_tunnels_get_distinct_peers() -> None:
    odd = 'quote" back\\slash\nnewline ✓'
    peer = Address(1, 9)
    stats = synthetic(
        drops={odd: 2, "malformed": 1},
        send_errors={"EAGAIN": 4},
        tunnels=(
            tunnel(peer, b"\x01" * 32),
            tunnel(peer, b"\x02" * 32, path="relayed"),  # two keys claiming one address
            tunnel(None, b"\x03" * 32, latest_rtt=None, smoothed_rtt=0.1),  # no sample yet
        ),
    )
    text = prometheus_text(stats)
    node = str(stats.address)
    escaped = 'quote\\" back\\\\slash\\nnewline ✓'
    assert f'overlay_datagram_drops_total{{node="{node}",reason="{escaped}"}} 2\n' in text
    families = parse(text)
    assert value(families, "overlay_datagram_drops_total", node=node, reason=odd) == 2
    assert value(families, "overlay_datagram_drops_total", node=node, reason="malformed") == 1
    assert value(families, "overlay_send_errors_total", node=node, errno="EAGAIN") == 4
    assert value(families, "overlay_tunnels", node=node, path="direct") == 2
    assert value(families, "overlay_tunnels", node=node, path="relayed") == 1
    peers = {dict(labels)["peer"] for labels in families["overlay_tunnel_bytes_sent_total"].samples}
    assert peers == {str(peer), f"{peer}/{'02' * 8}", "03" * 32}
    rtts = families["overlay_tunnel_smoothed_rtt_seconds"].samples
    assert sorted(rtts.values()) == [0.25, 0.25]  # not the third tunnel's initial RTT
    assert value(families, "overlay_tunnel_packets_lost_total", node=node, peer=str(peer)) == 1


def test_prometheus_client_parses_the_text_the_same_way() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    stats = synthetic(
        drops={'a"b\\c\nd': 2}, tunnels=(tunnel(Address(1, 2), b"\x05" * 32, smoothed_rtt=1e-05),)
    )
    text = prometheus_text(stats, synthetic(Address(1, 8), datagrams_sent=2**53))
    ours = parse(text)
    theirs: dict[str, dict[Labels, float]] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            theirs.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    assert theirs == {name: family.samples for name, family in ours.items()}


# -- prometheus_client -------------------------------------------------------------------------


def test_collector_exports_what_the_text_does() -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    counter = RequestCounter(_ok_app)
    counter._count("GET", "2xx")
    first, second = (
        synthetic(tunnels=(tunnel(Address(1, 2), b"\x05" * 32),)),
        synthetic(Address(1, 8), drops={"bad_mac": 3}),
    )
    collector = OverlayCollector(first, requests=counter)
    collector.add(second, first)
    assert collector.sources == (first, second)
    registry = CollectorRegistry()
    registry.register(collector)
    exported = generate_latest(registry).decode()
    expected = parse(prometheus_text(first, second, requests=counter))

    got: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(exported):
        assert family.type == expected[family.samples[0].name].type
        for sample in family.samples:
            got.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    assert got == {name: family.samples for name, family in expected.items()}

    collector.remove(second)
    nodes = {
        labels["node"]
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for labels in (sample.labels for sample in family.samples)
        if "node" in labels
    }
    assert nodes == {str(first.address)}


def test_collector_without_prometheus_client_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.setitem(sys.modules, "prometheus_client.core", None)
    with pytest.raises(ImportError, match="pip install prometheus-client") as info:
        OverlayCollector(synthetic())
    assert "\n" not in str(info.value)


# -- ASGI: RequestCounter and metrics_app ------------------------------------------------------


async def _ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _call(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def _http(method: str) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": "/", "headers": []}


async def test_request_counter_classes_statuses_and_failures() -> None:
    async def failing(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    async def silent(scope: dict[str, Any], receive: Any, send: Any) -> None:
        return

    async def odd_status(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 999, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    seen: list[str] = []

    async def lifespan_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    counter = RequestCounter(_ok_app)
    await _call(counter, _http("GET"))
    await _call(counter, _http("post"))
    await _call(counter, _http("BREW"))
    for app in (failing, silent, odd_status):
        counter.app = app
        if app is failing:
            with pytest.raises(RuntimeError, match="boom"):
                await _call(counter, _http("PUT"))
        else:
            await _call(counter, _http("PUT"))
    counter.app = lifespan_app
    await _call(counter, {"type": "lifespan"})
    assert seen == ["lifespan"]
    assert counter.counts() == {
        ("GET", "2xx"): 1,
        ("POST", "2xx"): 1,
        ("OTHER", "2xx"): 1,
        ("PUT", "5xx"): 2,
        ("PUT", "other"): 1,
    }
    families = parse(prometheus_text(requests=counter))
    assert set(families) == {"overlay_http_requests_total"}
    assert value(families, "overlay_http_requests_total", method="PUT", status="5xx") == 2


async def test_metrics_app_on_its_own_answers_get_head_and_lifespan() -> None:
    app = metrics_app(synthetic())
    [start, body] = await _call(app, _http("GET"))
    assert start["status"] == 200
    assert (b"content-type", CONTENT_TYPE.encode()) in start["headers"]
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
    assert (b"content-length", str(len(body["body"])).encode()) in start["headers"]
    parse(body["body"].decode())
    [start, _] = await _call(app, _http("DELETE"))
    assert start["status"] == 405
    assert (b"allow", b"GET, HEAD") in start["headers"]

    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_metrics_served_through_the_overlay_and_requests_counted() -> None:
    api = FastAPI()

    @api.post("/v1/echo")
    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        return body

    @api.get("/health", response_class=PlainTextResponse)
    async def health() -> str:
        return "ok"

    counter = RequestCounter(api)
    metrics = metrics_app(requests=counter)  # the node comes later, as in a real service
    api.mount("/metrics", metrics)

    async with node_pair() as (server, client_node), anyio.create_task_group() as tg:
        metrics.add(server)
        await tg.start(serve, counter, server)
        base = f"http://{server.address.host}"
        transport = OverlayTransport(client_node)
        with anyio.fail_after(10):
            async with httpx.AsyncClient(transport=transport, base_url=base) as client:
                assert (await client.post("/v1/echo", json={"x": 1})).status_code == 200
                assert (await client.get("/nowhere")).status_code == 404
                r = await client.get("/metrics/")
                assert r.status_code == 200
                assert r.headers["content-type"] == CONTENT_TYPE
                families = parse(r.text)
                # /metrics itself is counted once its response has started: not in its own text
                requests = families["overlay_http_requests_total"].samples
                assert requests == {
                    frozenset({("method", "POST"), ("status", "2xx")}): 1,
                    frozenset({("method", "GET"), ("status", "4xx")}): 1,
                }
                n, p = str(server.address), str(client_node.address)
                assert value(families, "overlay_tunnels", node=n, path="direct") == 1
                assert value(families, "overlay_tunnel_bytes_received_total", node=n, peer=p) > 0
                assert value(families, "overlay_streams", node=n) >= 1  # this request's

                r = await client.get("/metrics", follow_redirects=True)  # Prometheus follows
                assert r.status_code == 200
                families = parse(r.text)
                assert (
                    value(families, "overlay_http_requests_total", method="GET", status="2xx") == 1
                )
                head = await client.head("/metrics/")
                assert head.status_code == 200
                assert head.content == b""
                assert int(head.headers["content-length"]) > 0
                assert (await client.post("/metrics/")).status_code == 405
                assert (await client.get("/health")).text == "ok"
        assert counter.counts() == {
            ("POST", "2xx"): 1,
            ("GET", "4xx"): 1,
            ("GET", "2xx"): 3,  # /metrics/ twice, /health
            ("GET", "3xx"): 1,  # Starlette's redirect of /metrics to /metrics/
            ("HEAD", "2xx"): 1,
            ("POST", "4xx"): 1,  # 405 from the metrics app
        }
        tg.cancel_scope.cancel()


async def test_metrics_app_served_alone_on_its_own_port() -> None:
    async with node_pair() as (server, client_node), anyio.create_task_group() as tg:
        app = metrics_app(server, client_node)
        await tg.start(functools.partial(serve, app, server, port=9100, lifespan="on"))
        with anyio.fail_after(10):
            async with httpx.AsyncClient(transport=OverlayTransport(client_node)) as client:
                r = await client.get(f"http://{server.address.host}:9100/anything")
        assert r.status_code == 200
        families = parse(r.text)
        assert {dict(labels)["node"] for labels in families["overlay_streams"].samples} == {
            str(server.address),
            str(client_node.address),
        }
        tg.cancel_scope.cancel()
