"""CUDA-graph private pools in the caching-allocator model (``CachingAllocator``'s
``begin_allocate_to_pool``, ``end_allocate_to_pool``, ``release_pool``: torch's
``beginAllocateToPool``, ``endAllocateToPool``, ``releasePool`` in
c10/cuda/CUDACachingAllocator.cpp) and the pool ``allocator_trace`` tells from a trace."""

from __future__ import annotations

from vramcalc.memory.allocator import (
    ALLOC,
    BEGIN_POOL,
    EMPTY_CACHE,
    END_POOL,
    FREE,
    RELEASE_POOL,
    AllocatorConfig,
    CachingAllocator,
    simulate,
)
from vramcalc.memory.allocator_trace import capture_streams, world_trace_from_snapshot

MIB = 2**20
CAPTURE = 7  # the capture stream


def test_a_pools_free_block_is_not_reused_outside_it():
    """30 MiB freed in the pool; the same request after the capture cudaMallocs anew
    (``simulate`` allocates on stream 0: the pool's filter here)."""
    events = [(BEGIN_POOL, 1, 0), (ALLOC, 1, 30 * MIB), (FREE, 1, 0), (END_POOL, 1, 0),
              (ALLOC, 2, 30 * MIB)]  # fmt: skip
    allocator = CachingAllocator()
    result = simulate(events, allocator=allocator)
    assert (result.peak_reserved_bytes, result.final_allocated_bytes) == (60 * MIB, 30 * MIB)
    assert allocator.segment_log == [("segment_alloc", 30 * MIB)] * 2


def test_a_capture_allocates_in_its_pool_only_on_its_stream():
    allocator = CachingAllocator()
    allocator.malloc(1, 30 * MIB, CAPTURE)
    allocator.free(1)  # a global block of the capture stream
    allocator.begin_allocate_to_pool(1, CAPTURE)
    allocator.malloc(2, 30 * MIB, 0)  # another stream: the global pool
    allocator.malloc(3, 30 * MIB, CAPTURE)  # not the global block: the pool
    assert allocator.reserved_bytes == 90 * MIB
    allocator.end_allocate_to_pool(1)
    allocator.malloc(4, 30 * MIB, CAPTURE)  # the global block again
    assert allocator.reserved_bytes == 90 * MIB


def test_empty_cache_keeps_a_pool_in_use_and_frees_it_once_released():
    events = [(BEGIN_POOL, 1, 0), (ALLOC, 1, 30 * MIB), (ALLOC, 2, 4 * 512),
              (FREE, 1, 0), (FREE, 2, 0), (END_POOL, 1, 0), (EMPTY_CACHE, 0, 0)]  # fmt: skip
    allocator = CachingAllocator()
    kept = simulate(events, allocator=allocator)
    assert (kept.final_reserved_bytes, kept.segments) == (32 * MIB, 2)
    allocator.release_pool(1)
    allocator.empty_cache()
    assert (allocator.reserved_bytes, allocator.segments(), allocator._graph_pools) == (0, 0, {})
    # the small segment is released before the large one, as release_cached_blocks does
    assert allocator.segment_log[-2:] == [("segment_free", 2 * MIB), ("segment_free", 30 * MIB)]


def test_a_shared_pool_is_freed_when_its_last_graph_releases_it():
    allocator = CachingAllocator()
    for pool_user in (1, 2):  # two captures into pool 5
        allocator.begin_allocate_to_pool(5, CAPTURE)
        allocator.malloc(pool_user, 40 * MIB, CAPTURE)
        allocator.free(pool_user)
        allocator.end_allocate_to_pool(5)
    assert allocator.reserved_bytes == 40 * MIB  # the second capture reused the first's block
    simulate([(RELEASE_POOL, 5, 0), (EMPTY_CACHE, 0, 0)], allocator=allocator)
    assert allocator.reserved_bytes == 40 * MIB
    simulate([(RELEASE_POOL, 5, 0), (EMPTY_CACHE, 0, 0)], allocator=allocator)
    assert allocator.reserved_bytes == 0


def test_a_private_pool_takes_cudamalloc_segments_under_expandable_segments():
    allocator = CachingAllocator(AllocatorConfig(expandable_segments=True))
    simulate([(ALLOC, 1, 30 * MIB), (BEGIN_POOL, 1, 0), (ALLOC, 2, 30 * MIB)],
             allocator=allocator)  # fmt: skip
    assert allocator.segment_log == [("segment_map", 40 * MIB), ("segment_alloc", 30 * MIB)]


def _capture_trace() -> list[list]:
    """A capture stream's segment that survives torch.cuda.graph's empty_cache wholly free,
    after the generator's seed and offset (8 bytes each, in the global pool)."""
    return [
        ["segment_alloc", 0x1000_0000, 40 * MIB, 0], ["alloc", 0x1000_0000, 40 * MIB, 0],
        ["free_requested", 0x1000_0000, 40 * MIB, 0], ["free_completed", 0x1000_0000, 40 * MIB, 0],
        ["segment_free", 0x1000_0000, 40 * MIB, 0],  # empty_cache, then capture_begin
        ["segment_alloc", 0x2000_0000, 2 * MIB, CAPTURE], ["alloc", 0x2000_0000, 8, CAPTURE],
        ["alloc", 0x2000_0200, 8, CAPTURE],
        ["segment_alloc", 0x3000_0000, 2 * MIB, CAPTURE], ["alloc", 0x3000_0000, 512, CAPTURE],
        ["segment_alloc", 0x4000_0000, 30 * MIB, CAPTURE], ["alloc", 0x4000_0000, 30 * MIB, CAPTURE],
        ["free_requested", 0x4000_0000, 30 * MIB, CAPTURE],
        ["free_completed", 0x4000_0000, 30 * MIB, CAPTURE],
        ["free_requested", 0x3000_0000, 512, CAPTURE], ["free_completed", 0x3000_0000, 512, CAPTURE],
        ["segment_alloc", 0x1000_0000, 40 * MIB, 0], ["alloc", 0x1000_0000, 40 * MIB, 0],
        ["free_requested", 0x1000_0000, 40 * MIB, 0], ["free_completed", 0x1000_0000, 40 * MIB, 0],
        ["segment_free", 0x1000_0000, 40 * MIB, 0],  # the pool's segments survive it
        ["alloc", 0x4000_0000, 30 * MIB, CAPTURE],  # the next capture: the pool's block
    ]  # fmt: skip


def test_a_trace_tells_its_capture_stream_and_pool():
    from vramcalc.memory.worldreplay import replay

    rows = _capture_trace()
    assert capture_streams([tuple(r) for r in rows]) == {CAPTURE}
    world = world_trace_from_snapshot(rows)
    pool_events = [e for e in world.events if e[0] not in (ALLOC, FREE, EMPTY_CACHE)]
    assert pool_events == [(BEGIN_POOL, 1, CAPTURE)]  # after the seed and offset
    allocator_result = replay(world, gpu_bound=True)
    # 40 MiB (default stream) + 2 + 2 MiB (global and private small) + 30 MiB (private)
    assert allocator_result.peak_reserved_bytes == 74 * MIB
    assert allocator_result.final_reserved_bytes == 34 * MIB


def test_a_trace_without_a_surviving_free_segment_has_no_capture_stream():
    rows = [tuple(r) for r in _capture_trace()[:-6]]  # no release after the capture
    assert capture_streams(rows) == frozenset()
