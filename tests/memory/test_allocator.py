"""The caching-allocator simulation against hand-derived numbers.

Every expected value follows from a named rule of c10/cuda/CUDACachingAllocator.cpp
(comments cite it); MiB = 2**20 bytes throughout.
"""

import random

import pytest

from vramcalc.errors import AllocatorTraceError, InvalidPlanError
from vramcalc.memory.alloc_conf import allocator_config
from vramcalc.memory.allocator import (
    ALLOC,
    EMPTY_CACHE,
    FREE,
    RELEASE_POOL,
    AllocatorConfig,
    CachingAllocator,
    simulate,
)
from vramcalc.memory.allocator_trace import events_from_snapshot_trace, segment_events

MIB = 2**20
KIB = 2**10
DEFAULT = AllocatorConfig()
EXPANDABLE = AllocatorConfig(expandable_segments=True)


def allocator(*sizes, config=DEFAULT):
    """An allocator after malloc of ``sizes`` with handles 0, 1, 2, ..."""
    a = CachingAllocator(config)
    for handle, nbytes in enumerate(sizes):
        assert a.malloc(handle, nbytes)
    return a


# ---- rounding and pools ---------------------------------------------------------


@pytest.mark.parametrize(("nbytes", "block_bytes"), [(1, 512), (512, 512), (513, 1024)])
def test_round_size_to_512(nbytes, block_bytes):
    # round_size: kMinBlockSize * ceil(size / kMinBlockSize); allocated_bytes counts the block
    a = allocator(nbytes)
    assert (a.allocated_bytes, a.requested_bytes) == (block_bytes, nbytes)
    assert a.reserved_bytes == 2 * MIB  # get_allocation_size: kSmallBuffer for <= 1 MiB


def test_two_small_requests_share_one_2_mib_segment():
    # 600 KiB = 1200 * 512; small pool, should_split: remainder >= 512 is split
    a = allocator(600 * KIB, 600 * KIB)
    assert (a.allocated_bytes, a.reserved_bytes) == (1200 * KIB, 2 * MIB)
    assert (a.cuda_malloc_calls, a.segments()) == (1, 1)


def test_small_pool_splits_down_to_a_512_byte_remainder():
    # should_split (small pool): remainder >= kMinBlockSize, so 512 bytes are split off
    a = allocator(1 * MIB, 1 * MIB - 512)
    assert a.allocated_bytes == 2 * MIB - 512
    assert a.malloc(2, 1) and (a.cuda_malloc_calls, a.allocated_bytes) == (1, 2 * MIB)


def test_5_mib_request_makes_a_20_mib_segment_that_the_next_one_splits():
    # get_allocation_size: 1 MiB < size < kMinLargeAlloc (10 MiB) -> kLargeBuffer 20 MiB;
    # should_split (large pool): remainder 15 MiB > kSmallSize -> split, reused by the 2nd
    a = allocator(5 * MIB)
    assert (a.allocated_bytes, a.reserved_bytes) == (5 * MIB, 20 * MIB)
    assert a.malloc(1, 5 * MIB)
    assert (a.allocated_bytes, a.reserved_bytes, a.cuda_malloc_calls) == (10 * MIB, 20 * MIB, 1)


def test_12_mib_plus_one_byte_rounds_to_a_14_mib_segment():
    # round_size -> 12 MiB + 512; >= kMinLargeAlloc -> segment rounded up to kRoundLarge 2 MiB
    a = allocator(12 * MIB + 1)
    assert (a.allocated_bytes, a.reserved_bytes) == (12 * MIB + 512, 14 * MIB)
    assert a.segment_log == [("segment_alloc", 14 * MIB)]


# ---- best fit, splitting, merging ------------------------------------------------


def test_best_fit_and_the_large_pool_split_threshold():
    a = allocator(12 * MIB, 16 * MIB, 14 * MIB)  # three exact segments (>= 10 MiB, 2 MiB multiples)
    for handle in range(3):
        a.free(handle)
    # get_free_block: lower_bound on (stream, size, address) -> the 14 MiB block, not 16 MiB;
    # should_split: remainder 1 MiB is not > kSmallSize, so the whole block is allocated
    assert a.malloc(10, 13 * MIB)
    assert a.allocated_bytes == 14 * MIB
    assert a.malloc(11, 11 * MIB)  # best fit: the 12 MiB block, remainder 1 MiB kept in it
    assert a.allocated_bytes == 26 * MIB
    # 16 MiB block: remainder 3 MiB + 512 > 1 MiB -> split; allocated counts 13 MiB - 512 only
    assert a.malloc(12, 13 * MIB - 512)
    assert a.allocated_bytes == 39 * MIB - 512
    assert (a.cuda_malloc_calls, a.reserved_bytes, a.requested_bytes) == (
        3,
        42 * MIB,
        37 * MIB - 512,
    )
    assert a.malloc(13, 3 * MIB + 512)  # the split-off remainder serves it: no new segment
    assert a.cuda_malloc_calls == 3


