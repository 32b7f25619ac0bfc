"""A serving run replayed through the caching-allocator model, its peaks observed by phase.

``observe_phases`` drives a replay stretch by stretch (the events between two markers) and
keeps the most allocated and reserved bytes of each phase (``PHASES``; a marker's phase,
``_phase``) and overall: ``replay`` replays a laid-out run through one ``CachingAllocator``
(``PlainReplay``, ``_replay_stretch``), ``replay_run`` a run held as pieces with the two
pools apart (``splitreplay``), to the same bytes.
"""

from __future__ import annotations

import itertools
from typing import Any, Protocol

from vramcalc.memory.allocator import ALLOC, EMPTY_CACHE, FREE, AllocatorConfig, CachingAllocator
from vramcalc.serving import splitreplay
from vramcalc.serving.compactrun import Event, Run

PHASES = ("load", "adapters", "merge", "prefill", "decode")


def _phase(label: str) -> str:
    """The phase a marker starts."""
    if label.startswith("copy"):  # another merged copy: its loading, adapters and merge
        label = label.partition(".")[2] or "loaded"
    if label in ("loaded", "adapters", "merge"):
        return {"loaded": "load"}.get(label, label)
    if label.startswith("g") and ".s" in label or label in ("after", "end"):
        return "decode"
    return "prefill"


def replay(
    events: list[tuple[int, int, int]],
    markers: list[tuple[str, int]],
    load_events: int,
    config: AllocatorConfig | None = None,
) -> dict[str, Any]:
    """Replay ``events`` (loading first) and observe peaks by phase: after each ALLOC, the
    allocated and reserved bytes count towards the peaks of the phase it is in."""
    return observe_phases(PlainReplay(CachingAllocator(config or AllocatorConfig()), events),
                          len(events), markers, load_events)  # fmt: skip


def replay_run(run: Run, load_events: int, config: AllocatorConfig | None = None) -> dict[str, Any]:
    """``replay`` of a run held as pieces (``servereplay.compact_run``), its pools replayed apart
    (``splitreplay``, exact where nothing caps memory and segments are not expandable);
    else the run laid out and replayed whole."""
    config = config or AllocatorConfig()
    if not splitreplay.splits(config):
        return replay(run.events(), run.markers, load_events, config)
    return observe_phases(splitreplay.SplitReplay(run, config), len(run), run.markers,
                          load_events)  # fmt: skip


class Stretches(Protocol):
    """A replay that ``observe_phases`` drives, stretch by stretch, in order."""

    @property
    def allocated_bytes(self) -> int: ...

    def replay(self, begin: int, stop: int) -> tuple[int, int]:
        """Events ``[begin, stop)``; the most allocated and reserved bytes seen right after
        one of its ALLOCs (0 without one)."""
        ...


class PlainReplay:
    """A list of events replayed through one ``CachingAllocator``."""

    def __init__(self, allocator: CachingAllocator, events: list[Event]):
        self.allocator, self.events = allocator, events

    @property
    def allocated_bytes(self) -> int:
        return self.allocator.allocated_bytes

    def replay(self, begin: int, stop: int) -> tuple[int, int]:
        return _replay_stretch(self.allocator, self.events, begin, stop)


