"""One knob for every fuzzer: the normal run is short and reproducible, the long run
is as long as you like and searches anew each time.

Normal runs use each fuzzer's own example count with derandomized examples
(the same cases every run, so CI is reproducible). Setting
``OVERLAY_FUZZ_EXAMPLES=N`` gives every fuzzer N examples, random ones, and a
failure prints the ``@reproduce_failure`` blob that replays it::

    OVERLAY_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -m fuzz -q -p no:randomly

``--hypothesis-seed=N`` replays a given random run.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings

__all__ = ["LONG_RUN", "fuzz_settings"]

LONG_RUN = "OVERLAY_FUZZ_EXAMPLES" in os.environ


def fuzz_settings(examples: int, **extra: Any) -> settings:
    """Settings for a fuzzer that runs `examples` cases in the normal run."""
    count = int(os.environ["OVERLAY_FUZZ_EXAMPLES"]) if LONG_RUN else examples
    options: dict[str, Any] = {
        "max_examples": count,
        "deadline": None,
        "database": None,
        "derandomize": not LONG_RUN,
        "print_blob": True,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    }
    return settings(**(options | extra))
