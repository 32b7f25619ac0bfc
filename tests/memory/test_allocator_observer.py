"""The allocator's observer: every action a replay takes, as torch's ``record_trace`` reports it.

Replaying a measured trace with an observer must report the tensor actions torch recorded, in
order and with their sizes, the same segment actions (their moments may differ: addresses
decide which small block a request splits), statistics consistent with the result, and an end
state whose segments hold exactly the reserved and allocated bytes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.memory.trace_marks import SLOW, is_large, marked
from vramcalc.memory.alloc_conf import allocator_config
from vramcalc.memory.allocator import (
    ALLOC,
    EMPTY_CACHE,
    FREE,
    MIB,
    AllocatorConfig,
    CachingAllocator,
    simulate,
)
from vramcalc.memory.allocator_trace import events_from_snapshot_trace, segment_addresses
from vramcalc_harness.alloc_trace import load_trace

MEASUREMENTS = Path(__file__).resolve().parents[2] / "data" / "measurements"
#: traces of one stream (the observed replay has no streams: ``test_allocator_traces.py``
#: replays the others per stream); a large one is not read unless slow tests are asked for
#: (it is then listed, and skipped: ``trace_marks``)
TRACES = [
    p
    for p in sorted(MEASUREMENTS.glob("*_traces/*.json.gz"))
    if (is_large(p) and not SLOW) or len({entry[3] for entry in load_trace(p)["entries"]}) == 1
]


def test_an_observed_replay_reports_each_action_with_its_statistics():
    events = [(ALLOC, 1, 3 * MIB + 100), (ALLOC, 2, 1000), (FREE, 1, 0), (EMPTY_CACHE, 0, 0)]
    actions = []
    allocator = CachingAllocator()
    result = simulate(events, AllocatorConfig(), actions.append, allocator)
    assert result == simulate(events)
    rows = [(a.action, a.requested_bytes, a.block_bytes, a.allocated_bytes, a.reserved_bytes,
             a.event_index, a.handle) for a in actions]  # fmt: skip
    large, small = 3 * MIB + 512, 1024
    assert rows == [
        ("segment_alloc", 20 * MIB, 20 * MIB, 0, 20 * MIB, 0, 0),
        ("alloc", 3 * MIB + 100, large, large, 20 * MIB, 0, 1),
        ("segment_alloc", 2 * MIB, 2 * MIB, large, 22 * MIB, 1, 0),
        ("alloc", 1000, small, large + small, 22 * MIB, 1, 2),
        ("free_requested", 3 * MIB + 100, large, small, 22 * MIB, 2, 1),
        ("free_completed", 3 * MIB + 100, large, small, 22 * MIB, 2, 1),
        ("segment_free", 20 * MIB, 20 * MIB, small, 2 * MIB, 3, 0),
    ]
    assert actions[1].addr == actions[0].addr  # the front of its segment
    assert actions[4].addr == actions[1].addr
    (segment,) = allocator.segment_states()
    assert (segment.total_bytes, segment.small, segment.expandable) == (2 * MIB, True, False)
    assert segment.blocks == (
        (actions[3].addr, small, 1000, True),
        (actions[3].addr + small, 2 * MIB - small, 0, False),
    )


def test_expandable_segments_report_page_mappings():
    events = [(ALLOC, 1, 30 * MIB), (ALLOC, 2, 30 * MIB), (FREE, 2, 0), (EMPTY_CACHE, 0, 0)]
    actions = []
    allocator = CachingAllocator(AllocatorConfig(expandable_segments=True))
    simulate(events, allocator.config, actions.append, allocator)
    segment_rows = [(a.action, a.block_bytes) for a in actions if a.action.startswith("segment")]
    assert segment_rows == [
        ("segment_map", 40 * MIB),
        ("segment_map", 20 * MIB),
        ("segment_unmap", 20 * MIB),
    ]
    maps = [a for a in actions if a.action == "segment_map"]
    assert maps[1].addr == maps[0].addr + 40 * MIB  # the range grows upwards
    (segment,) = allocator.segment_states()
    assert (segment.address, segment.total_bytes, segment.expandable) == (
        maps[0].addr,
        40 * MIB,
        True,
    )
    assert [b[1:] for b in segment.blocks] == [(30 * MIB, 30 * MIB, True), (10 * MIB, 0, False)]


def test_an_out_of_memory_request_is_reported():
    actions = []
    config = AllocatorConfig(capacity_bytes=40 * MIB)
    result = simulate([(ALLOC, 1, 30 * MIB), (ALLOC, 2, 30 * MIB)], config, actions.append)
    assert result.oom_event_index == 1
    assert (actions[-1].action, actions[-1].requested_bytes, actions[-1].event_index) == (
        "oom", 30 * MIB, 1,
    )  # fmt: skip


@pytest.mark.parametrize("trace_path", marked(TRACES), ids=[p.name[:8] for p in TRACES])
def test_observing_a_measured_trace_reports_what_torch_recorded(trace_path):
    trace = load_trace(trace_path)
    config = allocator_config(trace["pytorch_cuda_alloc_conf"] or "")
    events = events_from_snapshot_trace(trace["entries"])
    actions = []
    addresses = segment_addresses(trace["entries"])  # the driver's: best fit ties as in the run
    allocator = CachingAllocator(config, addresses)
    result = simulate(events, config, actions.append, allocator)
    assert result == simulate(events, allocator=CachingAllocator(config, addresses))
    recorded = [(e[0], e[2]) for e in trace["entries"] if e[0] != "snapshot"]
    observed = [(a.action, a.requested_bytes) for a in actions]

    def tensors(rows):  # noqa: ANN001, ANN202
        return [row for row in rows if not row[0].startswith("segment")]

    assert tensors(observed) == tensors(recorded)
    assert Counter(observed) == Counter(recorded)  # the same segment actions
    assert max(a.allocated_bytes for a in actions) == result.peak_allocated_bytes
    assert max(a.reserved_bytes for a in actions) == result.peak_reserved_bytes
    segments = allocator.segment_states()
    assert sum(s.total_bytes for s in segments) == result.final_reserved_bytes
    assert sum(b[1] for s in segments for b in s.blocks if b[3]) == result.final_allocated_bytes
    assert len(segments) == result.segments
