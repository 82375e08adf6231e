"""`main()` in process: many more user mistakes, each one line and the right exit code.

The subprocess tests cover the real console surface; these cover the long
tail of checks cheaply. `main` configures the ``overlay_httpx`` logger, so a
fixture puts it back as it was for the other tests.
"""

from __future__ import annotations

import builtins
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay_httpx import Identity
from overlay_httpx._cli import main
from overlay_httpx._cli._common import overlay_target, peer_spec
from overlay_httpx._cli._errors import CliError, describe, leaves, report
from overlay_httpx._node._node import default_address
from overlay_httpx._protocol import COMPILED

PEER = Identity.generate().public
ADDRESS = default_address(PEER)
URL = f"http://{ADDRESS.host}/health"

MODULE = """
value = 42


def broken():
    raise RuntimeError("no model weights")


async def app(scope, receive, send):
    pass
"""


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    logger = logging.getLogger("overlay_httpx")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in ("OVERLAY_HTTPX_IDENTITY", "OVERLAY_HTTPX_BIND", "OVERLAY_HTTPX_RENDEZVOUS"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "cli_test_app_module.py").write_text(MODULE)
    (tmp_path / "cli_test_raising_module.py").write_text("raise ValueError('bad config')\n")
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
    for name in ("cli_test_app_module", "cli_test_raising_module"):
        sys.modules.pop(name, None)


CASES = [
    (
        [],
        2,
        "a command is required: keygen, rendezvous, serve, find, request, status, gateway, expose",
    ),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["--backend", "curio", "keygen"], 2, "argument --backend: invalid choice"),
    (["request", URL, "--peer", "nonsense"], 2, "invalid peer 'nonsense': expected ADDRESS="),
    (["request", URL, "--peer", f"{ADDRESS}={PEER}@localhost:5"], 2, "host must be an IP"),
    (["request", URL, "--peer", f"{ADDRESS}=ovid1_x@1.2.3.4:5"], 2, "invalid public identity"),
    (["request", URL, "--json", "{oops"], 2, "--json: invalid JSON"),
    (["request", URL, "--json", "@missing.json"], 2, "--json @missing.json: cannot read it"),
    (["request", URL, "--json", "{}", "--data", "x"], 2, "not allowed with argument"),
    (["request", "https://1-0001-0001-0001.overlay/"], 2, "overlay URLs use http://"),
    (["request", "http://example.com/"], 2, "the host must be an overlay host"),
    (["request", "http://nope.overlay/"], 2, "invalid overlay host 'nope.overlay'"),
    (["request", URL, "-H", "no colon here"], 2, "invalid header 'no colon here'"),
    (["request", URL, "--timeout", "-1"], 2, "expected seconds > 0"),
    (["request", URL, "-X", "GET /"], 2, "expected an HTTP method"),
    (["serve", "main"], 2, "invalid app 'main': expected MODULE:APP"),
    (["serve", "no_such_module_here:app"], 2, "cannot import 'no_such_module_here'"),
    (["serve", "cli_test_app_module:application"], 2, "has no attribute 'application'"),
    (["serve", "cli_test_app_module:value"], 2, "is a int, not an ASGI app"),
    (["serve", "cli_test_app_module:broken()"], 1, "failed: RuntimeError: no model weights"),
    (["serve", "cli_test_raising_module:app"], 1, "failed: ValueError: bad config"),
    (["serve", "x:app", "--app-dir", "nowhere"], 2, "--app-dir 'nowhere': no such directory"),
    (["serve", "x:app", "--port", "70000"], 2, "invalid overlay port '70000'"),
    (["serve", "x:app", "--bind", "127.0.0.1"], 2, "expected 'host:port'"),
    (["gateway"], 2, "the following arguments are required: --to"),
    (["gateway", "--to", "1:0001.0001.0001:99999"], 2, "invalid overlay port '99999'"),
    (["gateway", "--to", str(ADDRESS), "--listen", "8080"], 2, "invalid endpoint '8080'"),
    (["gateway", "--to", "llm.overlay"], 2, "names and tags are looked up at a rendezvous"),
    (["gateway", "--to", "not a target"], 2, "invalid overlay target 'not a target'"),
    (["serve", "cli_test_app_module:app", "--tag", "gpu"], 2, "give --rendezvous"),
    (["serve", "cli_test_app_module:app", "--rendezvous", "a b:1"], 2, "neither an IP address"),
    (["expose", "8000"], 2, "invalid endpoint '8000'"),
    (["expose", "127.0.0.1:8000/api"], 2, "invalid upstream"),
    (["keygen", "--out", "no/such/dir/x.key"], 1, "directory 'no/such/dir' does not exist"),
]


@pytest.mark.parametrize(("argv", "code", "needle"), CASES)
def test_mistake(
    argv: list[str], code: int, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("overlay-httpx: error: ")
    assert needle in line


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--debug", "serve", "cli_test_raising_module:app"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.splitlines()[-1].startswith("overlay-httpx: error: importing")


def test_global_options_may_follow_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "cli_test_raising_module:app", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("overlay-httpx ")
    assert ("(compiled tunnel core)" in out) == COMPILED, out


def test_report_unwraps_exception_groups(capsys: pytest.CaptureFixture[str]) -> None:
    group = builtins.BaseExceptionGroup("tasks", [ValueError("x"), CliError("the real story")])
    assert [type(e) for e in leaves(group)] == [ValueError, CliError]
    assert report(group, debug=False) == 1
    assert capsys.readouterr().err == "overlay-httpx: error: the real story\n"
    assert report(builtins.BaseExceptionGroup("g", [KeyboardInterrupt()]), debug=False) == 130
    assert "--debug" in describe(ZeroDivisionError("boom"))


def test_argument_types() -> None:
    assert overlay_target("1:0001.0001.0001") == (ADDRESS.parse("1:0001.0001.0001"), 80)
    assert overlay_target("1-0001-0001-0001.overlay:8000")[1] == 8000
    assert overlay_target(f"{ADDRESS}:9") == (ADDRESS, 9)
    assert overlay_target("LLM.overlay:8000") == ("llm.overlay", 8000)
    assert overlay_target("gpu.tag.overlay") == ("gpu.tag.overlay", 80)
    spec = peer_spec(f"{ADDRESS.host}={PEER}@[::1]:4000")
    assert (spec.address, spec.identity, spec.endpoint) == (ADDRESS, PEER, ("::1", 4000))
