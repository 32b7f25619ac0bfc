"""Simulated and measured runs in one format: torch's memory snapshot.

``torch.cuda.memory._snapshot()`` returns ``{"segments": [...], "device_traces": [[...]]}``:
the segments at the end (each with its blocks) and, per device, the allocator's actions
(``alloc``, ``free_requested``, ``free_completed``, ``segment_alloc``, ``segment_free``,
``segment_map``, ``segment_unmap``, ``oom``) with address, size (the request for tensors)
and stream. ``torch/cuda/_memory_viz.py`` and the viewer page it writes
(``MemoryViz.js``, also at https://pytorch.org/memory_viz) read it.

``to_snapshot`` writes a ``RecordedRun`` (``memory/timeline.py``) in that format: each
allocation carries a ``category`` (the viewer colours by it) and one frame naming the phase,
the event index and what it holds ("activations of decoder layer 5"); the top-level key
``vramcalc`` adds the phase markers. ``from_trace_file`` turns a harness trace
(``harness/alloc_trace.py``, ``data/measurements/*_traces``) into a snapshot, and
``snapshot_series`` reads any snapshot back as in-use (requested) and reserved bytes per
trace entry: one parser for simulated and measured runs.

The viewer's unpickler reads pickle protocols 2 to 4 and turns integers into JavaScript
numbers (exact below 2**53): ``write_snapshot_file`` uses protocol 4, and simulated
addresses (the allocator model places segments below 2**56) are moved under
``ADDRESS_BASE``.
"""

from __future__ import annotations

import gzip
import json
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vramcalc.errors import AllocatorTraceError
from vramcalc.memory.allocator import ADDRESS_TOP, MIN_BLOCK_BYTES
from vramcalc.memory.provenance import UNKNOWN, Provenance
from vramcalc.memory.timeline import RecordedRun

ADDRESS_BASE = 0x7F00_0000_0000  # where simulated segments end, as CUDA addresses look
PICKLE_PROTOCOL = 4  # the highest MemoryViz.js reads
HARNESS_TRACE_FORMAT = "vramcalc-alloc-trace/1"
SEGMENT_ACTIONS = ("segment_alloc", "segment_free", "segment_map", "segment_unmap")
_GROW = {"segment_alloc": 1, "segment_map": 1, "segment_free": -1, "segment_unmap": -1}


def _address(addr: int) -> int:
    return addr - ADDRESS_TOP + ADDRESS_BASE


def run_markers(run: RecordedRun) -> list[tuple[str, int]]:
    """(label, trace entries before it) of ``run``'s snapshot: ``loaded`` (before the first
    step's ``empty_cache``, where the harness marks it), the start of every phase (its
    label), ``step_end`` after each step (as the harness's ``on_step_end``) and ``end``."""
    first_action: list[int] = []  # per event: the index of its first action
    k = 0
    for i in range(len(run.events) + 1):
        while k < len(run.actions) and run.actions[k].event_index < i:
            k += 1
        first_action.append(k)
    markers: list[tuple[str, int]] = []
    if run.load_events:
        markers.append(("loaded", first_action[run.load_events - 1]))
    steps = sorted({p.step for p in run.phases if p.step >= 0})
    for phase in run.phases:
        markers.append((phase.label, first_action[phase.start]))
    for step in steps:
        stop = max(p.stop for p in run.phases if p.step == step)
        markers.append(("step_end", first_action[stop]))
    markers.append(("end", len(run.actions)))
    return sorted(markers, key=lambda m: m[1])


