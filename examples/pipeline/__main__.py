"""``python -m examples.pipeline``: the whole three-model pipeline on this machine (see run.py)."""

import sys

from .run import main

sys.exit(main())
