"""A three-stage model pipeline over overlay tunnels: speech-to-text, then an LLM, then images.

Three FastAPI model services (CPU stand-ins with a configurable compute delay) and an
orchestrator, each on its own overlay `Node`, found through a rendezvous by tag. The
orchestrator calls them in sequence through one shared `httpx.AsyncClient` on an
`OverlayTransport` and splits every stage's latency into compute and transport.

Run it all locally with ``python -m examples.pipeline``; see README.md here for running
each piece on its own machine.
"""
