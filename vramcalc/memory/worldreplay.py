"""Replay of a world trace through the caching-allocator model, one pool per stream.

``memory/allocator.py::simulate`` replays single-stream events; a rank of an FSDP world
allocates on four streams (compute, unshard, post-backward, pre-unshard) and the caching
allocator never hands a free block of one stream to another. ``replay`` drives
``CachingAllocator.malloc(handle, nbytes, stream)`` with each event's stream, and
optionally holds blocks used on another stream until the host has waited past their
free (``gpu_bound``), as the allocator's CUDA events do when the GPU lags.
"""

from __future__ import annotations

from collections.abc import Iterable

from vramcalc.memory.allocator import (
    ALLOC,
    EMPTY_CACHE,
    FREE,
    POOL_OPS,
    AllocatorConfig,
    AllocatorResult,
    CachingAllocator,
)
from vramcalc.trace.events import WorldTrace


def replay(
    trace: WorldTrace,
    config: AllocatorConfig | None = None,
    until: str | None = None,
    gpu_bound: bool = False,
    segment_addresses: Iterable[int] = (),
) -> AllocatorResult:
    """Replay ``trace`` through the caching-allocator model, each block in its stream's pool
    (``CachingAllocator.malloc(..., stream)``); ``until`` a marker (default: the end).

    A block freed after ``record_stream`` on another stream is reused, on a GPU, only once
    that stream has done the work issued before the free (``process_events`` at each
    ``malloc``). By default the GPU keeps up with the host (the block is free at once);
    ``gpu_bound`` has the GPU as far behind as the host's waits allow: the block returns
    to its pool at the first ``malloc`` after a host wait on a point past its free
    (FSDP's rate limiter, a synchronize). Allocated bytes drop at the free either way.
    ``segment_addresses``: the driver's address of each cudaMalloc, in order (a measured
    trace's, ``allocator_trace.segment_addresses``); default the model's own.
    """

    allocator = CachingAllocator(config or AllocatorConfig(), segment_addresses)
    stop = dict(trace.markers).get(until, len(trace.events)) if until else len(trace.events)
    malloc, free, live = allocator.malloc, allocator.free, allocator._live
    cross = trace.cross_stream if gpu_bound else frozenset()
    syncs = sorted(trace.sync_points)
    next_sync, done_upto = 0, 0
    pending: list[tuple[int, int]] = []  # (event index of the free, handle)

    def release(upto: int) -> None:
        keep = []
        for freed_at, handle in pending:
            if freed_at < upto:
                block = live.get(handle)
                if block is not None:  # free() counts it out again
                    allocator.allocated_bytes += block.size
                    allocator.requested_bytes += block.requested
                free(handle)
            else:
                keep.append((freed_at, handle))
        pending[:] = keep

    for index in range(stop):
        op, handle, nbytes = trace.events[index]
        if op == ALLOC:
            if pending:
                while next_sync < len(syncs) and syncs[next_sync][0] <= index:
                    done_upto = max(done_upto, syncs[next_sync][1])
                    next_sync += 1
                release(done_upto)
            if not malloc(handle, nbytes, trace.streams[index]):
                return allocator.result(oom_event_index=index, oom_request_bytes=nbytes)
        elif op == FREE:
            if handle in cross:
                block = live.get(handle)
                if block is not None:
                    allocator.allocated_bytes -= block.size
                    allocator.requested_bytes -= block.requested
                pending.append((index, handle))
            else:
                free(handle)
        elif op == EMPTY_CACHE:
            release(index + 1)  # synchronize_and_free_events
            allocator.empty_cache()
        elif op in POOL_OPS:  # a CUDA-graph private pool: (op, pool id, stream)
            allocator.pool_event(op, handle, nbytes)
    return allocator.result()