def to_snapshot(run: RecordedRun, device: int = 0) -> dict[str, Any]:
    """``run`` as ``torch.cuda.memory._snapshot()`` returns it (one device)."""
    phase_of = _phase_of_events(run)
    frames: dict[int, list[dict[str, Any]]] = {}  # handle -> its frames (shared by its frees)
    trace: list[dict[str, Any]] = []
    for action in run.actions:
        entry: dict[str, Any] = {
            "action": action.action,
            "addr": _address(action.addr) if action.action != "oom" else 0,
            "size": action.requested_bytes,
            "stream": action.stream,
        }
        if action.action in SEGMENT_ACTIONS:
            entry["frames"] = []
            entry["category"] = UNKNOWN  # MemoryViz.js needs it among the categories
        elif action.action == "oom":
            entry["size"] = action.block_bytes
            entry["device_free"] = max((run.config.capacity_bytes or 0) - action.reserved_bytes, 0)
            entry["frames"] = []
        else:
            what = run.provenance.get(action.handle, Provenance(UNKNOWN, -1, 0))
            if action.handle not in frames:
                frames[action.handle] = [
                    {
                        "filename": phase_of[action.event_index],
                        "line": action.event_index,
                        "name": what.describe(),
                    }
                ]
            entry["frames"] = frames[action.handle]
            entry["category"] = what.category
        trace.append(entry)
    segments = []
    for seg in run.segments:
        blocks = []
        for addr, size, requested, allocated in seg.blocks:
            block: dict[str, Any] = {
                "address": _address(addr),
                "size": size,
                "requested_size": requested,
                "state": "active_allocated" if allocated else "inactive",
                "frames": [],
            }
            blocks.append(block)
        segments.append(
            {
                "device": device,
                "address": _address(seg.address),
                "total_size": seg.total_bytes,
                "allocated_size": sum(b["size"] for b in blocks if b["state"] != "inactive"),
                "active_size": sum(b["size"] for b in blocks if b["state"] != "inactive"),
                "requested_size": sum(b["requested_size"] for b in blocks),
                "stream": seg.stream,
                "segment_type": "small" if seg.small else "large",
                "segment_pool_id": (0, 0),
                "is_expandable": seg.expandable,
                "frames": [],
                "blocks": blocks,
            }
        )
    _attach_end_frames(segments, trace)
    return {
        "segments": segments,
        "device_traces": [[] for _ in range(device)] + [trace],
        "vramcalc": {
            "title": run.title,
            "markers": [[label, at] for label, at in run_markers(run)],
            "peak_allocated_bytes": run.result.peak_allocated_bytes,
            "peak_reserved_bytes": run.result.peak_reserved_bytes,
            "simulated": True,
        },
    }


def _phase_of_events(run: RecordedRun) -> list[str]:
    labels = [""] * len(run.events)
    for phase in run.phases:
        labels[phase.start : phase.stop] = [phase.label] * (phase.stop - phase.start)
    return labels


def _attach_end_frames(segments: list[dict[str, Any]], trace: list[dict[str, Any]]) -> None:
    """Give each block alive at the end the frames of the allocation that made it."""
    alive: dict[int, list[dict[str, Any]]] = {}
    for entry in trace:
        if entry["action"] == "alloc":
            alive[entry["addr"]] = entry["frames"]
        elif entry["action"] == "free_completed":
            alive.pop(entry["addr"], None)
    for seg in segments:
        for block in seg["blocks"]:
            if block["state"] == "active_allocated":
                block["frames"] = alive.get(block["address"], [])


