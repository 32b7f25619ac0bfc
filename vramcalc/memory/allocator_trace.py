"""What a real run tells the allocator simulator: its ``PYTORCH_CUDA_ALLOC_CONF``
string and its ``torch.cuda.memory._snapshot()["device_traces"][device]``.

Trace entries carry ``action``, ``addr`` and ``size`` (``record_trace`` calls in
``c10/cuda/CUDACachingAllocator.cpp``): ``alloc`` (``alloc_found_block``) and
both frees record the *requested* size, not the rounded block size, so a replay
rounds it again exactly as torch did; ``segment_alloc``/``segment_free`` record
segment sizes, ``segment_map``/``segment_unmap`` the mapped page range, ``oom``
the rounded request (and the device's free bytes in ``addr``).

A block becomes reusable at ``free_completed`` (``free_block`` puts it back in
its pool); ``free_requested`` (``free``) only lowers ``allocated_bytes``, and
the two are adjacent unless the block was used on another stream
(``recordStream``), so FREE is placed at ``free_completed``.

A rank of an FSDP world allocates on several streams, each with its own pool, and frees
blocks used on another stream late: ``world_trace_from_snapshot`` keeps each entry's
``stream`` and both moments of such a free, as a ``WorldTrace`` that
``memory/worldreplay.replay(..., gpu_bound=True)`` replays.

A run that captured CUDA graphs (torch.compile's cudagraph trees) allocated on its capture
stream in a private pool the trace does not name: ``capture_streams`` tells the stream from
its segments, and ``world_trace_from_snapshot`` puts its allocations in that pool.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vramcalc.errors import AllocatorTraceError
from vramcalc.memory.allocator import (
    ALLOC,
    BEGIN_POOL,
    EMPTY_CACHE,
    END_POOL,
    FREE,
)
from vramcalc.trace.events import WorldTrace

SEGMENT_ACTIONS = ("segment_alloc", "segment_free", "segment_map", "segment_unmap")
_RELEASES = ("segment_free", "segment_unmap")
_IGNORED_ACTIONS = ("free_requested", "segment_alloc", "segment_map", "snapshot", "user_defined")


def _row(entry: Mapping[str, Any] | Sequence[Any]) -> tuple[str, int, int, int]:
    """(action, addr, size, stream) of a snapshot entry dict or a compact row."""
    if isinstance(entry, Mapping):
        return entry["action"], entry.get("addr", 0), entry.get("size", 0), entry.get("stream", 0)
    action, addr, size = entry[:3]
    return action, addr, size, entry[3] if len(entry) > 3 else 0


def events_from_snapshot_trace(
    entries: Iterable[Mapping[str, Any] | Sequence[Any]],
) -> list[tuple[int, int, int]]:
    """Simulator events from trace entries (dicts, or ``[action, addr, size]`` rows).

    ``alloc`` -> ALLOC (handle = address, requested size); ``free_completed`` ->
    FREE; ``oom`` -> an ALLOC of its size that is never freed (the request that
    failed: the simulator decides whether it fits ``capacity_bytes``). Each run
    of ``segment_free``/``segment_unmap`` becomes one EMPTY_CACHE: torch gives
    memory back only in ``release_cached_blocks`` (``empty_cache``, or a failed
    cudaMalloc, whose retry ``release_cached_blocks`` makes the same state)
    and in ``release_available_cached_blocks``, which frees a subset when
    ``max_split_size`` is set (there the replay releases more than the run did).
    The trace must start from an empty allocator (record before the first CUDA
    allocation, with ``max_entries`` above the number of events). A capture stream's
    allocations go to its private pool as in ``world_trace_from_snapshot`` (the pool's
    filter is then stream 0, where these events allocate).
    """
    rows = [_row(entry) for entry in entries]
    pools = _pooled_allocs(rows)
    pooling: int | None = None  # the pool allocations go to now
    events: list[tuple[int, int, int]] = []
    releasing = False
    for index, (action, addr, size, _) in enumerate(rows):
        if action in ("alloc", "oom"):
            pool = pools.get(index)
            if pool != pooling:
                if pooling is not None:
                    events.append((END_POOL, pooling, 0))
                if pool is not None:
                    events.append((BEGIN_POOL, pool, 0))
                pooling = pool
        if action in _RELEASES:
            if not releasing:
                events.append((EMPTY_CACHE, 0, 0))
            releasing = True
            continue
        releasing = False
        if action == "alloc":
            events.append((ALLOC, addr, size))
        elif action == "free_completed":
            events.append((FREE, addr, 0))
        elif action == "oom":
            events.append((ALLOC, -1 - index, size))
        elif action not in _IGNORED_ACTIONS:
            raise AllocatorTraceError(f"trace entry {index}: unknown action {action!r}")
    return events


#: ``CUDAGeneratorState::register_graph`` (aten/src/ATen/cuda/CUDAGeneratorImpl.cpp): the
#: first graph captured with a generator allocates its graph-safe seed and offset
#: (``at::empty({1}, kLong)``, 8 bytes each) in ``CUDAGraph::capture_begin`` before
#: ``beginAllocateToPool``: on the capture stream, in the global pool
GENERATOR_STATE_ALLOCS = (8, 8)


def capture_streams(rows: Sequence[tuple[str, int, int, int]]) -> frozenset[int]:
    """The streams that allocated in a CUDA-graph private pool: those with a segment that
    was wholly free at a release of cached blocks and was not released.
    ``release_cached_blocks`` (``empty_cache``, torch.cuda.graph's ``__enter__``) cudaFrees
    every wholly free segment of the global pools, but a private pool's only once no graph
    uses it (``releasePool``, ``graph_pools_freeable``; c10/cuda/CUDACachingAllocator.cpp).
    The default stream cannot capture (``cudaStreamBeginCapture`` on the legacy stream)."""
    if all(row[3] == 0 for row in rows):
        return frozenset()
    bases: list[int] = []  # sorted segment_alloc addresses
    segments: dict[int, list[int]] = {}  # base -> [size, stream, live blocks]
    segment_of: dict[int, int] = {}  # block address -> its segment's base
    found: set[int] = set()
    releasing = False
    for action, addr, size, stream in rows:
        if action == "segment_free":
            releasing = True
            del bases[bisect_right(bases, addr) - 1], segments[addr]
            continue
        if releasing:  # the end of a release run: what survived it wholly free
            found.update(st for _, st, live in segments.values() if live == 0)
            releasing = False
        if action == "segment_alloc":
            bases.insert(bisect_right(bases, addr), addr)
            segments[addr] = [size, stream, 0]
        elif action == "alloc":
            i = bisect_right(bases, addr) - 1
            if i >= 0 and addr < bases[i] + segments[bases[i]][0]:  # not an expandable one
                segments[bases[i]][2] += 1
                segment_of[addr] = bases[i]
        elif action == "free_completed" and (base := segment_of.pop(addr, None)) is not None:
            segments[base][2] -= 1
    return frozenset(found - {0})


def _pooled_allocs(rows: Sequence[tuple[str, int, int, int]]) -> dict[int, int]:
    """Index of each allocation (``alloc`` / ``oom`` row) made in a CUDA-graph private pool ->
    that pool's id: one pool per capture stream (``capture_streams``), numbered from 1, all
    its allocations but those made in the global pool (``_global_allocs_of_captures``)."""
    captures = capture_streams(rows)
    in_global = _global_allocs_of_captures(rows, captures)
    pool_ids = {stream: n + 1 for n, stream in enumerate(sorted(captures))}
    return {
        index: pool_ids[stream]
        for index, (action, _, _, stream) in enumerate(rows)
        if action in ("alloc", "oom") and stream in captures and index not in in_global
    }


def _global_allocs_of_captures(
    rows: Sequence[tuple[str, int, int, int]], captures: frozenset[int]
) -> set[int]:
    """Indices of the allocations of capture streams made in the global pool: the
    generator's seed and offset (``GENERATOR_STATE_ALLOCS``), a stream's first allocations."""
    out: set[int] = set()
    for stream in captures:
        first = [i for i, row in enumerate(rows) if row[0] == "alloc" and row[3] == stream]
        first = first[: len(GENERATOR_STATE_ALLOCS)]
        if tuple(rows[i][2] for i in first) == GENERATOR_STATE_ALLOCS:
            out.update(first)
    return out


def world_trace_from_snapshot(entries: Iterable[Mapping[str, Any] | Sequence[Any]]) -> WorldTrace:
    """A measured trace (dicts, or ``[action, addr, size, stream]`` rows) as a ``WorldTrace``:
    each ALLOC in its ``stream``'s pool (handles numbered afresh: addresses are reused).

    A free whose ``free_completed`` does not follow its ``free_requested`` at once (the block
    was used on another stream) is a FREE at ``free_requested``, where torch lowers
    ``allocated_bytes``, of a handle in ``cross_stream``, with a host wait (``sync_points``)
    at its ``free_completed``, where the block returns to its pool: ``replay(trace,
    gpu_bound=True)`` gives it back at the next ``malloc``, as ``process_events`` does.
    Segment releases and ``oom`` are read as ``events_from_snapshot_trace`` reads them.

    A capture stream's allocations (``capture_streams``; cudagraph trees allocate on theirs
    only to capture or warm up a graph, in the tree's pool) go to one private pool per
    stream, never released: a ``BEGIN_POOL`` event (pool id, stream) before the first, an
    ``END_POOL`` before any made in the global pool (``_global_allocs_of_captures``)."""
    rows = [_row(entry) for entry in entries]
    pools = _pooled_allocs(rows)
    pooling: dict[int, int] = {}  # capture stream -> its pool, while allocating to it
    events: list[tuple[int, int, int]] = []
    streams: list[int] = []
    syncs: list[tuple[int, int]] = []
    cross: set[int] = set()
    handle_at: dict[int, int] = {}  # address -> handle of the block allocated there now
    freed_at: dict[int, int] = {}  # handle -> position of its late FREE
    releasing = False
    for index, (action, addr, size, stream) in enumerate(rows):
        if action in _RELEASES:
            if not releasing:
                events.append((EMPTY_CACHE, 0, 0))
                streams.append(0)
            releasing = True
            continue
        releasing = False
        if action in ("alloc", "oom"):
            if (index in pools) != (stream in pooling):
                if stream in pooling:
                    events.append((END_POOL, pooling.pop(stream), stream))
                else:
                    pooling[stream] = pools[index]
                    events.append((BEGIN_POOL, pools[index], stream))
                streams.append(stream)
            handle = len(events) + 1
            if action == "alloc":
                handle_at[addr] = handle
            events.append((ALLOC, handle, size))
            streams.append(stream)
        elif action == "free_requested":
            handle = handle_at[addr]
            following = rows[index + 1] if index + 1 < len(rows) else None
            if following is None or following[:2] != ("free_completed", addr):
                cross.add(handle)
                freed_at[handle] = len(events)
            events.append((FREE, handle, 0))
            streams.append(stream)
        elif action == "free_completed":
            handle = handle_at.pop(addr)
            if handle in freed_at:
                syncs.append((len(events), freed_at.pop(handle) + 1))
        elif action not in _IGNORED_ACTIONS:
            raise AllocatorTraceError(f"trace entry {index}: unknown action {action!r}")
    return WorldTrace(tuple(events), tuple(streams), (), tuple(syncs), 0, "measured",
                      cross_stream=frozenset(cross))  # fmt: skip


def segment_events(entries: Iterable[Mapping[str, Any] | Sequence[Any]]) -> list[tuple[str, int]]:
    """(action, bytes) of every segment action of a trace, in order: compare with
    ``CachingAllocator.segment_log`` of its replay (addresses differ, sizes must not)."""
    rows = (_row(entry) for entry in entries)
    return [(action, size) for action, _, size, _ in rows if action in SEGMENT_ACTIONS]


def segment_addresses(entries: Iterable[Mapping[str, Any] | Sequence[Any]]) -> list[int]:
    """The driver's address of every ``segment_alloc`` of a trace, in order: a replay given
    them (``CachingAllocator(segment_addresses=...)``) breaks best fit's ties as the run did."""
    rows = (_row(entry) for entry in entries)
    return [addr for action, addr, _, _ in rows if action == "segment_alloc"]
