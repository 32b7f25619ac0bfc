"""The allocator simulation against the real CUDA caching allocator.

Every allocator trace the harness recorded on a GPU (``record_trace`` cases,
``data/measurements/*_traces/``) is replayed through
``vramcalc.memory.allocator``; the replay must give the peak allocated and
peak reserved bytes that torch reported for that run, exactly: each block in its
stream's pool, a block used on another stream given back when torch did
(``allocator_trace.world_trace_from_snapshot``, ``memory/worldreplay.py``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from tests.memory.trace_marks import captured_graphs, marked
from vramcalc.memory.alloc_conf import allocator_config
from vramcalc.memory.allocator import simulate
from vramcalc.memory.allocator_trace import events_from_snapshot_trace, world_trace_from_snapshot
from vramcalc.memory.worldreplay import replay
from vramcalc.timeline import measured_record
from vramcalc_harness.alloc_trace import load_trace

MEASUREMENTS = Path(__file__).resolve().parents[2] / "data" / "measurements"
TRACES = sorted(MEASUREMENTS.glob("*_traces/*.json.gz"))


def _record(trace_path: Path) -> dict:
    jsonl = trace_path.parent.with_name(trace_path.parent.name.removesuffix("_traces") + ".jsonl")
    case_id = trace_path.name.removesuffix(".json.gz")
    for line in jsonl.read_text().splitlines():
        record = json.loads(line)
        if record["case_id"] == case_id:
            return record
    raise AssertionError(f"no record of {case_id} in {jsonl}")


def test_there_are_traces_of_both_allocator_modes():
    modes = {_shape(p)[1] for p in TRACES}
    assert len(TRACES) >= 7 and modes == {None, "expandable_segments:True"}


@functools.cache
def _shape(trace_path: Path) -> tuple[frozenset[int], str | None]:
    """The streams of a trace and its allocator settings (the trace read once)."""
    trace = load_trace(trace_path)
    return frozenset(entry[3] for entry in trace["entries"]), trace["pytorch_cuda_alloc_conf"]


def _streams(trace_path: Path) -> frozenset[int]:
    return _shape(trace_path)[0]


def _fsdp_rank(trace_path: Path) -> bool:
    """Whether the trace is of a rank of an FSDP world, told from its record, not the trace:
    the groups below are made at collection, where reading every trace would cost seconds in
    each pytest-xdist worker (``test_there_are_traces_of_several_streams`` checks the groups
    against the traces' own streams)."""
    record = measured_record(trace_path)
    return (record.get("num_gpus") or 1) > 1 and str(record.get("strategy")).startswith("fsdp")


#: runs that captured CUDA graphs: a serving run's compiled decoding, on a capture stream
GRAPHS = [p for p in TRACES if captured_graphs(p)]
#: rank 0 of an FSDP world: compute, unshard, pre-unshard and post-backward streams
MULTI_STREAM = [p for p in TRACES if _fsdp_rank(p)]
ONE_STREAM = [p for p in TRACES if not _fsdp_rank(p) and p not in GRAPHS]


def test_there_are_traces_of_several_streams():
    assert len(MULTI_STREAM) >= 3 and {len(_streams(p)) for p in MULTI_STREAM} == {4}
    # the groups told from the records are those of the traces' streams
    assert [p for p in TRACES if len(_streams(p)) == 1] == ONE_STREAM
    assert [p for p in TRACES if len(_streams(p)) > 1 and p not in GRAPHS] == MULTI_STREAM


def test_the_graph_capturing_trace_is_the_compiled_static_cache_run():
    """The one such trace: two streams (the capture stream's), and segments released only
    from the default stream's pools, in every generate round (torch.cuda.graph empties the
    cache before each capture): the capture stream's private pool keeps its segments."""
    assert [p.name for p in GRAPHS] == ["723570056fdc361a.json.gz"]
    trace = load_trace(GRAPHS[0])
    entries = trace["entries"]
    assert len({e[3] for e in entries}) == 2
    assert {e[3] for e in entries if e[0] == "segment_free"} == {0}
    bounds = [at for label, at in trace["markers"] if label.startswith("round")]
    bounds.append(len(entries))
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        assert any(e[0] == "segment_free" for e in entries[lo:hi])


@pytest.mark.parametrize(
    "trace_path", marked(TRACES, skip_large=False), ids=[p.name[:8] for p in TRACES]
)
def test_replaying_a_real_trace_gives_the_measured_peaks_exactly(trace_path):
    trace = load_trace(trace_path)
    record = _record(trace_path)
    assert not trace["truncated"]
    config = allocator_config(trace["pytorch_cuda_alloc_conf"] or "")
    result = replay(world_trace_from_snapshot(trace["entries"]), config, gpu_bound=True)
    assert result.peak_allocated_bytes == record["peak_allocated_bytes"]
    assert result.peak_reserved_bytes == record["peak_reserved_bytes"]


@pytest.mark.parametrize("trace_path", marked(ONE_STREAM), ids=[p.name[:8] for p in ONE_STREAM])
def test_a_trace_of_one_stream_replays_alike_as_plain_events(trace_path):
    trace = load_trace(trace_path)
    record = _record(trace_path)
    config = allocator_config(trace["pytorch_cuda_alloc_conf"] or "")
    result = simulate(events_from_snapshot_trace(trace["entries"]), config)
    assert result.peak_allocated_bytes == record["peak_allocated_bytes"]
    assert result.peak_reserved_bytes == record["peak_reserved_bytes"]


@pytest.mark.parametrize("trace_path", MULTI_STREAM, ids=[p.name[:8] for p in MULTI_STREAM])
def test_a_world_trace_on_one_pool_falls_short_of_the_measured_reserve(trace_path):
    """Blocks freed on one stream are not reused on another: one pool for all of them
    reuses more, and reserves less than the run did."""
    trace = load_trace(trace_path)
    result = simulate(events_from_snapshot_trace(trace["entries"]))
    assert result.peak_reserved_bytes < _record(trace_path)["peak_reserved_bytes"]
