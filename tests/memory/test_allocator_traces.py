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
from vramcalc.memory.allocator import CachingAllocator, simulate
from vramcalc.memory.allocator_trace import (
    events_from_snapshot_trace,
    segment_addresses,
    world_trace_from_snapshot,
)
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


def _multi_stream_rank(trace_path: Path) -> bool:
    """Whether the trace is of a rank of an FSDP or ZeRO-3 world (ZeRO-1/2 run on one stream:
    ``overlap_comm`` is off by default), told from its record, not the trace: the groups below
    are made at collection, where reading every trace would cost seconds in each
    pytest-xdist worker (``test_there_are_traces_of_several_streams`` checks the groups
    against the traces' own streams)."""
    record = measured_record(trace_path)
    strategy = str(record.get("strategy"))
    return (record.get("num_gpus") or 1) > 1 and (
        strategy.startswith("fsdp") or strategy == "zero3"
    )


#: runs that captured CUDA graphs: a serving run's compiled decoding, on a capture stream
GRAPHS = [p for p in TRACES if captured_graphs(p)]
#: rank 0 of an FSDP world (compute, unshard, pre-unshard and post-backward streams) or of a
#: ZeRO-3 one (compute and DeepSpeed's all-gather and reduce streams)
MULTI_STREAM = [p for p in TRACES if _multi_stream_rank(p)]
ONE_STREAM = [p for p in TRACES if not _multi_stream_rank(p) and p not in GRAPHS]


def test_there_are_traces_of_several_streams():
    streams = {p.name[:8]: len(_streams(p)) for p in MULTI_STREAM}
    fsdp = [p.name[:8] for p in MULTI_STREAM if p.parent.name.startswith("h100_fsdptrace")]
    assert len(fsdp) >= 3 and {streams[name] for name in fsdp} == {4}
    assert streams["bb08e639"] == 3  # ZeRO-3: compute + DeepSpeed's own streams
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
    """With the driver's segment addresses (best fit's ties broken as in the run)."""
    trace = load_trace(trace_path)
    record = _record(trace_path)
    assert not trace["truncated"]
    config = allocator_config(trace["pytorch_cuda_alloc_conf"] or "")
    addresses = segment_addresses(trace["entries"])
    world = world_trace_from_snapshot(trace["entries"])
    result = replay(world, config, gpu_bound=True, segment_addresses=addresses)
    assert result.peak_allocated_bytes == record["peak_allocated_bytes"]
    assert result.peak_reserved_bytes == record["peak_reserved_bytes"]


@pytest.mark.parametrize("trace_path", marked(TRACES), ids=[p.name[:8] for p in TRACES])
def test_the_models_own_segment_addresses_keep_peak_reserved_within_3_percent(trace_path):
    """What a simulation has: no driver, so the model's top-down addresses
    (``CachingAllocator._take_addresses``). Exact on all but two traces; the worst is the
    ZeRO-2 full fine-tuning run ef85cf65 (-2.84 %): after DeepSpeed's ``empty_cache`` the
    driver put new segments into the address ranges it had just freed, above the lowest, and
    best fit then split other blocks. Increasing addresses fall gigabytes short (the
    docstring of ``_take_addresses``). Peak allocated counts whole blocks, so it depends on
    the addresses only where best fit picks a block that is not split the same way: exact on
    all but the int8 ZeRO-3 run e8d2bea0 (-864,256 bytes, -0.013 %; its reserve is exact)."""
    trace = load_trace(trace_path)
    record = _record(trace_path)
    config = allocator_config(trace["pytorch_cuda_alloc_conf"] or "")
    result = replay(world_trace_from_snapshot(trace["entries"]), config, gpu_bound=True)
    allocated = record["peak_allocated_bytes"]
    assert abs(result.peak_allocated_bytes - allocated) <= 0.0002 * allocated
    measured = record["peak_reserved_bytes"]
    assert abs(result.peak_reserved_bytes - measured) <= 0.03 * measured


@pytest.mark.parametrize("trace_path", marked(ONE_STREAM), ids=[p.name[:8] for p in ONE_STREAM])
def test_a_trace_of_one_stream_replays_alike_as_plain_events(trace_path):
    trace = load_trace(trace_path)
    record = _record(trace_path)
    config = allocator_config(trace["pytorch_cuda_alloc_conf"] or "")
    allocator = CachingAllocator(config, segment_addresses(trace["entries"]))
    result = simulate(events_from_snapshot_trace(trace["entries"]), allocator=allocator)
    assert result.peak_allocated_bytes == record["peak_allocated_bytes"]
    assert result.peak_reserved_bytes == record["peak_reserved_bytes"]


@pytest.mark.parametrize("trace_path", MULTI_STREAM, ids=[p.name[:8] for p in MULTI_STREAM])
def test_a_world_trace_on_one_pool_falls_short_of_the_measured_reserve(trace_path):
    """Blocks freed on one stream are not reused on another: one pool for all of them
    reuses more, and reserves less than the run did."""
    trace = load_trace(trace_path)
    result = simulate(events_from_snapshot_trace(trace["entries"]))
    assert result.peak_reserved_bytes < _record(trace_path)["peak_reserved_bytes"]
