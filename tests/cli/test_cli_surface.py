"""The command line as a user meets it, in real processes: help, keygen, one-line errors.

Independent command lines run concurrently (`run_many`) to keep this fast.
"""

from __future__ import annotations

import json
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cli_helpers import Finished, run_many

from overlay_httpx import Identity, PublicIdentity
from overlay_httpx._node._node import default_address

COMMANDS = ["keygen", "serve", "request", "gateway", "expose"]


def _one_error_line(result: Finished, code: int, *needles: str) -> str:
    assert result.code == code, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    [line] = lines
    assert line.startswith("overlay-httpx: error: "), line
    for needle in needles:
        assert needle in line, line
    return line


def test_help_of_every_command(tmp_path: Path) -> None:
    results = run_many([["--help"], *[[command, "--help"] for command in COMMANDS]], tmp_path)
    top, *commands = results
    assert top.code == 0
    for command in COMMANDS:
        assert command in top.stdout
    for command, result in zip(COMMANDS, commands, strict=True):
        assert result.code == 0, result
        assert result.stdout.startswith(f"usage: overlay-httpx {command}")
        examples = result.stdout.split("\nexamples:\n", 1)[1]
        assert f"  overlay-httpx {command} " in examples
        assert result.stderr == ""


def test_keygen_writes_a_private_file_and_refuses_to_overwrite(tmp_path: Path) -> None:
    text, as_json, default = run_many(
        [["keygen", "--out", "a.key"], ["keygen", "--out", "b.key", "--json"], ["keygen"]],
        tmp_path,
    )
    for result in (text, as_json, default):
        assert result.code == 0, result
        assert result.stderr == ""
    default_path = tmp_path / "config" / "overlay_httpx" / "identity"  # under XDG_CONFIG_HOME
    for path in (tmp_path / "a.key", tmp_path / "b.key", default_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(Identity.load(default_path).public) in default.stdout
    a = Identity.load(tmp_path / "a.key")
    assert f"address:     {default_address(a.public)}" in text.stdout
    assert str(a.public) in text.stdout

    document = json.loads(as_json.stdout)
    b = Identity.load(tmp_path / "b.key")
    assert document["identity"] == str(b.public)
    assert PublicIdentity.parse(document["identity"]) == b.public
    assert document["address"] == str(default_address(b.public))
    assert document["host"] == default_address(b.public).host
    assert document["fingerprint"] == b.public.fingerprint

    again, forced = run_many(
        [["keygen", "--out", "a.key"], ["keygen", "--out", "b.key", "--force"]], tmp_path
    )
    _one_error_line(again, 1, "'a.key' already exists", "--force")
    assert Identity.load(tmp_path / "a.key") == a  # untouched
    assert forced.code == 0, forced
    assert Identity.load(tmp_path / "b.key") != b


@pytest.fixture
def held_ports() -> Iterator[tuple[int, int, int]]:
    """A busy TCP port, a busy UDP port, and a UDP port whose owner never answers."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with tcp, udp, silent:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        silent.bind(("127.0.0.1", 0))
        yield tcp.getsockname()[1], udp.getsockname()[1], silent.getsockname()[1]


GOOD_APP = """
async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body"})
"""


def test_user_mistakes_are_one_line_errors(
    tmp_path: Path, held_ports: tuple[int, int, int]
) -> None:
    busy_tcp, busy_udp, silent_udp = held_ports
    Identity.generate().save(tmp_path / "me.key")
    peer = Identity.generate().public
    address = default_address(peer)
    url = f"http://{address.host}/health"
    known = f"{address}={peer}@127.0.0.1:{silent_udp}"
    (tmp_path / "good.py").write_text(GOOD_APP)
    me = ["--identity", "me.key", "--bind", "127.0.0.1:0"]
    busy_listen = ["--listen", f"127.0.0.1:{busy_tcp}"]
    cases: list[tuple[list[str], int, tuple[str, ...]]] = [
        (["serve", "main"], 2, ("invalid app 'main'", "expected MODULE:APP")),
        (["serve", "good:app", "--identity", "missing.key"], 1, ("'missing.key' does not exist",)),
        (
            ["serve", "good:app", "--identity", "me.key", "--bind", f"127.0.0.1:{busy_udp}"],
            1,
            (f"cannot bind UDP 127.0.0.1:{busy_udp}",),
        ),
        (["request", url, "--json", "{oops", *me], 2, ("--json: invalid JSON",)),
        (["gateway", "--to", "1:0001.zz", *me], 2, ("invalid overlay target '1:0001.zz'",)),
        (["request", url, *me], 2, (f"unknown peer {address}", "--peer")),
        (
            ["request", url, *me, "--peer", known, "--timeout", "0.3"],
            1,
            ("connect timeout", "is the peer running"),
        ),
        (
            ["gateway", *busy_listen, "--to", str(address), "--peer", known, *me],
            1,
            (f"cannot listen on TCP 127.0.0.1:{busy_tcp}",),
        ),
    ]
    results = run_many([args for args, _, _ in cases], tmp_path)
    for (args, code, needles), result in zip(cases, results, strict=True):
        try:
            _one_error_line(result, code, *needles)
        except AssertionError as exc:
            raise AssertionError(f"overlay-httpx {' '.join(args)}: {exc}") from None
    assert not (tmp_path / "config").exists()  # no mistake created a default identity
