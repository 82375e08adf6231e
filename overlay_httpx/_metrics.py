"""Prometheus metrics for nodes, rendezvous servers and ASGI apps on the overlay.

What: the `statistics()` snapshots of `Node` and `Rendezvous` (tunnels and
their RTT, loss, retransmissions, bytes, handshakes, rekeys and path changes;
datagrams, drops, send errors; the relay's traffic and drops), rendered in
the Prometheus text exposition format 0.0.4, plus a count of HTTP requests by
method and status class. Why: an overlay is only as good as what can be seen
of it, and Prometheus is what model-serving fleets already scrape. The
library does not depend on ``prometheus_client``: `prometheus_text` and
`metrics_app` need nothing; `OverlayCollector` is for processes that already
use ``prometheus_client`` (``pip install prometheus-client``).

Every series carries a ``node`` label, the overlay address of the node it
describes (for a `Rendezvous`, its own node), so one process can export
several nodes; per-tunnel series add ``peer``, the peer's overlay address.
Counters are cumulative since the node (or, per tunnel, the tunnel) started;
a tunnel made again after its peer restarted starts from zero, which
Prometheus' ``rate()`` reads as a counter reset. A node that is not running
(not yet entered, or closed) is left out, so a scrape during shutdown answers
with what is left instead of failing.

Serving ``/metrics`` next to a FastAPI app (on the overlay with `serve`, or
on uvicorn)::

    counter = RequestCounter(app)            # counts what reaches `app`
    metrics = metrics_app(requests=counter)  # sources can be added later
    app.mount("/metrics", metrics)           # GET /metrics/ (or /metrics, see below)
    async with Node(identity) as node:
        metrics.add(node)
        await serve(counter, node)           # serve the counting wrapper, not `app`

or, when the node exists before the app, ``app.mount("/metrics",
metrics_app(node, requests=counter))``. Starlette answers ``/metrics`` with a
redirect to ``/metrics/``, which Prometheus follows. `metrics_app` answers
``GET`` and ``HEAD`` on any path it is given, so it can also be served on its
own port: ``await serve(metrics_app(node), node, port=9100)``.

With ``prometheus_client``::

    from prometheus_client import REGISTRY
    REGISTRY.register(OverlayCollector(node, rendezvous, requests=counter))

Register all nodes with one collector: two collectors naming the same node
would export the same series twice.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

from ._asgi._types import ASGIApp, Message, Receive, Scope, Send
from ._exceptions import OverlayError
from ._node import Node, NodeStatistics
from ._rendezvous import Rendezvous, RendezvousStatistics

__all__ = [
    "CONTENT_TYPE",
    "MetricsApp",
    "OverlayCollector",
    "RequestCounter",
    "Source",
    "metrics_app",
    "prometheus_text",
]

#: the Content-Type of the text exposition format 0.0.4
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

Source: TypeAlias = Node | Rendezvous | NodeStatistics
"""What can be exported: a running node or rendezvous, or a node's statistics snapshot."""

_Kind = Literal["counter", "gauge"]

_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)


@dataclass(frozen=True, slots=True)
class _Spec:
    name: str
    kind: _Kind
    help: str
    labels: tuple[str, ...]


def _spec(name: str, kind: _Kind, help: str, *labels: str) -> _Spec:
    return _Spec(name, kind, help, labels)


