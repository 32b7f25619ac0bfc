"""The garbage collector's thresholds for a process that plans: the CLI, a report's worker
processes (``parallel.py``) and the test suite's.

Planning builds large structures of small objects: a trace's fake tensors and autograd
graphs, millions of allocator events and blocks replayed, traces of real runs read back.
With CPython's default thresholds ``(700, 10, 10)`` a young collection runs every 700 new
containers and every tenth of those walks the middle generation, while the structures are
being built: measured on this project's tests of the allocator model and of serving (2-core
machine, Python 3.11, ``pytest -n 1 tests/serving tests/memory``), 132 CPU-s with the
defaults, 108 with ``(10000, 10, 10)`` and 96 with ``THRESHOLDS``, the peak memory the same
within 5 % (1.78 / 1.86 GB). Nothing a plan computes depends on when the collector runs: a
tensor's storage is freed when its last reference goes, not by the collector
(``tests/test_collector.py`` traces a step and a world with both settings, and the accuracy
gate re-simulates every committed case under them). A program that imports vramcalc as a
library keeps its own thresholds: only ``tune`` sets them, for the whole process.
"""

from __future__ import annotations

import gc

#: young generation every 50,000 new containers, the middle one every 50 of those, the
#: oldest every 100 of those (and only once it grew by a quarter, as CPython decides)
THRESHOLDS = (50_000, 50, 100)


def tune() -> None:
    """``gc.set_threshold(*THRESHOLDS)`` for this process."""
    gc.set_threshold(*THRESHOLDS)
