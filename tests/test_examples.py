"""The examples stay runnable."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_tunnel_in_memory(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / "tunnel_in_memory.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "delivered 1048576 bytes intact=True" in out


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_node_echo(
    backend: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.argv", ["node_echo.py", backend])
    runpy.run_path(str(EXAMPLES / "node_echo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "echoed 1048576 bytes intact=True" in out


def test_fastapi_client(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / "fastapi_client.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.startswith("200 {'text': 'echo: hello', 'caller': '1:")
    assert "path direct, rtt" in out
