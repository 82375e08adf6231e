"""One FastAPI app on one node, called with plain httpx from another, in one process.

The smallest end-to-end use of the library: `serve()` puts an unmodified
FastAPI app on overlay port 80, and an `httpx.AsyncClient` with an
`OverlayTransport` calls it at `http://<address host>/`. The app sees who is
calling (the caller's address, proven by the tunnel's handshake).

Run:  .venv/bin/python examples/fastapi_client.py
"""

from __future__ import annotations

import functools

import anyio
import httpx
from fastapi import FastAPI, Request

from overlay_httpx import Identity, Node, OverlayTransport, serve

app = FastAPI()


@app.post("/v1/completions")
async def complete(body: dict[str, object], request: Request) -> dict[str, object]:
    caller = request.scope["extensions"]["overlay"]["peer_address"]
    return {"text": f"echo: {body.get('prompt')}", "caller": str(caller)}


async def main() -> None:
    async with Node(Identity.generate()) as model, Node(Identity.generate()) as client_node:
        client_node.add_peer(model.address, model.public, model.endpoint)  # or a rendezvous
        async with anyio.create_task_group() as group:
            await group.start(functools.partial(serve, app, model))
            transport = OverlayTransport(client_node)
            async with httpx.AsyncClient(transport=transport) as client:
                url = f"http://{model.address.host}/v1/completions"
                r = await client.post(url, json={"prompt": "hello"})
                overlay = r.extensions["overlay"]
                print(f"{r.status_code} {r.json()}")
                print(f"path {overlay['path']}, rtt {overlay['rtt'] * 1e3:.2f} ms")
                assert r.json()["caller"] == str(client_node.address)
            group.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main)