# Families in exposition order. Names are final: dashboards depend on them.
_TUNNELS: Final = _spec(
    "overlay_tunnels",
    "gauge",
    'Tunnels of the node, by path ("direct", or "relayed" through the rendezvous).',
    "node",
    "path",
)
_STREAMS: Final = _spec("overlay_streams", "gauge", "Overlay streams open on the node.", "node")
_DATAGRAMS_RECEIVED: Final = _spec(
    "overlay_datagrams_received_total", "counter", "UDP datagrams received.", "node"
)
_DATAGRAMS_SENT: Final = _spec(
    "overlay_datagrams_sent_total", "counter", "UDP datagrams sent.", "node"
)
_DROPS: Final = _spec(
    "overlay_datagram_drops_total",
    "counter",
    "UDP datagrams dropped before reaching a tunnel, by reason.",
    "node",
    "reason",
)
_SEND_ERRORS: Final = _spec(
    "overlay_send_errors_total",
    "counter",
    "UDP datagrams the kernel refused to send (counted as loss), by errno name.",
    "node",
    "errno",
)
_REGISTERED: Final = _spec(
    "overlay_registered",
    "gauge",
    "1 while the node is registered with its rendezvous (nodes without one have no series).",
    "node",
)
_RTT: Final = _spec(
    "overlay_tunnel_smoothed_rtt_seconds",
    "gauge",
    "Smoothed round-trip time of the tunnel (no series before the first sample).",
    "node",
    "peer",
)
_TUNNEL_COUNTERS: Final = (
    (
        "packets_sent",
        _spec("overlay_tunnel_packets_sent_total", "counter", "Packets sent.", "node", "peer"),
    ),
    (
        "packets_received",
        _spec(
            "overlay_tunnel_packets_received_total", "counter", "Packets received.", "node", "peer"
        ),
    ),
    (
        "packets_lost",
        _spec(
            "overlay_tunnel_packets_lost_total",
            "counter",
            "Packets declared lost by loss recovery.",
            "node",
            "peer",
        ),
    ),
    (
        "frames_retransmitted",
        _spec(
            "overlay_tunnel_frames_retransmitted_total",
            "counter",
            "Frames sent again after their packet was lost.",
            "node",
            "peer",
        ),
    ),
    (
        "bytes_sent",
        _spec("overlay_tunnel_bytes_sent_total", "counter", "Bytes sent.", "node", "peer"),
    ),
    (
        "bytes_received",
        _spec("overlay_tunnel_bytes_received_total", "counter", "Bytes received.", "node", "peer"),
    ),
    (
        "handshakes",
        _spec(
            "overlay_tunnel_handshakes_total",
            "counter",
            "Noise handshakes completed.",
            "node",
            "peer",
        ),
    ),
    (
        "rekeys",
        _spec("overlay_tunnel_rekeys_total", "counter", "Session rekeys.", "node", "peer"),
    ),
    (
        "path_changes",
        _spec(
            "overlay_tunnel_path_changes_total",
            "counter",
            "Changes of the peer's UDP endpoint or between direct and relayed paths.",
            "node",
            "peer",
        ),
    ),
)
_RV_REGISTERED: Final = _spec(
    "overlay_rendezvous_registered_nodes",
    "gauge",
    "Nodes with a live registration at the rendezvous.",
    "node",
)
_RV_CONNECTED: Final = _spec(
    "overlay_rendezvous_connected_nodes",
    "gauge",
    "Nodes with an open control stream to the rendezvous.",
    "node",
)
_RV_RELAYED_DATAGRAMS: Final = _spec(
    "overlay_rendezvous_relayed_datagrams_total",
    "counter",
    "Datagrams the rendezvous relayed between nodes.",
    "node",
)
_RV_RELAYED_BYTES: Final = _spec(
    "overlay_rendezvous_relayed_bytes_total",
    "counter",
    "Bytes the rendezvous relayed between nodes.",
    "node",
)
_RV_DROPS: Final = _spec(
    "overlay_rendezvous_relay_drops_total",
    "counter",
    "Datagrams the relay refused, by reason.",
    "node",
    "reason",
)
_HTTP_REQUESTS: Final = _spec(
    "overlay_http_requests_total",
    "counter",
    "HTTP requests answered by the app, by method and status class.",
    "method",
    "status",
)
_ORDER: Final = (
    _TUNNELS,
    _STREAMS,
    _DATAGRAMS_RECEIVED,
    _DATAGRAMS_SENT,
    _DROPS,
    _SEND_ERRORS,
    _REGISTERED,
    _RTT,
    *(spec for _, spec in _TUNNEL_COUNTERS),
    _RV_REGISTERED,
    _RV_CONNECTED,
    _RV_RELAYED_DATAGRAMS,
    _RV_RELAYED_BYTES,
    _RV_DROPS,
    _HTTP_REQUESTS,
)


@dataclass(slots=True)
class _Family:
    spec: _Spec
    samples: list[tuple[tuple[str, ...], float]] = field(default_factory=list)


class _Families:
    """The families of one scrape, filled in source order; empty ones are not exported."""

    def __init__(self) -> None:
        self._by_spec = {spec: _Family(spec) for spec in _ORDER}

    def add(self, spec: _Spec, labels: tuple[str, ...], value: float) -> None:
        self._by_spec[spec].samples.append((labels, value))

    def __iter__(self) -> Iterator[_Family]:
        return (family for family in self._by_spec.values() if family.samples)


def _snapshot(source: Source) -> tuple[NodeStatistics, RendezvousStatistics | None] | None:
    """Statistics of a source, or None when it is not running."""
    if isinstance(source, NodeStatistics):
        return source, None
    try:
        if isinstance(source, Rendezvous):
            node = source.node.statistics()  # first: refuses unless running
            return node, source.statistics()
        if isinstance(source, Node):
            return source.statistics(), None
    except OverlayError:
        return None
    raise TypeError(f"metrics source {source!r}: expected a Node, Rendezvous or NodeStatistics")