def test_remainder_of_exactly_one_mib_plus_512_is_split_one_mib_is_not():
    a = allocator(14 * MIB)
    a.free(0)
    assert a.malloc(1, 13 * MIB - 512)  # remainder 1 MiB + 512 > kSmallSize: split
    assert a.allocated_bytes == 13 * MIB - 512
    a.free(1)  # free_block merges the two halves back into 14 MiB
    assert a.malloc(2, 13 * MIB)  # remainder 1 MiB: not split, the block stays whole
    assert a.allocated_bytes == 14 * MIB


def test_freeing_the_middle_block_merges_both_neighbours():
    a = allocator(4 * MIB, 4 * MIB, 4 * MIB)  # one 20 MiB segment: 4 | 4 | 4 | free 8
    a.free(0)
    a.free(2)  # try_merge_blocks with the free 8 MiB after it -> 12 MiB
    assert a.malloc(3, 12 * MIB)  # fits the merged block exactly: no cudaMalloc
    assert a.cuda_malloc_calls == 1
    a.free(3)
    a.free(1)  # merges 4 MiB before and 12 MiB after: the segment is whole again
    a.empty_cache()  # release_blocks frees only blocks with no prev/next
    assert a.reserved_bytes == 0
    assert a.segment_log == [("segment_alloc", 20 * MIB), ("segment_free", 20 * MIB)]


def test_empty_cache_keeps_a_partly_used_segment():
    a = allocator(4 * MIB, 4 * MIB)
    a.free(0)
    a.empty_cache()
    assert (a.reserved_bytes, a.segments()) == (20 * MIB, 1)


# ---- fragmentation ----------------------------------------------------------------


def test_fragmentation_holes_force_a_new_segment():
    # 4 x 5 MiB fill one 20 MiB segment; freeing the 1st and 3rd leaves two 5 MiB holes
    # that cannot merge, so a 10 MiB request takes a new exact 10 MiB segment
    events = [(ALLOC, h, 5 * MIB) for h in range(4)] + [(FREE, 0, 0), (FREE, 2, 0)]
    result = simulate([*events, (ALLOC, 9, 10 * MIB)])
    assert (result.peak_reserved_bytes, result.final_allocated_bytes) == (30 * MIB, 20 * MIB)
    assert (result.segments, result.cuda_malloc_calls) == (2, 2)
    # expandable: the 10 MiB request maps one more 20 MiB page after the segment
    result = simulate([*events, (ALLOC, 9, 10 * MIB)], EXPANDABLE)
    assert (result.peak_reserved_bytes, result.final_allocated_bytes) == (40 * MIB, 20 * MIB)
    assert (result.segments, result.cuda_malloc_calls) == (1, 2)


GROWING_BATCH = (
    [(ALLOC, h, 30 * MIB) for h in range(10)]
    + [(FREE, h, 0) for h in range(10)]
    + [(ALLOC, 10 + h, 32 * MIB) for h in range(10)]
)


def test_growing_tensors_fragment_segments_but_tile_an_expandable_one():
    # 30 MiB segments cannot hold 32 MiB tensors: 10 new segments, 300 MiB cached and idle
    result = simulate(GROWING_BATCH)
    assert (result.peak_reserved_bytes, result.peak_allocated_bytes) == (620 * MIB, 320 * MIB)
    assert (result.segments, result.cuda_malloc_calls) == (20, 20)
    # expandable: the 30 MiB tensors tile 300 MiB of 20 MiB pages exactly; once freed they
    # merge into one block that the 32 MiB tensors split, and one more page covers the end
    result = simulate(GROWING_BATCH, EXPANDABLE)
    assert (result.peak_reserved_bytes, result.peak_allocated_bytes) == (320 * MIB, 320 * MIB)
    assert (result.segments, result.cuda_malloc_calls) == (1, 11)


# ---- expandable segments ------------------------------------------------------------


