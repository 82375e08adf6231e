"""``python -m overlay_httpx``: the same command line as the ``overlay-httpx`` script."""

import sys

from overlay_httpx._cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
