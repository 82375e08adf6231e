"""A NAT topology in Linux network namespaces, built like two home routers on an "internet".

::

                       pub ("the internet", ip_forward=1)
                 lo: 192.0.2.1/32 (rendezvous address)
      ra 198.51.100.1/24     rb 203.0.113.1/24      hc 198.18.0.1/24 (optional)
            |                       |                       |
    wan 198.51.100.2/24     wan 203.0.113.2/24      eth0 198.18.0.2/24
        router_a                router_b                host_c (public, no NAT)
    lan 10.1.0.1/24         lan 10.2.0.1/24
            |                       |
    eth0 10.1.0.2/24        eth0 10.2.0.2/24
         host_a                  host_b

Every link is a veth pair created directly between two of the topology's own namespaces, so no
interface or packet ever touches the namespace the tests run in. Each router's NAT mode is
``"preserve"`` (plain ``masquerade``: keeps the source port when it is free, endpoint-independent
mapping in practice), ``"random"`` (``masquerade random``: a new random port per destination,
endpoint-dependent mapping: hole punching fails) or ``None`` (plain routing, no firewall; pub then
routes the router's inside network, so its host is reachable like host_c).

A NATting router filters like a home router (an ``inet`` nft table): forward policy drop, accept
established/related and new traffic from ``lan`` to ``wan``; input accepts established/related and
loopback and drops everything else arriving on ``wan``. The input drop matters: a packet that is
accepted on input gets a confirmed conntrack entry even with no socket behind it, and masquerade
then moves the inside host's next packet to that remote endpoint onto another port.

Namespace names carry the creating process's pid and a random token, so concurrent runs never
collide; teardown kills what runs in them and deletes exactly the namespaces this process made,
also on exceptions, Ctrl-C and SIGTERM; leftovers of a killed run (its pid gone) are swept later.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

import pytest
from _build import child_env

NatMode = str | None
NAT_MODES: tuple[NatMode, ...] = ("preserve", "random", None)

REPO_ROOT = Path(__file__).resolve().parents[2]
NETNS_DIR = Path("/run/netns")
NAME_PREFIX = "ohxnat-"
STALE_AFTER = 120.0  # seconds: a leftover of a dead process younger than this is left alone

_SYSCTLS_COMMON = (
    "net.ipv6.conf.all.disable_ipv6=1",
    "net.ipv6.conf.default.disable_ipv6=1",
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
    "net.ipv4.conf.lo.rp_filter=0",
)


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    return None


def _ip() -> str:
    return _tool("ip") or "ip"


def _nft() -> str:
    return _tool("nft") or "nft"


def _sysctl() -> str:
    return _tool("sysctl") or "sysctl"


def _check(argv: Sequence[str], *, stdin: str | None = None, timeout: float = 10) -> str:
    proc = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {detail}")
    return proc.stdout


# -- skipping -------------------------------------------------------------------------------------

_probe_result: str | None = None  # "" when namespaces work, else the reason to skip
_probe_lock = threading.Lock()

_PROBE_RULESET = """
table inet probe {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade random
    }
}
"""


def _probe() -> str:
    if os.geteuid() != 0:
        return "network namespace tests need root"
    for name in ("ip", "nft", "sysctl"):
        if _tool(name) is None:
            return f"network namespace tests need the `{name}` command"
    name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        _check([_ip(), "netns", "add", name])
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}".splitlines()[0]
    try:
        _check([_ip(), "netns", "exec", name, _nft(), "-f", "-"], stdin=_PROBE_RULESET)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"nft NAT does not work in a network namespace: {exc}".splitlines()[0]
    finally:
        subprocess.run([_ip(), "netns", "del", name], capture_output=True, check=False)
    return ""


def netns_unavailable() -> str:
    """Why namespace tests can't run here ("" when they can); probed once per process."""
    global _probe_result
    with _probe_lock:
        if _probe_result is None:
            _probe_result = _probe()
        return _probe_result


