"""Runnable examples of overlay_httpx (a package so that ``python -m examples.pipeline`` works).

The single-file examples beside this one run as scripts; see README.md here.
"""