def observe_phases(
    stretches: Stretches, total: int, markers: list[tuple[str, int]], load_events: int
) -> dict[str, Any]:
    """The peaks of a replay of ``total`` events by phase (``replay``)."""
    # markers in their order (several may share an index: the last one's phase holds)
    phases_at = sorted(((i + load_events, _phase(m)) for m, i in markers), key=lambda p: p[0])
    labels_at = {i + load_events: m for m, i in markers}
    phase_alloc = dict.fromkeys(PHASES, 0)
    phase_reserved = dict.fromkeys(PHASES, 0)
    peak_alloc = peak_reserved = 0
    alloc_phase = reserved_phase = "load"
    loaded = 0
    # stretches of one phase: [start, stop), each a plain replay from peaks reset
    cuts = sorted({0, total, *(min(max(i, 0), total) for i, _ in phases_at)})
    nxt, phase = 0, "load"
    for begin, stop in zip(cuts, cuts[1:], strict=False):
        while nxt < len(phases_at) and phases_at[nxt][0] <= begin:
            phase = phases_at[nxt][1]
            if labels_at.get(phases_at[nxt][0]) == "inputs" and not loaded:
                loaded = stretches.allocated_bytes
            nxt += 1
        allocated, reserved = stretches.replay(begin, stop)
        if allocated > phase_alloc[phase]:
            phase_alloc[phase] = allocated
            if allocated > peak_alloc:
                peak_alloc, alloc_phase = allocated, phase
        if reserved > phase_reserved[phase]:
            phase_reserved[phase] = reserved
            if reserved > peak_reserved:
                peak_reserved, reserved_phase = reserved, phase
    return {
        "peak_allocated_bytes": peak_alloc,
        "peak_reserved_bytes": peak_reserved,
        "allocated_peak_phase": alloc_phase,
        "reserved_peak_phase": reserved_phase,
        "phase_allocated_bytes": phase_alloc,
        "phase_reserved_bytes": phase_reserved,
        "loaded_allocated_bytes": loaded or stretches.allocated_bytes,
    }


def _replay_stretch(
    allocator: CachingAllocator, events: list[Event], begin: int, stop: int
) -> tuple[int, int]:
    """Replay ``events[begin:stop]``; the most allocated and reserved bytes seen right after
    one of its ALLOCs (0 without one). Between two cache releases reserved bytes only grow
    when nothing caps memory (a FREE keeps them, an ALLOC adds): the most after an ALLOC is
    the last; the allocator's peak allocated, from -1, keeps the most allocated and says
    whether there was an ALLOC (a size-0 one, which malloc does not count, counted here)."""
    config = allocator.config
    if config.capacity_bytes is not None or config.max_split_size_bytes is not None:
        return _replay_stretch_checked(allocator, events, begin, stop)
    most_allocated = most_reserved = 0
    allocator.peak_allocated_bytes = -1
    malloc, free = allocator.malloc, allocator.free
    for op, handle, nbytes in itertools.islice(events, begin, stop):
        if op == FREE:
            free(handle)
        elif op == ALLOC and nbytes > 0:
            malloc(handle, nbytes)
        elif op == ALLOC:
            malloc(handle, nbytes)
            allocator.peak_allocated_bytes = max(
                allocator.peak_allocated_bytes, allocator.allocated_bytes
            )
        else:  # EMPTY_CACHE
            if allocator.peak_allocated_bytes >= 0:
                most_allocated = max(most_allocated, allocator.peak_allocated_bytes)
                most_reserved = max(most_reserved, allocator.reserved_bytes)
                allocator.peak_allocated_bytes = -1
            allocator.empty_cache()
    if allocator.peak_allocated_bytes >= 0:
        most_allocated = max(most_allocated, allocator.peak_allocated_bytes)
        most_reserved = max(most_reserved, allocator.reserved_bytes)
    allocator.peak_allocated_bytes = max(allocator.peak_allocated_bytes, 0)
    return most_allocated, most_reserved


def _replay_stretch_checked(
    allocator: CachingAllocator, events: list[Event], begin: int, stop: int
) -> tuple[int, int]:
    """``_replay_stretch`` reading the statistics after every ALLOC (any allocator settings)."""
    most_allocated = most_reserved = 0
    for op, handle, nbytes in itertools.islice(events, begin, stop):
        if op == FREE:
            allocator.free(handle)
        elif op == EMPTY_CACHE:
            allocator.empty_cache()
        else:
            allocator.malloc(handle, nbytes)
            most_allocated = max(most_allocated, allocator.allocated_bytes)
            most_reserved = max(most_reserved, allocator.reserved_bytes)
    return most_allocated, most_reserved