def require_netns() -> None:
    """Skip the calling test unless root, `ip`, `nft` and NAT in a namespace all work."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)


# -- processes in namespaces ----------------------------------------------------------------------

_EOF = object()


class NsProcess:
    """A process with line-oriented pipes: read stdout lines with timeouts, write stdin lines.

    Reader threads drain stdout (into a queue) and stderr (last lines kept for error messages),
    so a chatty child never blocks on a full pipe.
    """

    def __init__(self, popen: subprocess.Popen[str], label: str) -> None:
        self.popen = popen
        self.label = label
        self._lines: queue.Queue[object] = queue.Queue()
        self._stderr: deque[str] = deque(maxlen=50)
        self._threads = [
            threading.Thread(target=self._pump_stdout, daemon=True),
            threading.Thread(target=self._pump_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _pump_stdout(self) -> None:
        stream = self.popen.stdout
        assert stream is not None
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                self._lines.put(line.rstrip("\n"))
            stream.close()
        self._lines.put(_EOF)

    def _pump_stderr(self) -> None:
        stream = self.popen.stderr
        if stream is None:
            return
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                self._stderr.append(line.rstrip("\n"))
            stream.close()

    def join(self, timeout: float) -> bool:
        """Wait for the reader threads to see EOF (they close the pipes); True if they did."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    def _describe(self) -> str:
        code = self.popen.poll()
        state = "running" if code is None else f"exited {code}"
        tail = self.stderr_tail()
        return f"{self.label} ({state})" + (f"; stderr:\n{tail}" if tail else "")

    def read_line(self, timeout: float) -> str:
        """The next stdout line; TimeoutError after ``timeout`` s, EOFError once stdout closed."""
        try:
            item = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no line within {timeout} s from {self._describe()}") from None
        if item is _EOF:
            self._lines.put(_EOF)  # stay at EOF for later reads
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=1)
            raise EOFError(f"stdout closed: {self._describe()}")
        assert isinstance(item, str)
        return item

    def read_json(self, timeout: float) -> Any:
        return json.loads(self.read_line(timeout))

    def expect(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """Skip lines until one satisfies ``predicate``; all within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.read_line(max(0.0, deadline - time.monotonic()))
            if predicate(line):
                return line

    def write_line(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def write_json(self, obj: Any) -> None:
        self.write_line(json.dumps(obj))

    def request(self, obj: Any, timeout: float) -> Any:
        """Write one JSON line, read one JSON line back."""
        self.write_json(obj)
        return self.read_json(timeout)


def _stop(popen: subprocess.Popen[str]) -> None:
    """Close stdin, then terminate, then kill; output pipes are left to :func:`_close_output`."""
    with contextlib.suppress(OSError, ValueError):
        if popen.stdin is not None:
            popen.stdin.close()
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(timeout=2)
        except subprocess.TimeoutExpired:
            popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=2)


def _close_output(popen: subprocess.Popen[str]) -> None:
    for stream in (popen.stdout, popen.stderr):
        with contextlib.suppress(OSError, ValueError):
            if stream is not None:
                stream.close()


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Python children: the build under test, then the repo (see
    `_build.child_env`), unbuffered output."""
    return child_env(extra)


# -- the topology ---------------------------------------------------------------------------------


def _router_ruleset(mode: str) -> str:
    if mode not in ("preserve", "random"):
        raise ValueError(f"NAT mode must be 'preserve', 'random' or None, not {mode!r}")
    masquerade = "masquerade random" if mode == "random" else "masquerade"
    return f"""
table inet home_router {{
    chain input {{
        type filter hook input priority filter; policy accept;
        ct state established,related accept
        iifname "lo" accept
        iifname "wan" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" {masquerade}
    }}
}}
"""


@dataclass
class NatTopology:
    """Namespace names of one topology, its addresses, and ways to run things inside it."""

    pub: str
    router_a: str
    router_b: str
    host_a: str
    host_b: str
    host_c: str | None
    nat_a: NatMode
    nat_b: NatMode
    _procs: list[subprocess.Popen[str]] = field(default_factory=list, repr=False)
    _wrapped: dict[int, NsProcess] = field(default_factory=dict, repr=False)

    rendezvous_ip: ClassVar[str] = "192.0.2.1"  # on pub's loopback
    host_a_ip: ClassVar[str] = "10.1.0.2"
    host_b_ip: ClassVar[str] = "10.2.0.2"
    host_c_ip: ClassVar[str] = "198.18.0.2"  # public, no NAT (with_public_host=True)
    router_a_inside: ClassVar[str] = "10.1.0.1"
    router_b_inside: ClassVar[str] = "10.2.0.1"
    router_a_public: ClassVar[str] = "198.51.100.2"
    router_b_public: ClassVar[str] = "203.0.113.2"
    pub_a_ip: ClassVar[str] = "198.51.100.1"  # pub's side of the link to router A
    pub_b_ip: ClassVar[str] = "203.0.113.1"
    pub_c_ip: ClassVar[str] = "198.18.0.1"

    @property
    def namespaces(self) -> list[str]:
        names = [self.pub, self.router_a, self.router_b, self.host_a, self.host_b]
        return [*names, self.host_c] if self.host_c else names

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        return [_ip(), "netns", "exec", ns, *argv]

    def run(
        self, ns: str, argv: Sequence[str], *, timeout: float = 10, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion inside ``ns``, output captured as text."""
        return subprocess.run(
            self.exec_argv(ns, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            cwd=REPO_ROOT,
        )

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
        """Start inside ``ns``; text pipes for stdin/stdout/stderr unless given; killed at
        teardown. Defaults: cwd = the repo root, env = :func:`python_env`."""
        kw.setdefault("stdin", subprocess.PIPE)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        kw.setdefault("bufsize", 1)
        kw.setdefault("cwd", REPO_ROOT)
        kw.setdefault("env", python_env())
        proc: subprocess.Popen[str] = subprocess.Popen(self.exec_argv(ns, argv), **kw)
        self._procs.append(proc)
        return proc

    def spawn(self, ns: str, argv: Sequence[str], **kw: Any) -> NsProcess:
        """Like :meth:`popen`, wrapped for line reads with timeouts."""
        return self._wrap(self.popen(ns, argv, **kw), f"{argv[0]} in {ns}")

    def _wrap(self, popen: subprocess.Popen[str], label: str) -> NsProcess:
        wrapped = NsProcess(popen, label)
        self._wrapped[id(popen)] = wrapped
        return wrapped

    def spawn_python(
        self, ns: str, code: str, *args: str, env: dict[str, str] | None = None
    ) -> NsProcess:
        """Run ``python -c code *args`` inside ``ns`` with this venv's interpreter; the repo is
        importable (cwd and PYTHONPATH)."""
        proc = self.popen(ns, [sys.executable, "-u", "-c", code, *args], env=python_env(env))
        return self._wrap(proc, f"python in {ns}")

    def diagnostics(self) -> str:
        """Addresses, routes and nft rules of every namespace, for failure messages."""
        out = []
        for ns in self.namespaces:
            for argv in (["ip", "-br", "addr"], ["ip", "route"], ["nft", "list", "ruleset"]):
                proc = self.run(ns, argv, check=False)
                out.append(f"--- {ns}: {' '.join(argv)}\n{proc.stdout}{proc.stderr}")
        return "\n".join(out)

    def stop_processes(self) -> None:
        """Stop every process started here, kill anything else left in the namespaces, and
        close the pipes (after the reader threads saw EOF, so no close blocks on a read)."""
        procs, self._procs = self._procs, []
        wrapped, self._wrapped = self._wrapped, {}
        for proc in reversed(procs):
            _stop(proc)
        for ns in self.namespaces:
            _kill_namespace_pids(ns)
        for proc in procs:
            reader = wrapped.get(id(proc))
            if reader is None or reader.join(timeout=2):
                _close_output(proc)


def _netns_pids(name: str) -> list[int]:
    proc = subprocess.run(
        [_ip(), "netns", "pids", name], capture_output=True, text=True, check=False, timeout=10
    )
    return [int(word) for word in proc.stdout.split() if word.isdigit()]


def _kill_namespace_pids(name: str) -> None:
    """SIGKILL whatever runs in ``name`` (only our own namespaces get here)."""
    for _ in range(20):
        pids = _netns_pids(name)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _delete_namespace(name: str) -> None:
    _kill_namespace_pids(name)
    subprocess.run([_ip(), "netns", "del", name], capture_output=True, check=False, timeout=10)


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def sweep_stale_namespaces() -> list[str]:
    """Delete namespaces of this helper whose creating process is gone (a killed run)."""
    removed: list[str] = []
    try:
        entries = list(NETNS_DIR.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        name = entry.name
        if not name.startswith(NAME_PREFIX):
            continue
        pid_text = name[len(NAME_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        try:
            age = now - entry.lstat().st_mtime
        except OSError:
            continue
        if age < STALE_AFTER:
            continue
        _delete_namespace(name)
        removed.append(name)
    return removed


class _TermAsInterrupt:
    """While active, SIGTERM raises KeyboardInterrupt so ``finally`` blocks run.

    Only installed from the main thread, and only over the default handler."""

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True

    @staticmethod
    def _handle(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


def _ip_batch(ns: str, lines: Sequence[str]) -> None:
    _check([_ip(), "-n", ns, "-batch", "-"], stdin="\n".join(lines) + "\n")


def _configure(topo: NatTopology) -> None:
    t = topo
    for ns in t.namespaces:
        forward = ns in (t.pub, t.router_a, t.router_b)
        sysctls = [*_SYSCTLS_COMMON, f"net.ipv4.ip_forward={int(forward)}"]
        _check([_ip(), "netns", "exec", ns, _sysctl(), "-q", "-e", "-w", *sysctls])

    pub = [
        "link set lo up",
        f"addr add {t.rendezvous_ip}/32 dev lo",
        f"link add ra type veth peer name wan netns {t.router_a}",
        f"link add rb type veth peer name wan netns {t.router_b}",
        f"addr add {t.pub_a_ip}/24 dev ra",
        f"addr add {t.pub_b_ip}/24 dev rb",
        "link set ra up",
        "link set rb up",
    ]
    if t.host_c:
        pub += [
            f"link add hc type veth peer name eth0 netns {t.host_c}",
            f"addr add {t.pub_c_ip}/24 dev hc",
            "link set hc up",
        ]
    if t.nat_a is None:
        pub.append(f"route add 10.1.0.0/24 via {t.router_a_public}")
    if t.nat_b is None:
        pub.append(f"route add 10.2.0.0/24 via {t.router_b_public}")

    routers = (
        (t.router_a, t.host_a, t.router_a_public, t.pub_a_ip, t.router_a_inside, t.host_a_ip),
        (t.router_b, t.host_b, t.router_b_public, t.pub_b_ip, t.router_b_inside, t.host_b_ip),
    )
    router_batches: list[tuple[str, list[str]]] = []
    host_batches: list[tuple[str, list[str]]] = []
    for router, host, public, upstream, inside, host_ip in routers:
        router_batches.append(
            (
                router,
                [
                    "link set lo up",
                    f"link add lan type veth peer name eth0 netns {host}",
                    f"addr add {public}/24 dev wan",
                    f"addr add {inside}/24 dev lan",
                    "link set wan up",
                    "link set lan up",
                    f"route add default via {upstream}",
                ],
            )
        )
        host_batches.append(
            (
                host,
                [
                    "link set lo up",
                    f"addr add {host_ip}/24 dev eth0",
                    "link set eth0 up",
                    f"route add default via {inside}",
                ],
            )
        )
    if t.host_c:
        host_batches.append(
            (
                t.host_c,
                [
                    "link set lo up",
                    f"addr add {t.host_c_ip}/24 dev eth0",
                    "link set eth0 up",
                    f"route add default via {t.pub_c_ip}",
                ],
            )
        )

    _ip_batch(t.pub, pub)
    # The routers' batches create the hosts' links, so they go first.
    for ns, lines in [*router_batches, *host_batches]:
        _ip_batch(ns, lines)
    for router, mode in ((t.router_a, t.nat_a), (t.router_b, t.nat_b)):
        if mode is not None:
            _check([_ip(), "netns", "exec", router, _nft(), "-f", "-"], stdin=_router_ruleset(mode))


@contextlib.contextmanager
def nat_topology(
    *,
    nat_a: NatMode = "preserve",
    nat_b: NatMode = "preserve",
    with_public_host: bool = False,
) -> Iterator[NatTopology]:
    """Build the topology (skipping the test when namespaces can't work here), yield it, and
    tear down all its processes and namespaces however the body ends."""
    for mode in (nat_a, nat_b):
        if mode not in NAT_MODES:
            raise ValueError(f"NAT mode must be 'preserve', 'random' or None, not {mode!r}")
    require_netns()
    sweep_stale_namespaces()
    base = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    topo = NatTopology(
        pub=f"{base}-pub",
        router_a=f"{base}-ra",
        router_b=f"{base}-rb",
        host_a=f"{base}-ha",
        host_b=f"{base}-hb",
        host_c=f"{base}-hc" if with_public_host else None,
        nat_a=nat_a,
        nat_b=nat_b,
    )
    created: list[str] = []
    with _TermAsInterrupt():
        try:
            for ns in topo.namespaces:
                created.append(ns)  # first: deleting a namespace that never came is harmless
                _check([_ip(), "netns", "add", ns])
            _configure(topo)
            yield topo
        finally:
            try:
                topo.stop_processes()
            finally:
                for ns in reversed(created):
                    _delete_namespace(ns)
