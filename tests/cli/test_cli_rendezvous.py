"""``rendezvous``, ``serve --tag --hostname``, ``find``, ``request NAME.overlay`` and
``status`` in real processes: no --peer anywhere, the rendezvous introduces everyone."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from _cli_helpers import finish, ready_fields, run_cli, run_many, start_cli, wait_for_line

APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello from the llm"})
"""


def test_discovery_through_a_rendezvous_process(tmp_path: Path) -> None:
    (tmp_path / "llmapp.py").write_text(APP)
    # One key per process: two live processes with one key would be one peer to everyone.
    keys = ["llm", "find", "request", "status", "missing"]
    run_many([["keygen", "--out", f"{key}.key"] for key in keys], tmp_path)
    rendezvous = start_cli(
        ["rendezvous", "--listen", "127.0.0.1:0", "--db", "registry.db"], tmp_path
    )
    server = None
    try:
        ready = ready_fields(wait_for_line(rendezvous))
        spec = ready["spec"]
        assert (tmp_path / "registry.db").exists()
        assert (tmp_path / "rendezvous.key").stat().st_mode & 0o077 == 0
        node = ["--bind", "127.0.0.1:0", "--rendezvous", spec]
        server = start_cli(
            [
                "serve",
                "llmapp:app",
                "--identity",
                "llm.key",
                "--tag",
                "model-service",
                "--hostname",
                "llm",
                *node,
            ],
            tmp_path,
        )
        served = ready_fields(wait_for_line(server))
        found, answer, status, missing = run_many(
            [
                ["find", "--tag", "model-service", "--json", "--identity", "find.key", *node],
                ["request", "http://llm.overlay/", "--identity", "request.key", *node],
                [
                    "status",
                    "--probe",
                    "model-service.tag.overlay",
                    "--identity",
                    "status.key",
                    "--json",
                    *node,
                ],
                ["find", "--tag", "nobody", "--identity", "missing.key", *node],
            ],
            tmp_path,
        )
        assert found.code == 0, found
        [record] = json.loads(found.stdout)["nodes"]
        assert record["address"] == served["address"]
        assert record["hostname"] == "llm"
        assert record["tags"] == ["model-service"]
        assert answer.code == 0, answer
        assert answer.stdout == "hello from the llm"
        assert status.code == 0, status
        report = json.loads(status.stdout)
        assert report["registered"] is True
        assert {t["peer"] for t in report["tunnels"]} >= {served["address"]}
        assert all(t["path"] == "direct" for t in report["tunnels"])
        assert missing.code == 1
        assert missing.stdout.strip() == "no live node found"
        assert missing.stderr == ""
    finally:
        for proc in (server, rendezvous):
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                stopped = finish(proc, timeout=15)
                assert stopped.code == 130, stopped
                assert "Traceback" not in stopped.stderr


def test_find_needs_a_rendezvous_and_checks_the_tag(tmp_path: Path) -> None:
    result = run_cli(["find", "--tag", "x"], tmp_path)
    assert result.code == 2
    assert (
        result.stderr.strip()
        == "overlay-httpx: error: find asks a rendezvous: give --rendezvous HOST:PORT"
    )
    result = run_cli(["find", "--tag", "Bad_Tag", "--rendezvous", "127.0.0.1:9"], tmp_path)
    assert result.code == 2
    assert "Bad_Tag" in result.stderr
    assert "Traceback" not in result.stderr