def _peer_labels(stats: NodeStatistics) -> list[str]:
    """One distinct peer label per tunnel: its overlay address, made unique if need be
    (a duplicated series would make Prometheus refuse the whole scrape)."""
    labels: list[str] = []
    seen: set[str] = set()
    for tunnel in stats.tunnels:
        label = str(tunnel.peer_address) if tunnel.peer_address is not None else tunnel.peer.hex()
        if label in seen:
            label = f"{label}/{tunnel.peer.hex()[:16]}"
        seen.add(label)
        labels.append(label)
    return labels


def _collect(sources: Iterable[Source], requests: RequestCounter | None) -> _Families:
    families = _Families()
    done: set[str] = set()
    for source in sources:
        snapshot = _snapshot(source)
        if snapshot is None:
            continue
        stats, rendezvous = snapshot
        node = str(stats.address)
        if node in done:  # the same node twice (say a Rendezvous and its .node)
            continue
        done.add(node)
        _add_node(families, node, stats)
        if rendezvous is not None:
            _add_rendezvous(families, node, rendezvous)
    if requests is not None:
        for (method, status), count in sorted(requests.counts().items()):
            families.add(_HTTP_REQUESTS, (method, status), count)
    return families


def _add_node(families: _Families, node: str, stats: NodeStatistics) -> None:
    by_path = {"direct": 0, "relayed": 0}
    for tunnel in stats.tunnels:
        by_path[tunnel.path] = by_path.get(tunnel.path, 0) + 1
    for path, count in by_path.items():
        families.add(_TUNNELS, (node, path), count)
    families.add(_STREAMS, (node,), stats.streams)
    families.add(_DATAGRAMS_RECEIVED, (node,), stats.datagrams_received)
    families.add(_DATAGRAMS_SENT, (node,), stats.datagrams_sent)
    for reason, count in sorted(stats.drops.items()):
        families.add(_DROPS, (node, reason), count)
    for errno, count in sorted(stats.send_errors.items()):
        families.add(_SEND_ERRORS, (node, errno), count)
    if stats.rendezvous is not None:
        families.add(_REGISTERED, (node,), 1 if stats.registered else 0)
    for peer, tunnel in zip(_peer_labels(stats), stats.tunnels, strict=True):
        # Until its first sample a tunnel reports the initial RTT (RFC 9002), not a measurement.
        if tunnel.smoothed_rtt is not None and tunnel.latest_rtt is not None:
            families.add(_RTT, (node, peer), tunnel.smoothed_rtt)
        for attribute, spec in _TUNNEL_COUNTERS:
            families.add(spec, (node, peer), getattr(tunnel, attribute))


def _add_rendezvous(families: _Families, node: str, stats: RendezvousStatistics) -> None:
    families.add(_RV_REGISTERED, (node,), stats.registered)
    families.add(_RV_CONNECTED, (node,), stats.connected)
    families.add(_RV_RELAYED_DATAGRAMS, (node,), stats.relayed_datagrams)
    families.add(_RV_RELAYED_BYTES, (node,), stats.relayed_bytes)
    for reason, count in sorted(stats.relay_drops.items()):
        families.add(_RV_DROPS, (node, reason), count)


# -- the text format ---------------------------------------------------------------------------


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: float) -> str:
    if isinstance(value, int):  # bool included
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def prometheus_text(*sources: Source, requests: RequestCounter | None = None) -> str:
    """The Prometheus text exposition (format 0.0.4) of `sources` and `requests`.

    ::

        print(prometheus_text(node), end="")

    Sources that are not running are left out; a node given twice (a
    `Rendezvous` and its ``.node``, say) is exported once.
    """
    lines: list[str] = []
    for family in _collect(sources, requests):
        spec = family.spec
        lines.append(f"# HELP {spec.name} {_escape_help(spec.help)}")
        lines.append(f"# TYPE {spec.name} {spec.kind}")
        for values, value in family.samples:
            labels = ",".join(
                f'{name}="{_escape_label(label)}"'
                for name, label in zip(spec.labels, values, strict=True)
            )
            lines.append(f"{spec.name}{{{labels}}} {_format_value(value)}")
    return "".join(line + "\n" for line in lines)


# -- sources that can change -------------------------------------------------------------------


