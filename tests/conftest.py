"""Shared by every test directory: its presence puts ``tests/`` on ``sys.path``, so
test modules can import ``_fuzzing`` (pytest's default "prepend" import mode)."""