def write_snapshot_file(snapshot: Mapping[str, Any], path: str | Path) -> Path:
    """Pickle a snapshot as ``torch.cuda.memory._dump_snapshot`` does (protocol 4)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(dict(snapshot), f, protocol=PICKLE_PROTOCOL)
    return path


def read_snapshot(path: str | Path) -> dict[str, Any]:
    """A snapshot from a pickle (torch's ``_dump_snapshot`` or ``write_snapshot_file``; a
    pickle runs code when loaded: open only your own) or a harness trace (``.json.gz``)."""
    path = Path(path)
    if path.name.endswith(".json.gz"):
        return from_trace_file(path)
    with path.open("rb") as f:
        data = pickle.load(f)  # noqa: S301 - the user's own snapshot file
    if isinstance(data, list):  # segments only, as _memory_viz reads it
        data = {"segments": data, "device_traces": []}
    if not isinstance(data, dict) or "segments" not in data:
        raise AllocatorTraceError(f"{path}: not a torch memory snapshot")
    return data


def from_trace_file(path: str | Path) -> dict[str, Any]:
    """A harness allocator trace (``harness/alloc_trace.py``) as a snapshot: its entries as
    the device trace, its end segments with the allocations alive then as blocks (their
    block sizes are not recorded: each is its request rounded to 512 bytes, the rest of a
    segment free)."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    if data.get("format") != HARNESS_TRACE_FORMAT:
        raise AllocatorTraceError(f"{path}: not a {HARNESS_TRACE_FORMAT} file")
    trace = []
    alive: dict[int, int] = {}
    for action, addr, size, stream in data["entries"]:
        trace.append({"action": action, "addr": addr, "size": size, "stream": stream,
                      "frames": []})  # fmt: skip
        if action == "alloc":
            alive[addr] = size
        elif action == "free_completed":
            alive.pop(addr, None)
    segments = []
    for addr, total, allocated, expandable in data.get("segments", []):
        blocks, at = [], addr
        for start in sorted(a for a in alive if addr <= a < addr + total):
            if start > at:
                blocks.append(_free_block(at, start - at))
            size = max(-(-alive[start] // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES, MIN_BLOCK_BYTES)
            blocks.append({"address": start, "size": size, "requested_size": alive[start],
                           "state": "active_allocated", "frames": []})  # fmt: skip
            at = start + size
        if at < addr + total:
            blocks.append(_free_block(at, addr + total - at))
        segments.append({"device": 0, "address": addr, "total_size": total,
                         "allocated_size": allocated, "active_size": allocated, "stream": 0,
                         "segment_type": "large", "is_expandable": bool(expandable),
                         "frames": [], "blocks": blocks})  # fmt: skip
    markers = [[label, at] for label, at in data.get("markers", [])]
    return {
        "segments": segments,
        "device_traces": [trace],
        "vramcalc": {
            "title": str(data.get("case_id", "")),
            "markers": markers,
            "simulated": False,
        },  # fmt: skip
    }


def _free_block(addr: int, size: int) -> dict[str, Any]:
    return {"address": addr, "size": size, "requested_size": 0, "state": "inactive",
            "frames": []}  # fmt: skip


@dataclass(frozen=True)
class SnapshotSeries:
    """In-use (requested) and reserved bytes after each entry of a snapshot's device trace,
    and its markers (label, entries before it)."""

    requested_bytes: tuple[int, ...]
    reserved_bytes: tuple[int, ...]
    markers: tuple[tuple[str, int], ...]
    title: str = ""

    @property
    def peak_requested_bytes(self) -> int:
        return max(self.requested_bytes, default=0)

    @property
    def peak_reserved_bytes(self) -> int:
        return max(self.reserved_bytes, default=0)


def snapshot_series(snapshot: Mapping[str, Any], device: int | None = None) -> SnapshotSeries:
    """What a snapshot's trace says was in use and reserved after each entry.

    Tensors count their requests (``alloc`` to ``free_completed``), segments their bytes;
    what existed before the trace began is what the end state holds beyond the trace's net
    change (so a trace whose ring buffer dropped its start still reads right)."""
    traces = snapshot.get("device_traces") or [[]]
    if device is None:
        device = next((i for i, t in enumerate(traces) if t), 0)
    entries: Sequence[Mapping[str, Any]] = traces[device] if device < len(traces) else []
    requested, reserved = [], []
    in_use = held = 0
    for entry in entries:
        action = entry["action"]
        if action == "alloc":
            in_use += entry["size"]
        elif action == "free_completed":
            in_use -= entry["size"]
        elif action in _GROW:
            held += _GROW[action] * entry["size"]
        requested.append(in_use)
        reserved.append(held)
    segments = [s for s in snapshot.get("segments", []) if s.get("device", 0) == device]
    end_reserved = sum(s["total_size"] for s in segments)
    end_requested = sum(
        b.get("requested_size", b["size"])
        for s in segments
        for b in s.get("blocks", [])
        if b["state"] == "active_allocated"
    )
    before_requested = max(end_requested - in_use, 0) if segments else 0
    before_reserved = max(end_reserved - held, 0) if segments else 0
    meta = snapshot.get("vramcalc") or {}
    return SnapshotSeries(
        tuple(x + before_requested for x in requested),
        tuple(x + before_reserved for x in reserved),
        tuple((str(label), int(at)) for label, at in meta.get("markers", [])),
        str(meta.get("title", "")),
    )
