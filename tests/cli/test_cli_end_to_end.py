"""End to end in real processes: keygen, ``serve`` a module, ``request`` it, Ctrl-C.

The server knows nobody; the client knows the server as a static ``--peer``
built from the server's ready line. Nothing sleeps: the test waits for the
ready line (with a deadline) and for processes to exit.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from _cli_helpers import finish, ready_fields, run_many, start_cli, wait_for_line

APP = """
import json


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = {
        "method": scope["method"],
        "path": scope["path"],
        "body": body.decode(),
        "caller": str(scope["extensions"]["overlay"]["peer_address"]),
    }
    data = json.dumps(answer).encode()
    headers = [(b"content-type", b"application/json"), (b"x-served-by", b"tiny")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})
"""


def test_serve_then_request_then_interrupt(tmp_path: Path) -> None:
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / "tinyapp.py").write_text(APP)
    server_key, client_key = run_many(
        [["keygen", "--out", "server.key", "--json"], ["keygen", "--out", "client.key", "--json"]],
        tmp_path,
    )
    server_id = json.loads(server_key.stdout)
    client_id = json.loads(client_key.stdout)

    serve = ["serve", "tinyapp:app", "--app-dir", "apps", "--port", "8000"]
    server = start_cli([*serve, "--identity", "server.key", "--bind", "127.0.0.1:0"], tmp_path)
    try:
        ready = ready_fields(wait_for_line(server))
        assert ready["address"] == server_id["address"]
        assert ready["identity"] == server_id["identity"]
        assert ready["port"] == "8000"
        assert ready["url"] == f"http://{server_id['host']}:8000/"
        peer = f"{ready['address']}={ready['identity']}@{ready['udp']}"

        request = ["--backend", "trio", "request", ready["url"] + "v1/echo?x=1", "-i"]
        node = ["--identity", "client.key", "--bind", "127.0.0.1:0", "--peer", peer]
        result = finish(start_cli([*request, "--json", '{"prompt": "hi"}', *node], tmp_path))
        assert result.code == 0, result
        assert result.stderr == ""
        head, _, body = result.stdout.partition("\r\n\r\n")
        assert head.startswith("HTTP/2 200\r\n")
        assert "x-served-by: tiny" in head
        assert json.loads(body) == {
            "method": "POST",
            "path": "/v1/echo",
            "body": '{"prompt": "hi"}',
            "caller": client_id["address"],
        }
    finally:
        server.send_signal(signal.SIGINT)
        stopped = finish(server, timeout=15)
    assert stopped.code == 130, stopped
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr == ""
