"""The one measurement wrapper: what every case, training or serving, is measured in.

``measure_case`` reads the device before the case touches it, collects the provenance, runs
the case's work under the memory tracker, turns any failure into a result (an OOM is
``status: "oom"`` with the peaks up to the failure kept, anything else ``error`` with the
traceback's tail) and builds the record (``record.make_record``) from the case's
``RecordKind``.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vramcalc.errors import VramcalcError
from vramcalc_harness.build import checkpoint_weights
from vramcalc_harness.record import RecordKind, collect_provenance, make_record, training_kind
from vramcalc_harness.scenario import Case
from vramcalc_harness.serve_case import ServeCase, serve_kind
from vramcalc_harness.trackers import (
    MemoryTracker,
    device_baseline_bytes,
    device_memory_facts,
    host_peak_rss_bytes,
    is_cuda,
)

ERROR_TAIL_LINES = 12
ERROR_TAIL_CHARS = 4000

#: the case's work: runs under the tracker (``with tracker:``), adds what it measured
Work = Callable[[MemoryTracker, dict[str, Any]], None]


def is_oom(err: BaseException) -> bool:
    """A CUDA out-of-memory failure (torch's, or bitsandbytes' CUDA error text)."""
    try:
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            return True
    except ImportError:
        pass
    text = str(err)
    return "CUDA out of memory" in text or "CUDA error: out of memory" in text


def error_text(err: BaseException) -> str:
    """``Type: message`` first, then the last lines of the traceback (none for our own errors)."""
    message = f"{type(err).__name__}: {err}"
    if isinstance(err, VramcalcError):
        return message[:ERROR_TAIL_CHARS]
    frames = traceback.format_tb(err.__traceback__)
    tail = "".join(frames).rstrip().splitlines()[-ERROR_TAIL_LINES:]
    return (message + "\ntraceback (last lines):\n" + "\n".join(tail))[:ERROR_TAIL_CHARS]


def record_kind(case: Case | ServeCase) -> RecordKind:
    """What the record of ``case`` holds, by its kind."""
    return serve_kind(case) if isinstance(case, ServeCase) else training_kind(case)


def measure_case(
    kind: RecordKind,
    device: str,
    checkpoint: str | Path,
    work: Work,
    before_cuda: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure one case in this process and return its full record (a failure is a result).

    ``before_cuda`` runs first (a process group must exist before this rank touches CUDA);
    ``work`` builds the model and runs the case under the tracker it is given."""
    started = time.perf_counter()
    measurement: dict[str, Any] = {"checkpoint_weights": checkpoint_weights(checkpoint)}
    if is_cuda(device):
        measurement["device_baseline_bytes"] = device_baseline_bytes()
    provenance: dict[str, Any] = {}
    status, error = "ok", None
    tracker = MemoryTracker(device)
    try:
        if before_cuda is not None:
            before_cuda(measurement)
        provenance = collect_provenance(device)
        measurement.update(device_memory_facts(device))  # before anything is allocated
        work(tracker, measurement)
    except Exception as err:  # noqa: BLE001 - every failure of a case is a result
        status = "oom" if is_oom(err) else "error"
        error = error_text(err)
        print(error, file=sys.stderr, flush=True)
    measurement.update(
        peak_allocated_bytes=tracker.peak_allocated_bytes,
        peak_reserved_bytes=tracker.peak_reserved_bytes,
        device_total_bytes=tracker.device_total_bytes,
        steady_peak_allocated_bytes=tracker.steady_peak_allocated_bytes,
        steady_peak_reserved_bytes=tracker.steady_peak_reserved_bytes,
        steady_device_total_bytes=tracker.steady_device_total_bytes,
        device_total_source=tracker.device_total_source,
        host_peak_rss_bytes=host_peak_rss_bytes(),
        case_seconds=time.perf_counter() - started,
    )
    return make_record(kind, device, status, measurement, provenance, error)