def test_expandable_pages_are_2_mib_small_and_20_mib_large():
    assert allocator(600 * KIB, 600 * KIB, config=EXPANDABLE).reserved_bytes == 2 * MIB
    a = allocator(5 * MIB, 5 * MIB, config=EXPANDABLE)
    assert (a.reserved_bytes, a.cuda_malloc_calls) == (20 * MIB, 1)
    a = allocator(12 * MIB + 1, config=EXPANDABLE)  # one 20 MiB page, not a 14 MiB segment
    assert (a.allocated_bytes, a.reserved_bytes) == (12 * MIB + 512, 20 * MIB)


def test_expandable_empty_cache_unmaps_only_whole_free_pages():
    a = allocator(30 * MIB, 5 * MIB, config=EXPANDABLE)  # pages [0,20) [20,40): 30 | 5 | free 5
    a.free(0)
    a.empty_cache()  # unmap_block: [0,20) unmapped, [20,30) stays mapped (page has the 5 MiB)
    assert (a.reserved_bytes, a.segments()) == (20 * MIB, 1)
    assert a.segment_log == [("segment_map", 40 * MIB), ("segment_unmap", 20 * MIB)]
    a.free(1)
    a.empty_cache()  # the rest merges with the unmapped range; the segment goes away
    assert (a.reserved_bytes, a.segments()) == (0, 0)
    assert a.malloc(2, 1 * MIB + 512)  # a fresh virtual segment maps one page again
    assert a.reserved_bytes == 20 * MIB


def test_expandable_best_fit_skips_a_block_that_could_grow():
    # pages of 20 MiB: [A 12 | B 8] [C 12 | free 8, then unmapped]; A freed -> free 12 MiB
    a = allocator(12 * MIB, 8 * MIB, 12 * MIB, config=EXPANDABLE)
    a.free(0)
    # get_free_block: lower_bound finds the 8 MiB tail, whose size counts the unmapped range
    # after it; the next block (12 MiB) could grow less, so it is taken and split instead
    assert a.malloc(3, 8 * MIB)
    # so 12 MiB no longer fits a free block: the tail grows by one page (8 + 20, split)
    assert a.malloc(4, 12 * MIB)
    assert (a.reserved_bytes, a.allocated_bytes) == (60 * MIB, 40 * MIB)


# ---- capacity and OOM ---------------------------------------------------------------


def test_capacity_releases_cached_segments_then_reports_oom():
    config = AllocatorConfig(capacity_bytes=60 * MIB)
    events = [(ALLOC, 0, 30 * MIB), (FREE, 0, 0), (ALLOC, 1, 40 * MIB), (ALLOC, 2, 30 * MIB)]
    a = CachingAllocator(config)
    # 30 MiB cached + 40 MiB > 60 MiB: release_cached_blocks frees the 30 MiB, retry fits
    assert a.malloc(0, 30 * MIB) and (a.free(0) is None) and a.malloc(1, 40 * MIB)
    assert a.segment_log == [
        ("segment_alloc", 30 * MIB),
        ("segment_free", 30 * MIB),
        ("segment_alloc", 40 * MIB),
    ]
    assert a.alloc_retries == 1
    result = simulate(events, config)  # 40 + 30 > 60 and nothing cached: OOM
    assert (result.oom_event_index, result.oom_request_bytes) == (3, 30 * MIB)
    assert (result.final_reserved_bytes, result.peak_reserved_bytes) == (40 * MIB, 40 * MIB)
    assert simulate(events).oom_event_index is None


def test_replay_stops_at_the_oom():
    events = [(ALLOC, 0, 50 * MIB), (ALLOC, 1, 50 * MIB), (ALLOC, 2, 1)]
    result = simulate(events, AllocatorConfig(capacity_bytes=64 * MIB))
    assert (result.oom_event_index, result.oom_request_bytes) == (1, 50 * MIB)
    assert result.peak_allocated_bytes == 50 * MIB  # the small request after it never ran


def test_expandable_map_fails_at_capacity():
    events = [(ALLOC, 0, 30 * MIB), (ALLOC, 1, 30 * MIB)]  # needs 2 + 1 pages of 20 MiB
    config = AllocatorConfig(expandable_segments=True, capacity_bytes=50 * MIB)
    result = simulate(events, config)
    assert (result.oom_event_index, result.final_reserved_bytes) == (1, 40 * MIB)


# ---- max_split_size ----------------------------------------------------------------------


