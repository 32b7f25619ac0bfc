"""Which committed allocator traces are large, and the mark that keeps their extra checks for
``VRAMCALC_SLOW_TESTS=1`` runs.

A serving run's trace holds every decoding step of 4 rounds (``h100_servetrace``'s int8 merge
case: about 3 M entries in 3.2 MB); each further read of it costs 10-25 s of a 2-core CI
machine. ``test_allocator_traces`` replays every trace, large or not, to the measured peaks;
the other per-trace checks skip large ones unless slow tests are asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

LARGE_TRACE_FILE_BYTES = 1 << 20
SLOW = bool(os.environ.get("VRAMCALC_SLOW_TESTS"))


def is_large(path: Path) -> bool:
    return path.stat().st_size > LARGE_TRACE_FILE_BYTES


def unless_large(paths: list[Path]) -> list:
    """``paths`` as parameters, a large trace skipped unless ``VRAMCALC_SLOW_TESTS`` is set."""
    skip = pytest.mark.skip(reason="a large trace's further check: VRAMCALC_SLOW_TESTS=1 runs it")
    return [pytest.param(p, marks=skip) if is_large(p) and not SLOW else p for p in paths]
