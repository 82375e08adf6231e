"""The node's UDP socket on asyncio and trio, read synchronously and without a queue.

Received datagrams go straight from the kernel into a callback, in batches: on
asyncio the socket is registered with ``loop.add_reader`` (anyio's asyncio UDP
socket keeps only 100 queued datagrams and silently drops the rest; the
``DatagramProtocol`` path wakes the loop once per datagram); on trio a task
waits for readability. Either way the only buffer is the kernel's, whose size
we raise and report, so a slow consumer shows up as flow control in the
tunnel rather than as drops in a queue of ours.

Sending is synchronous too: UDP ``sendto`` on a non-blocking socket either
takes the datagram or fails at once. A full send buffer is counted and treated
as loss; the tunnel's recovery resends what mattered.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Final

from anyio.abc import TaskGroup

from .._exceptions import LocalProtocolError

__all__ = [
    "DEFAULT_BUFFER_BYTES",
    "UdpSocket",
    "current_backend",
    "loop_clock",
    "parse_endpoint",
]

logger = logging.getLogger("overlay_httpx")

DEFAULT_BUFFER_BYTES: Final = 8 << 20
"""Requested SO_RCVBUF / SO_SNDBUF; the kernel may grant less (see `statistics`)."""

_MAX_DATAGRAM: Final = 65_535
_BATCH: Final = 256  # datagrams read per wake-up before yielding to other tasks

Addr = tuple[str, int]
DatagramHandler = Callable[[bytes, Addr], None]


def current_backend() -> str:
    """``"asyncio"`` or ``"trio"``: which event loop runs the calling task."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return "trio"
    return "asyncio"


def loop_clock() -> Callable[[], float]:
    """The running loop's clock (what anyio's deadlines are measured against)."""
    if current_backend() == "asyncio":
        import asyncio

        return asyncio.get_running_loop().time
    import trio

    return trio.current_time


def parse_endpoint(value: str | tuple[str, int], what: str = "endpoint") -> Addr:
    """``"host:port"``, ``"[v6]:port"`` or ``(host, port)`` as a checked (host, port).

    Only IP literals are accepted: name resolution is a blocking call and
    belongs to the caller.
    """
    if isinstance(value, tuple):
        if len(value) != 2:
            raise LocalProtocolError(f"{what} {value!r}: expected (host, port)")
        host, port = value
    elif isinstance(value, str):
        text = value.strip()
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit():
            raise LocalProtocolError(f"{what} {value!r}: expected 'host:port', e.g. '127.0.0.1:0'")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        port = int(port_text)
    else:
        raise LocalProtocolError(f"{what} {value!r}: expected 'host:port' or (host, port)")
    if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
        raise LocalProtocolError(f"{what} {value!r}: expected (str host, int port)")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise LocalProtocolError(
            f"{what} {value!r}: host must be an IP address such as 127.0.0.1 or ::1"
        ) from None
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"{what} {value!r}: port must be 0..65535")
    return str(ip), port


def _open_socket(bind: Addr, buffer_bytes: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        for force, plain in (
            (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
            (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF),
        ):
            # The FORCE variants pass rmem_max/wmem_max when we are privileged.
            try:
                if force is None:
                    raise PermissionError
                sock.setsockopt(socket.SOL_SOCKET, force, buffer_bytes)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, plain, buffer_bytes)
        sock.bind(bind)
    except BaseException:
        sock.close()
        raise
    return sock


class UdpSocket:
    """One bound, non-blocking UDP socket whose datagrams are handed over synchronously.

    `on_datagram` runs for each datagram and `on_batch` once after each batch,
    both inside the reader, so the caller can answer (ACKs, window updates)
    once per batch rather than once per datagram.
    """

    def __init__(
        self,
        bind: Addr,
        on_datagram: DatagramHandler,
        on_batch: Callable[[], None],
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        self._on_datagram = on_datagram
        self._on_batch = on_batch
        self._buffer_bytes = buffer_bytes
        self._sock = _open_socket(bind, buffer_bytes)
        self._backend = current_backend()
        self._closed = False
        self.send_errors: dict[str, int] = {}
        if self._backend == "asyncio":
            import asyncio

            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._sock.fileno(), self._read_ready)

    @property
    def local_endpoint(self) -> Addr:
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def receive_buffer(self) -> int:
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    @property
    def send_buffer(self) -> int:
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    def start(self, group: TaskGroup) -> None:
        """Begin reading: on trio in a task of `group`; on asyncio the loop already
        calls the reader registered in ``__init__``."""
        if self._backend == "trio":
            group.start_soon(self.run)

    async def run(self) -> None:
        """Read until closed (trio only)."""
        import trio

        while not self._closed:
            sock = self._sock
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:
                if self._closed:
                    return
                continue  # the socket was swapped by `rebind`
            except OSError:
                if self._closed or sock is not self._sock:
                    continue
                raise
            if sock is self._sock:
                self._read_ready()

    def _read_ready(self) -> None:
        sock = self._sock
        received = 0
        try:
            for _ in range(_BATCH):
                try:
                    data, addr = sock.recvfrom(_MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionRefusedError:
                    continue  # an ICMP error for an earlier send; the tunnel's timers cope
                except OSError as exc:
                    if self._closed:
                        return
                    logger.debug("UDP receive failed: %s", exc)
                    break
                received += 1
                self._on_datagram(data, (addr[0], addr[1]))
        finally:
            if received:
                self._on_batch()

    def sendto(self, data: bytes, addr: Addr) -> None:
        """Send one datagram now; a failure is counted (and recovered from by the tunnel)."""
        try:
            self._sock.sendto(data, addr)
        except OSError as exc:
            if self._closed:
                return
            reason = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            self.send_errors[reason] = self.send_errors.get(reason, 0) + 1
            logger.debug("UDP send to %s:%d failed: %s", addr[0], addr[1], exc)

    def rebind(self, bind: Addr) -> None:
        """Move to a fresh socket (a new local port, as after NAT rebinding or a network change)."""
        new = _open_socket(bind, self._buffer_bytes)
        old = self._sock
        self._unregister()
        self._sock = new
        if self._backend == "asyncio":
            self._loop.add_reader(new.fileno(), self._read_ready)
        self._close_socket(old)

    def _unregister(self) -> None:
        if self._backend == "asyncio":
            self._loop.remove_reader(self._sock.fileno())

    def _close_socket(self, sock: socket.socket) -> None:
        if self._backend == "trio":
            import trio

            trio.lowlevel.notify_closing(sock)
        sock.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._unregister()
        self._close_socket(self._sock)
