"""``overlay-httpx request``: curl for ``http://<address>.overlay/`` URLs.

The request goes through `OverlayTransport` on a node built from the common
options, so it takes exactly the path a Python client would. The body is
streamed to stdout as it arrives; any HTTP response is a success (exit 0),
a transport failure is one line on stderr (exit 1).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import anyio
import httpx

from .._address import Address
from .._exceptions import AddressError
from .._http import OverlayTransport
from .._version import __version__
from ._common import (
    add_node_options,
    command_parser,
    positive_float,
    rendezvous_of,
    require_known_peer,
    running_node,
)
from ._errors import CliError, UsageError

__all__ = ["add_parser"]

DESCRIPTION = """\
Send one HTTP request to an overlay URL (http://1-0001-0001-0001.overlay/path,
the URL port being the overlay port, 80 by default) through a node of this
process, as curl would, and stream the response body to stdout. The peer must
be known: pass its identity and UDP endpoint with --peer (a rendezvous will
find it by itself). Exit status 0 for any HTTP response, 1 when no response
came (unknown or unreachable peer, refused port, timeout), 2 for a bad
command line."""

EXAMPLES = """\
examples:
  overlay-httpx request http://1-0001-0001-0001.overlay/health \\
      --peer 1:0001.0001.0001=ovid1_...@192.0.2.7:4000
  overlay-httpx request http://1-0001-0001-0001.overlay:8000/v1/completions \\
      --json '{"prompt": "hi"}' -H 'Authorization: Bearer x' -i --peer ...
  overlay-httpx request http://1-0001-0001-0001.overlay/upload -X PUT --data @file.bin
"""

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not _TOKEN.match(name.strip()):
        raise argparse.ArgumentTypeError(
            f"invalid header {text!r}: expected 'Name: value', e.g. 'Accept: application/json'"
        )
    return name.strip(), value.strip()


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
) -> None:
    parser = command_parser(
        subparsers,
        parents,
        "request",
        "send an HTTP request to an overlay URL (curl for the overlay)",
        DESCRIPTION,
        EXAMPLES,
    )
    parser.add_argument("url", metavar="URL", help="http://<address-host>.overlay[:PORT]/path")
    parser.add_argument(
        "-X", "--request", dest="method", metavar="METHOD", help="default: GET, POST with a body"
    )
    body = parser.add_mutually_exclusive_group()
    body.add_argument(
        "--json",
        dest="json_body",
        metavar="BODY",
        help="JSON body (text, @FILE or @- for stdin); sets Content-Type and Accept",
    )
    body.add_argument("-d", "--data", metavar="BODY", help="raw body (text, @FILE or @- for stdin)")
    parser.add_argument(
        "-H",
        "--header",
        dest="headers",
        metavar="'NAME: VALUE'",
        type=header,
        action="append",
        default=[],
        help="add a request header (repeatable)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=positive_float,
        default=30.0,
        help="limit for connecting and for each read and write (default: 30)",
    )
    parser.add_argument(
        "-i", "--include", action="store_true", help="print the status line and headers too"
    )
    add_node_options(parser)
    parser.set_defaults(run=run, throwaway_identity=True)


def _read_body(text: str, option: str) -> bytes:
    if not text.startswith("@"):
        return text.encode()
    source = text[1:]
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise UsageError(f"{option} @{source}: cannot read it: {exc.strerror or exc}") from None


def _url(text: str) -> httpx.URL:
    if "://" not in text:
        text = "http://" + text
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise UsageError(f"invalid URL {text!r}: {exc}") from None
    example = "e.g. http://1-0001-0001-0001.overlay/health"
    if url.scheme != "http":
        raise UsageError(
            f"URL {text!r}: overlay URLs use http:// (the tunnel already encrypts), {example}"
        )
    if not url.host.endswith(".overlay"):
        raise UsageError(f"URL {text!r}: the host must be an overlay host, {example}")
    return url


def _address(url: httpx.URL, args: argparse.Namespace) -> Address | None:
    """The URL's address, or None for a name the rendezvous will look up."""
    try:
        return Address.from_host(url.host)
    except AddressError as exc:
        if rendezvous_of(args) is None:  # without one, only the address form resolves
            raise UsageError(f"URL {str(url)!r}: {exc}") from None
        return None


def run(args: argparse.Namespace) -> int:
    url = _url(args.url)
    address = _address(url, args)
    headers: list[tuple[str, str]] = [("User-Agent", f"overlay-httpx/{__version__}")]
    content: bytes | None = None
    if args.json_body is not None:
        content = _read_body(args.json_body, "--json")
        try:
            json.loads(content)
        except ValueError as exc:
            raise UsageError(
                f"--json: invalid JSON ({exc}); expected e.g. '{{\"a\": 1}}'"
            ) from None
        headers += [("Content-Type", "application/json"), ("Accept", "application/json")]
    elif args.data is not None:
        content = _read_body(args.data, "--data")
    given = {name.lower() for name, _ in args.headers}
    headers = [(n, v) for n, v in headers if n.lower() not in given] + args.headers
    method = (args.method or ("POST" if content is not None else "GET")).upper()
    if not _TOKEN.match(method):
        raise UsageError(f"-X {args.method!r}: expected an HTTP method such as GET or POST")
    request = (method, url, headers, content)
    code: int = anyio.run(_main, args, address, request, backend=args.backend)
    return code


async def _main(
    args: argparse.Namespace,
    address: Address | None,
    what: tuple[str, httpx.URL, list[tuple[str, str]], bytes | None],
) -> int:
    method, url, headers, content = what
    async with running_node(args) as node:
        if address is not None:
            require_known_peer(node, address, args)
        out = sys.stdout.buffer
        client = httpx.AsyncClient(
            transport=OverlayTransport(node), timeout=args.timeout, trust_env=False
        )
        async with client:
            try:
                request = client.build_request(method, url, headers=headers, content=content)
                response = await client.send(request, stream=True)
                try:
                    if args.include:
                        out.write(_head(response))
                        out.flush()
                    async for chunk in response.aiter_bytes():
                        out.write(chunk)
                        out.flush()
                finally:
                    await response.aclose()
            except httpx.HTTPError as exc:
                raise CliError(_failure(method, url, exc)) from exc
    return 0


def _head(response: httpx.Response) -> bytes:
    version = response.http_version
    lines = [f"{version} {response.status_code}".encode()]
    lines += [name + b": " + value for name, value in response.headers.raw]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _failure(method: str, url: httpx.URL, exc: httpx.HTTPError) -> str:
    message = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout):
        message += "; is the peer running, and is its UDP endpoint reachable from here?"
    return f"{method} {url} failed: {message}"