def test_max_split_size_keeps_oversize_blocks_from_small_requests():
    events = [(ALLOC, 0, 40 * MIB), (FREE, 0, 0), (ALLOC, 1, 8 * MIB)]
    # default: the 8 MiB request splits the cached 40 MiB block (remainder 32 MiB > 1 MiB)
    assert simulate(events).peak_reserved_bytes == 40 * MIB
    # get_free_block: size < max_split_size and block >= max_split_size -> not used
    config = allocator_config("max_split_size_mb:32")
    result = simulate(events, config)
    assert (result.peak_reserved_bytes, result.cuda_malloc_calls) == (60 * MIB, 2)


def test_oversize_block_serves_requests_within_max_non_split_rounding():
    config = AllocatorConfig(max_split_size_bytes=32 * MIB)
    a = allocator(60 * MIB, config=config)
    a.free(0)
    assert a.malloc(1, 34 * MIB)  # 60 >= 34 + 20 (max_non_split_rounding): new segment
    assert (a.cuda_malloc_calls, a.allocated_bytes) == (2, 34 * MIB)
    assert a.malloc(2, 41 * MIB)  # 60 < 41 + 20: reused whole, no split (size >= max_split)
    assert (a.cuda_malloc_calls, a.allocated_bytes) == (2, 94 * MIB)


def test_release_available_cached_blocks_frees_one_oversize_block():
    config = AllocatorConfig(max_split_size_bytes=32 * MIB, capacity_bytes=100 * MIB)
    a = allocator(40 * MIB, 40 * MIB, config=config)
    a.free(0)
    a.free(1)
    # 30 MiB may not use an oversize block; 80 + 30 > 100, so the smallest oversize block
    # >= max_split_size (the first 40 MiB) is released and the 30 MiB segment fits
    assert a.malloc(2, 30 * MIB)
    assert a.reserved_bytes == 70 * MIB
    assert a.segment_log[2:] == [("segment_free", 40 * MIB), ("segment_alloc", 30 * MIB)]


def test_release_available_cached_blocks_frees_the_largest_blocks_first():
    config = AllocatorConfig(max_split_size_bytes=32 * MIB, capacity_bytes=100 * MIB)
    a = allocator(40 * MIB, 50 * MIB, config=config)
    a.free(0)
    a.free(1)
    # no single oversize block >= 60 MiB: free from the largest down until 60 MiB are freed
    # (release_cached_blocks would go smallest first: 40 then 50)
    assert a.malloc(2, 60 * MIB)
    assert a.segment_log[2:] == [
        ("segment_free", 50 * MIB),
        ("segment_free", 40 * MIB),
        ("segment_alloc", 60 * MIB),
    ]
    assert a.alloc_retries == 0  # no second, release-everything attempt (num_alloc_retries)


def test_roundup_power2_divisions():
    # roundup_power2_next_division: 5 MiB + 1 lies in [4, 8) MiB, 4 steps of 1 MiB -> 6 MiB
    config = allocator_config("roundup_power2_divisions:4")
    assert allocator(5 * MIB + 1, config=config).allocated_bytes == 6 * MIB
    assert allocator(5 * MIB + 1).allocated_bytes == 5 * MIB + 512
    assert allocator(1200, config=config).allocated_bytes == 1536  # 1200 <= 512 * 4: plain
    table = allocator_config("roundup_power2_divisions:[64:8,>:2]")
    assert table.roundup_power2_divisions == (8,) * 7 + (2,) * 9


# ---- configuration ----------------------------------------------------------------------------


def test_allocator_config_reads_the_settings():
    config = allocator_config(
        "expandable_segments:True, max_split_size_mb:128,pinned_use_cuda_host_register:True",
        capacity_bytes=80 * 2**30,
    )
    assert config == AllocatorConfig(
        expandable_segments=True, max_split_size_bytes=128 * MIB, capacity_bytes=80 * 2**30
    )
    assert allocator_config("") == AllocatorConfig()


