"""The caching allocator's own trace of a case: every alloc / free / segment event.

``AllocationTrace`` wraps the work of a case (``record_trace: true``) with
``torch.cuda.memory._record_memory_history`` (no stack context, so it costs
little) and on exit writes ``torch.cuda.memory._snapshot()``'s device trace in
a compact gzipped JSON::

    {"format": "vramcalc-alloc-trace/1", "case_id": ..., "pytorch_cuda_alloc_conf": ...,
     "columns": ["action", "addr", "size", "stream"],
     "entries": [["segment_alloc", 139..., 20971520, 0], ["alloc", ..., 5242880, 0], ...],
     "markers": [["loaded", 812], ["step_end", 4410], ...],   # label, entries so far
     "segments": [[addr, total_size, allocated_size, is_expandable], ...]}  # at the end

These traces test ``vramcalc.memory.allocator`` against the real allocator
(replaying them must give the measured reserved bytes) and show the real
order of a training step's allocations. Markers count the entries recorded so
far (one snapshot each), so they do not disturb the allocator.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vramcalc_harness.trackers import is_cuda

if TYPE_CHECKING:
    from vramcalc_harness.scenario import Case
    from vramcalc_harness.serve_case import ServeCase

TRACE_FORMAT = "vramcalc-alloc-trace/1"
MAX_ENTRIES = 3_000_000
MAX_STEP_MARKERS = 12


class AllocationTrace:
    """Context manager recording the allocator trace of the work inside into ``path``."""

    def __init__(self, path: str | Path, case_id: str) -> None:
        self.path = Path(path)
        self.case_id = case_id
        self.markers: list[tuple[str, int]] = []

    def _entries(self) -> list[dict[str, Any]]:
        import torch

        traces = torch.cuda.memory._snapshot().get("device_traces") or [[]]
        return list(traces[torch.cuda.current_device()] if len(traces) > 1 else traces[0])

    def __enter__(self) -> AllocationTrace:
        import torch

        torch.cuda.memory._record_memory_history(
            enabled="all", context=None, stacks="python", max_entries=MAX_ENTRIES
        )
        return self

    def mark(self, label: str) -> None:
        """Note how many entries exist now (``step_end`` only for the first steps)."""
        if (
            label == "step_end"
            and sum(1 for m in self.markers if m[0] == label) >= MAX_STEP_MARKERS
        ):
            return
        self.markers.append((label, len(self._entries())))

    def __exit__(self, *exc: object) -> None:
        import torch

        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        traces = snapshot.get("device_traces") or [[]]
        entries = traces[torch.cuda.current_device()] if len(traces) > 1 else traces[0]
        segments = [
            [
                int(seg.get("address", 0)),
                int(seg.get("total_size", 0)),
                int(seg.get("allocated_size", 0)),
                bool(seg.get("is_expandable", False)),
            ]
            for seg in snapshot.get("segments", [])
        ]
        data = {
            "format": TRACE_FORMAT,
            "case_id": self.case_id,
            "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "torch_version": torch.__version__,
            "columns": ["action", "addr", "size", "stream"],
            "entries": [
                [
                    e.get("action"),
                    int(e.get("addr", 0)),
                    int(e.get("size", 0)),
                    int(e.get("stream", 0)),
                ]
                for e in entries
            ],
            "markers": self.markers + [("end", len(entries))],
            "segments": segments,
            "max_entries": MAX_ENTRIES,
            "truncated": len(entries) >= MAX_ENTRIES,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with gzip.open(tmp, "wt") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, self.path)


def case_trace(
    case: Case | ServeCase, device: str, path: str | Path | None
) -> AllocationTrace | None:
    """The trace of ``case``'s work into ``path`` when the case asks for one (``record_trace``)
    on CUDA; else None (no trace on CPU, never a fake one)."""
    if not case.record_trace or not is_cuda(device) or path is None:
        return None
    return AllocationTrace(path, case.case_id)


def load_trace(path: str | Path) -> dict[str, Any]:
    """A trace file written by ``AllocationTrace``."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    if data.get("format") != TRACE_FORMAT:
        raise ValueError(f"{path}: not a {TRACE_FORMAT} file")
    return data
