"""The NAT topology behaves like home routers: raw UDP between namespaces, no overlay code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from _netns import NatMode, NatTopology, NsProcess

# A UDP agent: binds argv[1]:argv[2], prints {"ready": [ip, port]}, then answers JSON commands
# on stdin with one JSON line each. It always answers b"whoami?" with b"you:" + the sender's
# address as JSON, so it also serves as the rendezvous "whoami" server. Other datagrams go to
# an inbox. Exits when stdin closes.
AGENT = r"""
import json, os, select, socket, sys, time

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], int(sys.argv[2])))
inbox = []
observed = {}


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def handle():
    data, addr = sock.recvfrom(4096)
    if data == b"whoami?":
        sock.sendto(b"you:" + json.dumps(list(addr)).encode(), addr)
    elif data.startswith(b"you:"):
        observed[addr] = json.loads(data[4:])
    else:
        inbox.append([data.decode(), list(addr)])


def pump(until):
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return
        if select.select([sock], [], [], left)[0]:
            handle()


def whoami(to, timeout=2.0):
    to = tuple(to)
    observed.pop(to, None)
    deadline = time.monotonic() + timeout
    while to not in observed and time.monotonic() < deadline:
        sock.sendto(b"whoami?", to)
        pump(min(deadline, time.monotonic() + 0.1))
        while to not in observed and select.select([sock], [], [], 0)[0]:
            handle()
    return {"observed": observed.get(to)}


def send(to, payload, count=1, interval=0.0):
    for _ in range(count):
        sock.sendto(payload.encode(), tuple(to))
        pump(time.monotonic() + interval)
    return {"sent": count}


def take_inbox(wait=0.0):
    pump(time.monotonic() + wait)
    taken = list(inbox)
    inbox.clear()
    return {"inbox": taken}


def punch(to, duration=2.0, interval=0.05, linger=0.3):
    # Send to `to` every `interval` s until `linger` s after first hearing from it, or until
    # `duration` s have passed.
    start = time.monotonic()
    deadline = start + duration
    heard = None
    sent = 0
    while time.monotonic() < deadline:
        sock.sendto(b"punch", tuple(to))
        sent += 1
        pump(min(deadline, time.monotonic() + interval))
        if heard is None:
            for payload, addr in inbox:
                if addr == list(to):
                    heard = time.monotonic() - start
                    deadline = min(deadline, time.monotonic() + linger)
                    break
    return {"heard_after": heard, "sent": sent, "inbox": inbox[:]}