def test_allocator_config_names_every_bad_key():
    with pytest.raises(InvalidPlanError) as err:
        allocator_config(
            "expandable_segments:true,max_split_size_mb:10,backend:cudaMallocAsync,foo:1"
        )
    assert err.value.problems == [
        "max_split_size_mb must be >= 20 (large_segment_size_mb), got 10",
        "expandable_segments must be True or False, got 'true'",
        "backend:cudaMallocAsync is not modelled (only the native allocator)",
        "unknown PYTORCH_CUDA_ALLOC_CONF key 'foo'",
    ]


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ("max_split_size_mb", "PYTORCH_CUDA_ALLOC_CONF: expected 'max_split_size_mb:<value>'"),
        ("max_split_size_mb:1.5", "max_split_size_mb must be a whole number of MiB, got '1.5'"),
        ("per_process_memory_fraction:0.5", "per_process_memory_fraction is not modelled; give capacity_bytes instead"),
        ("roundup_power2_divisions:3", "roundup_power2_divisions: bad entry '3' (powers of two or 0)"),
        ("garbage_collection_threshold:1.5", "garbage_collection_threshold must be in (0, 1), got '1.5'"),
    ],
)  # fmt: skip
def test_allocator_config_rejects(env, problem):
    with pytest.raises(InvalidPlanError) as err:
        allocator_config(env)
    assert err.value.problems == [problem]


def test_config_validates_when_built():
    with pytest.raises(InvalidPlanError, match="max_split_size_bytes must be >= large_segment"):
        AllocatorConfig(max_split_size_bytes=MIB)


# ---- events and traces -------------------------------------------------------------------------


def test_malformed_events_raise():
    with pytest.raises(AllocatorTraceError, match="handle 7, which is not allocated"):
        simulate([(FREE, 7, 0)])
    with pytest.raises(AllocatorTraceError, match="allocated twice"):
        simulate([(ALLOC, 1, 10), (ALLOC, 1, 10)])
    with pytest.raises(AllocatorTraceError, match="unknown op 9"):
        simulate([(9, 1, 10)])
    with pytest.raises(AllocatorTraceError, match="pool 3 released more often"):
        simulate([(RELEASE_POOL, 3, 0)])


def test_zero_byte_allocations_never_reach_the_allocator():
    result = simulate([(ALLOC, 1, 0), (FREE, 1, 0)])
    assert (result.peak_reserved_bytes, result.cuda_malloc_calls) == (0, 0)


def test_empty_cache_event():
    result = simulate([(ALLOC, 0, 30 * MIB), (FREE, 0, 0), (EMPTY_CACHE, 0, 0)])
    assert (result.peak_reserved_bytes, result.final_reserved_bytes, result.segments) == (
        30 * MIB,
        0,
        0,
    )


# A trace as torch records it (record_trace calls): alloc and frees carry the requested
# size, segment actions the segment size; empty_cache shows only as segment_free entries.
TRACE = [
    {"action": "segment_alloc", "addr": 4096, "size": 20 * MIB, "stream": 0},
    {"action": "alloc", "addr": 4096, "size": 5 * MIB - 100, "stream": 0},
    {"action": "alloc", "addr": 4096 + 5 * MIB, "size": 3 * MIB, "stream": 0},
    {"action": "free_requested", "addr": 4096, "size": 5 * MIB - 100, "stream": 0},
    {"action": "free_completed", "addr": 4096, "size": 5 * MIB - 100, "stream": 0},
    {"action": "free_requested", "addr": 4096 + 5 * MIB, "size": 3 * MIB, "stream": 0},
    {"action": "free_completed", "addr": 4096 + 5 * MIB, "size": 3 * MIB, "stream": 0},
    {"action": "snapshot", "addr": 0, "size": 0, "stream": 0},
    {"action": "segment_free", "addr": 4096, "size": 20 * MIB, "stream": 0},
    {"action": "segment_alloc", "addr": 8192, "size": 2 * MIB, "stream": 0},
    {"action": "alloc", "addr": 8192, "size": 100, "stream": 0},
    {"action": "oom", "addr": 123, "size": 80 * MIB, "stream": 0},
]
TRACE_EVENTS = [
    (ALLOC, 4096, 5 * MIB - 100),
    (ALLOC, 4096 + 5 * MIB, 3 * MIB),
    (FREE, 4096, 0),
    (FREE, 4096 + 5 * MIB, 0),
    (EMPTY_CACHE, 0, 0),
    (ALLOC, 8192, 100),
    (ALLOC, -12, 80 * MIB),
]


def test_events_from_snapshot_trace():
    assert events_from_snapshot_trace(TRACE) == TRACE_EVENTS
    rows = [[e["action"], e["addr"], e["size"]] for e in TRACE]  # the harness's compact form
    assert events_from_snapshot_trace(rows) == TRACE_EVENTS


