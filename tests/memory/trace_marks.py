"""How the per-trace checks mark the committed allocator traces they run on.

* A run that captured CUDA graphs (``timeline.captures_cuda_graphs``: a serving run's compiled
  decoding) allocated in a private pool, which ``allocator_trace`` tells from the trace
  (``capture_streams``) and the model replays (``CachingAllocator.begin_allocate_to_pool``):
  it is checked as every other trace is.
* A large trace: a serving run's holds every decoding step of 4 rounds (``h100_servetrace``'s
  int8 merge case: about 3 M entries in 3.2 MB), and each further read of it costs 10-25 s of a
  2-core CI machine. ``test_allocator_traces`` replays every trace, large or not, to the
  measured peaks; the other per-trace checks skip large ones unless ``VRAMCALC_SLOW_TESTS``
  is set.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vramcalc.timeline import captures_cuda_graphs, measured_record

LARGE_TRACE_FILE_BYTES = 1 << 20
SLOW = bool(os.environ.get("VRAMCALC_SLOW_TESTS"))
LARGE_SKIPPED = pytest.mark.skip(
    reason="a large trace's further check: VRAMCALC_SLOW_TESTS=1 runs it"
)


def is_large(path: Path) -> bool:
    return path.stat().st_size > LARGE_TRACE_FILE_BYTES


def captured_graphs(path: Path) -> bool:
    return captures_cuda_graphs(measured_record(path))


def marked(paths: list[Path], skip_large: bool = True) -> list:
    """``paths`` as parameters: with ``skip_large``, a large trace skipped unless
    ``VRAMCALC_SLOW_TESTS`` is set."""
    out = []
    for p in paths:
        if skip_large and is_large(p) and not SLOW:
            out.append(pytest.param(p, marks=LARGE_SKIPPED))
        else:
            out.append(p)
    return out