class _Sources:
    """Sources given now or later: a node often starts after the app that exports it."""

    def __init__(self, sources: Iterable[Source], requests: RequestCounter | None) -> None:
        self._sources: list[Source] = list(sources)
        self.requests = requests

    def add(self, *sources: Source) -> None:
        """Export these too (a source already exported is not added twice)."""
        for source in sources:
            if not any(source is known for known in self._sources):
                self._sources.append(source)

    def remove(self, source: Source) -> None:
        """Stop exporting `source` (nothing happens if it was not exported)."""
        self._sources = [known for known in self._sources if known is not source]

    @property
    def sources(self) -> tuple[Source, ...]:
        return tuple(self._sources)

    def text(self) -> str:
        """The exposition text as of now."""
        return prometheus_text(*self._sources, requests=self.requests)


# -- prometheus_client -------------------------------------------------------------------------


class OverlayCollector(_Sources):
    """A ``prometheus_client`` collector of the same metrics as `prometheus_text`.

    ::

        REGISTRY.register(OverlayCollector(node, requests=counter))

    ``prometheus_client`` is imported here, not by the library; without it,
    constructing a collector raises ImportError.
    """

    def __init__(self, *sources: Source, requests: RequestCounter | None = None) -> None:
        try:
            self._core: Any = importlib.import_module("prometheus_client.core")
        except ImportError:
            raise ImportError(
                "OverlayCollector needs prometheus_client: pip install prometheus-client"
            ) from None
        super().__init__(sources, requests)

    def describe(self) -> list[Any]:
        """Nothing up front: the series depend on the tunnels of the moment, and
        describing nothing keeps registration from scraping the nodes."""
        return []

    def collect(self) -> Iterator[Any]:
        """One ``GaugeMetricFamily`` or ``CounterMetricFamily`` per exported family."""
        core = self._core
        for family in _collect(self._sources, self.requests):
            spec = family.spec
            if spec.kind == "counter":
                metric = core.CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
            else:
                metric = core.GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
            for values, value in family.samples:
                metric.add_metric(list(values), value)
            yield metric


# -- ASGI --------------------------------------------------------------------------------------


class RequestCounter:
    """ASGI middleware counting the app's HTTP requests by method and status class.

    ::

        counter = RequestCounter(app)
        await serve(counter, node)   # or uvicorn.run(counter)

    exported as ``overlay_http_requests_total{method="POST",status="2xx"}``
    by `metrics_app`, `prometheus_text` and `OverlayCollector` (``requests=``).
    A request counts once, when its response starts; an app that fails
    before starting one counts as "5xx" (the server answers 500), a request
    cancelled before that (the client left) is not counted. Methods outside
    the standard nine count as "OTHER", so clients cannot grow the label set.
    Lifespan and websocket scopes pass through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._counts: dict[tuple[str, str], int] = {}

    def counts(self) -> dict[tuple[str, str], int]:
        """A snapshot: ``{(method, status class): requests}``."""
        return dict(self._counts)

    def _count(self, method: str, status: str) -> None:
        key = (method, status)
        self._counts[key] = self._counts.get(key, 0) + 1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = str(scope.get("method", "")).upper()
        if method not in _METHODS:
            method = "OTHER"
        counted = False

        async def counting_send(message: Message) -> None:
            nonlocal counted
            if message["type"] == "http.response.start" and not counted:
                counted = True
                status = message.get("status")
                if isinstance(status, int) and 100 <= status <= 599:
                    self._count(method, f"{status // 100}xx")
                else:
                    self._count(method, "other")
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not counted:
                counted = True
                self._count(method, "5xx")
            raise
        if not counted:  # returned without a response: the server answers 500
            self._count(method, "5xx")


class MetricsApp(_Sources):
    """An ASGI 3 app answering ``GET`` (and ``HEAD``) with the metrics text; see `metrics_app`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            return  # websocket: closing without accepting refuses it
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b"only GET and HEAD\n", [(b"allow", b"GET, HEAD")])
            return
        # As Starlette does for HEAD: the server drops the body, keeping its length.
        body = self.text().encode()
        await _respond(send, 200, body, [(b"content-type", CONTENT_TYPE.encode())])


def metrics_app(*sources: Source, requests: RequestCounter | None = None) -> MetricsApp:
    """An ASGI 3 app serving `prometheus_text` of `sources` (and `requests`), for ``/metrics``.

    ::

        app.mount("/metrics", metrics_app(node, requests=counter))   # FastAPI, Starlette

    Sources can be added later with ``.add(node)``. Every path gets the
    metrics (mount it where they belong); methods other than GET and HEAD
    get 405.
    """
    return MetricsApp(sources, requests)


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Served on its own, the metrics app has nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