emit({"ready": list(sock.getsockname())})
commands = {"whoami": whoami, "send": send, "inbox": take_inbox, "punch": punch}
stdin = sys.stdin.fileno()
buffer = b""
while True:
    ready = select.select([sock, stdin], [], [])[0]
    if sock in ready:
        handle()
    if stdin in ready:
        chunk = os.read(stdin, 65536)
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            emit(commands[request.pop("op")](**request))
"""

READY_TIMEOUT = 5.0

Factory = Callable[..., NatTopology]


class Agent:
    def __init__(self, proc: NsProcess) -> None:
        self.proc = proc
        ready = proc.read_json(READY_TIMEOUT)["ready"]
        self.ip: str = ready[0]
        self.port: int = ready[1]

    @property
    def endpoint(self) -> list[Any]:
        return [self.ip, self.port]

    def call(self, op: str, timeout: float = 5.0, **args: Any) -> Any:
        return self.proc.request({"op": op, **args}, timeout)

    def start(self, op: str, **args: Any) -> None:
        self.proc.write_json({"op": op, **args})

    def result(self, timeout: float) -> Any:
        return self.proc.read_json(timeout)

    def whoami(self, server: Agent) -> list[Any]:
        observed = self.call("whoami", to=server.endpoint)["observed"]
        assert observed is not None, f"no whoami answer from {server.endpoint}"
        return list(observed)


def agent(topo: NatTopology, ns: str, ip: str, port: int = 0) -> Agent:
    return Agent(topo.spawn_python(ns, AGENT, ip, str(port)))


def outside_ip(topo: NatTopology, side: str, mode: NatMode) -> str:
    if side == "a":
        return topo.host_a_ip if mode is None else topo.router_a_public
    return topo.host_b_ip if mode is None else topo.router_b_public


@pytest.mark.parametrize("nat_a", ["preserve", "random", None])
def test_whoami_sees_the_router(nat_topology_factory: Factory, nat_a: NatMode) -> None:
    topo = nat_topology_factory(nat_a=nat_a)
    server = agent(topo, topo.pub, topo.rendezvous_ip)
    host_a = agent(topo, topo.host_a, topo.host_a_ip)

    observed = host_a.whoami(server)

    assert observed[0] == outside_ip(topo, "a", nat_a)
    if nat_a != "random":
        assert observed[1] == host_a.port


@pytest.mark.parametrize(("nat_a", "same_port"), [("preserve", True), ("random", False)])
def test_mapping_per_destination(
    nat_topology_factory: Factory, nat_a: NatMode, same_port: bool
) -> None:
    topo = nat_topology_factory(nat_a=nat_a)
    # Three servers: "random" picks each port at random, so two could collide (1 in 64k).
    servers = [agent(topo, topo.pub, topo.rendezvous_ip) for _ in range(3)]
    host_a = agent(topo, topo.host_a, topo.host_a_ip)

    observed = [host_a.whoami(server) for server in servers]

    assert {ip for ip, _ in observed} == {topo.router_a_public}
    ports = {port for _, port in observed}
    if same_port:
        assert ports == {host_a.port}
    else:
        assert len(ports) > 1, observed


@pytest.mark.parametrize("nat_a", ["preserve", "random"])
def test_unsolicited_inbound_is_dropped(nat_topology_factory: Factory, nat_a: NatMode) -> None:
    topo = nat_topology_factory(nat_a=nat_a)
    server = agent(topo, topo.pub, topo.rendezvous_ip)
    prober = agent(topo, topo.pub, topo.rendezvous_ip)
    host_a = agent(topo, topo.host_a, topo.host_a_ip)
    mapped = host_a.whoami(server)

    # The prober has never been sent anything by host A: its packets to the mapped port
    # (and to host A's own port) must be dropped at router A, not delivered and not recorded.
    targets = {tuple(mapped), (topo.router_a_public, host_a.port)}
    for target in targets:
        prober.call("send", to=list(target), payload="unsolicited", count=5, interval=0.01)
    # Host A now talks to the prober: a reply on the same path as the probes, so any probe
    # that got through would already be in the inbox.
    after = host_a.whoami(prober)
    assert host_a.call("inbox", wait=0.2)["inbox"] == []

    # The dropped probes left no conntrack entry behind, so the mapping did not move.
    if nat_a == "preserve":
        assert after == [topo.router_a_public, host_a.port]


@pytest.mark.parametrize(
    ("nat_a", "nat_b", "works"),
    [
        ("preserve", "preserve", True),
        ("preserve", "random", False),
        ("random", "random", False),
        (None, "preserve", True),
    ],
)
def test_hole_punching(
    nat_topology_factory: Factory, nat_a: NatMode, nat_b: NatMode, works: bool
) -> None:
    topo = nat_topology_factory(nat_a=nat_a, nat_b=nat_b)
    server = agent(topo, topo.pub, topo.rendezvous_ip)
    host_a = agent(topo, topo.host_a, topo.host_a_ip)
    host_b = agent(topo, topo.host_b, topo.host_b_ip)
    seen_a = host_a.whoami(server)
    seen_b = host_b.whoami(server)

    host_a.start("punch", to=seen_b, duration=2.0)
    host_b.start("punch", to=seen_a, duration=2.0)
    result_a = host_a.result(timeout=5)
    result_b = host_b.result(timeout=5)

    if works:
        assert result_a["heard_after"] is not None, result_a
        assert result_b["heard_after"] is not None, result_b
    else:
        assert result_a["inbox"] == [], result_a
        assert result_b["inbox"] == [], result_b


def test_public_host_and_nat_host_punch(nat_topology_factory: Factory) -> None:
    topo = nat_topology_factory(with_public_host=True)
    assert topo.host_c is not None
    server = agent(topo, topo.pub, topo.rendezvous_ip)
    host_a = agent(topo, topo.host_a, topo.host_a_ip)
    host_c = agent(topo, topo.host_c, topo.host_c_ip)
    seen_a = host_a.whoami(server)
    assert host_c.whoami(server) == host_c.endpoint  # not behind NAT

    # Before host A sends anything, host C can't reach it.
    host_c.call("send", to=seen_a, payload="unsolicited", count=3, interval=0.01)
    assert host_a.call("inbox", wait=0.2)["inbox"] == []

    host_a.start("punch", to=host_c.endpoint, duration=2.0)
    host_c.start("punch", to=seen_a, duration=2.0)
    assert host_a.result(timeout=5)["heard_after"] is not None
    assert host_c.result(timeout=5)["heard_after"] is not None