def test_replayed_trace_reproduces_its_segments():
    a = CachingAllocator()
    for op, handle, nbytes in TRACE_EVENTS[:-1]:
        if op == ALLOC:
            a.malloc(handle, nbytes)
        elif op == FREE:
            a.free(handle)
        else:
            a.empty_cache()
    assert a.segment_log == segment_events(TRACE)
    result = simulate(TRACE_EVENTS, AllocatorConfig(capacity_bytes=64 * MIB))
    assert (result.oom_event_index, result.oom_request_bytes) == (6, 80 * MIB)


def test_unknown_trace_action_raises():
    with pytest.raises(AllocatorTraceError, match="entry 1: unknown action 'allocate'"):
        events_from_snapshot_trace([["alloc", 1, 2], ["allocate", 1, 2]])


# ---- the instrument against the real allocator (opt-in: pytest -m gpu) ---------------------


def mixed_workload(n_events=20_000, seed=1):
    """Sizes log-uniform from 512 B to 64 MiB; frees mostly the newest tensor, 30 % a random one."""
    rng = random.Random(seed)
    live, events, handle = [], [], 0
    while len(events) < n_events:
        if live and (rng.random() < 0.5 or len(events) + len(live) >= n_events):
            j = rng.randrange(len(live)) if rng.random() < 0.3 else len(live) - 1
            live[j], live[-1] = live[-1], live[j]
            events.append((FREE, live.pop(), 0))
        else:
            events.append((ALLOC, handle, int(2 ** rng.uniform(9, 26))))
            live.append(handle)
            handle += 1
    return events


def run_on_gpu(events, conf, fraction=None):
    """Run ``events`` as uint8 CUDA tensors under ``conf``; torch's stats and trace."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.cuda.empty_cache()
    if torch.cuda.memory_reserved() != 0:
        pytest.skip("the caching allocator is not empty (tensors left by other tests)")
    torch.cuda.memory._set_allocator_settings(conf)
    torch.cuda.set_per_process_memory_fraction(fraction or 1.0)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.reset_accumulated_memory_stats()
    torch.cuda.memory._record_memory_history(context=None, stacks="python", max_entries=10**7)
    live, oom_index = {}, None
    try:
        for index, (op, handle, nbytes) in enumerate(events):
            if op == FREE:
                del live[handle]
                continue
            try:
                live[handle] = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            except torch.OutOfMemoryError:
                oom_index = index
                break
        stats = torch.cuda.memory_stats()
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(None)
        live.clear()
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    capacity = None if fraction is None else int(fraction * total)  # allowed_memory_maximum
    return stats, trace, oom_index, capacity


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("conf", "fraction"),
    [
        ("expandable_segments:False", None),
        ("expandable_segments:True", None),
        ("expandable_segments:False,max_split_size_mb:64", None),
        ("expandable_segments:False,roundup_power2_divisions:4", None),
        ("expandable_segments:False", 0.004),  # ~575 MiB on an H200: releases, then OOM
        ("expandable_segments:False,max_split_size_mb:32", 0.004),
    ],
)
def test_simulation_matches_the_cuda_allocator(conf, fraction):
    events = mixed_workload()
    stats, trace, oom_index, capacity = run_on_gpu(events, conf, fraction)
    config = allocator_config(conf, capacity_bytes=capacity)
    sim = CachingAllocator(config)
    sim_oom = next((i for i, (op, h, n) in enumerate(events) if not apply(sim, op, h, n)), None)
    assert {
        "peak_allocated": sim.peak_allocated_bytes,
        "peak_reserved": sim.peak_reserved_bytes,
        "peak_requested": sim.peak_requested_bytes,
        "reserved": sim.reserved_bytes,
        "device_allocs": sim.cuda_malloc_calls,
        "oom_index": sim_oom,
    } == {
        "peak_allocated": stats["allocated_bytes.all.peak"],
        "peak_reserved": stats["reserved_bytes.all.peak"],
        "peak_requested": stats["requested_bytes.all.peak"],
        "reserved": stats["reserved_bytes.all.current"],
        "device_allocs": stats["num_device_alloc"],
        "oom_index": oom_index,
    }
    assert sim.segment_log == segment_events(trace)
    replay = simulate(events_from_snapshot_trace(trace), config)
    assert (replay.peak_allocated_bytes, replay.peak_reserved_bytes) == (
        stats["allocated_bytes.all.peak"],
        stats["reserved_bytes.all.peak"],
    )


def apply(sim, op, handle, nbytes):
    """One event on ``sim``; False once an ALLOC ran out of memory."""
    if op == FREE:
        sim.free(handle)
        return True
    return sim.malloc(handle, nbytes)
