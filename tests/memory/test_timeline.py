"""The predicted memory timeline: the simulated run recorded action by action, what is alive
at its peak, the run as a torch memory snapshot that torch's own viewer functions read, and
predicted against measured traces.

A tiny LLaMA (7 layers, traced with 5 and unrolled) fine-tuned with LoRA for three steps.
"""

from __future__ import annotations

import base64
import math
import pickle
import pickletools
import re
from pathlib import Path

import pytest

from tests.memory.trace_marks import marked
from vramcalc.errors import InvalidPlanError
from vramcalc.memory.alloc_conf import allocator_config
from vramcalc.memory.allocator import ALLOC, simulate
from vramcalc.memory.allocator_trace import (
    events_from_snapshot_trace,
    segment_addresses,
    world_trace_from_snapshot,
)
from vramcalc.memory.provenance import (
    ACTIVATIONS,
    ADAPTERS,
    LOGITS,
    OPTIMIZER_STATES,
    TEMPORARIES,
    WEIGHTS,
    WORKSPACES,
)
from vramcalc.memory.slack import simulate_run
from vramcalc.memory.snapshot import (
    from_trace_file,
    read_snapshot,
    snapshot_series,
    to_snapshot,
    write_snapshot_file,
)
from vramcalc.memory.timeline import peak_composition, record_run, timeline
from vramcalc.memory.worldreplay import replay
from vramcalc.render.timeline import aligned_positions, composition_lines
from vramcalc.timeline import (
    committed_traces,
    compare_timelines,
    measured_record,
    record_plan,
    report_timeline,
    write_snapshot,
    write_timeline,
)
from vramcalc.trace import repeat
from vramcalc.trace.steptrace import CUBLAS_WORKSPACE_BYTES, trace_steps
from vramcalc.training_plan import TrainingPlan

VOCAB = 509  # prime: no other tensor of the tiny model is a multiple of batch x seq x vocab
TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 7,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
PLAN = TrainingPlan(model="tiny", seq_len=64, batch_size=2, method="lora")
PNG = b"\x89PNG\r\n\x1a\n"
# the opcodes MemoryViz.js's unpickler reads (torch/utils/viz/MemoryViz.js, ``unpickle``)
MEMORYVIZ_OPCODES = {
    "APPEND", "APPENDS", "BINFLOAT", "BINGET", "BININT", "BININT1", "BININT2", "BINPUT",
    "BINUNICODE", "DICT", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "FRAME", "LIST",
    "LONG1", "LONG_BINGET", "LONG_BINPUT", "MARK", "MEMOIZE", "NEWFALSE", "NEWTRUE", "NONE",
    "PROTO", "SETITEM", "SETITEMS", "SHORT_BINUNICODE", "STOP", "TUPLE", "TUPLE1", "TUPLE2",
    "TUPLE3",
}  # fmt: skip


def _block(nbytes: int) -> int:
    return max(-(-nbytes // 512) * 512, 512)


@pytest.fixture(scope="module")
def trace():
    return trace_steps(TINY, PLAN, steps=3, labelled=True)


@pytest.fixture(scope="module")
def run(trace):
    return record_run(trace, PLAN, vocab_size=VOCAB, title="tiny LoRA")


def test_an_unrolled_trace_keeps_the_phases_and_layers_of_a_trace_of_every_layer(trace):
    full = trace_steps(TINY, PLAN, steps=3, unroll=False)
    assert trace.markers == full.markers
    assert [label for label, _ in trace.markers] == [
        f"step{s}{part}" for s in range(3) for part in ("", "_backward0", "_optimizer")
    ] + ["end"]

    def alloc_layers(t):  # noqa: ANN001, ANN202
        return [tag for (op, _, _), tag in zip(t.events, t.tags, strict=True) if op == ALLOC]

    assert alloc_layers(trace) == alloc_layers(full)
    plain = trace_steps(TINY, PLAN, steps=3)  # what the replay takes: unchanged
    assert (plain.events, plain.markers, plain.tags) == (trace.events, (), ())


def test_repeated_steps_repeat_the_markers_of_step_one():
    markers = (("step0", 0), ("step0_backward0", 3), ("step0_optimizer", 5), ("step1", 6),
               ("step1_backward0", 9), ("step1_optimizer", 11), ("end", 12))  # fmt: skip
    assert repeat.repeat_step_markers(markers, 1) == (*markers[:-1], ("step2", 12),
        ("step2_backward0", 15), ("step2_optimizer", 17), ("end", 18))  # fmt: skip


def test_the_recorded_run_is_the_simulated_run(run, trace):
    assert run.result == simulate_run(trace, PLAN).result
    series = timeline(run)
    assert series.peak_allocated_bytes == run.result.peak_allocated_bytes
    assert series.peak_reserved_bytes == run.result.peak_reserved_bytes
    assert series.allocated_bytes[-1] == run.result.final_allocated_bytes
    assert series.reserved_bytes[-1] == run.result.final_reserved_bytes
    assert len(series.allocated_bytes) == len(run.events) == run.load_events + len(trace.events)


def test_the_run_is_loading_then_each_pass_of_each_step(run):
    assert [p.label for p in run.phases] == ["loading"] + [
        f"step {s} {kind}" for s in (1, 2, 3) for kind in ("forward", "backward", "optimizer")
    ]
    assert run.phases[0].start == 0 and run.phases[-1].stop == len(run.events)
    assert all(a.stop == b.start for a, b in zip(run.phases, run.phases[1:], strict=False))
    assert run.phases[0].stop == run.load_events


def test_what_is_alive_after_the_run_and_at_its_peak(run, trace):
    base = [p for p in trace.params if not p[3]]
    trainable = [p for p in trace.params if p[3]]
    weights = sum(_block(2 * math.prod(p[1])) for p in base)  # bf16, one block each
    adapters = sum(_block(4 * math.prod(p[1])) for p in trainable)  # fp32
    # fused AdamW: exp_avg, exp_avg_sq and a one-element step per trainable tensor
    states = sum(2 * _block(4 * math.prod(p[1])) + 512 for p in trainable)
    workspaces = 2 * CUBLAS_WORKSPACE_BYTES  # forward and backward threads
    end = peak_composition(run, len(run.events) - 1)
    assert dict(end.by_category) == {
        WEIGHTS: weights, ADAPTERS: adapters, OPTIMIZER_STATES: states, WORKSPACES: workspaces,
    }  # fmt: skip
    peak = timeline(run).peak
    assert peak.allocated_bytes == run.result.peak_allocated_bytes
    assert peak.phase == "step 2 backward"  # the loss's gradient, every layer's activations
    found = dict(peak.by_category)
    assert found[LOGITS] == 3 * 4 * PLAN.batch_size * PLAN.seq_len * VOCAB  # fp32 logits x 3
    assert found[ACTIVATIONS] == 2_056_192
    assert (found[WEIGHTS], found[ADAPTERS], found[OPTIMIZER_STATES]) == (weights, adapters, states)
    layers = {layer: b for c, layer, b in peak.by_layer if c == ACTIVATIONS}
    assert sorted(layers) == list(range(-1, 7))
    assert layers[1] == layers[2] == layers[3] == layers[4] == layers[5] == 293_376
    assert composition_lines(peak)[1] == (
        "activations: 1.96 MiB (7 layers, up to 319.50 KiB in layer 6)"
    )
    assert set(found) == {WORKSPACES, ACTIVATIONS, WEIGHTS, LOGITS, OPTIMIZER_STATES, ADAPTERS,
                          TEMPORARIES}  # fmt: skip


def test_the_snapshot_replays_to_the_simulated_peaks(run, tmp_path):
    snapshot = read_snapshot(write_snapshot_file(to_snapshot(run), tmp_path / "run.pickle"))
    assert snapshot == to_snapshot(run)
    events = events_from_snapshot_trace(snapshot["device_traces"][0])
    assert simulate(events, run.config) == run.result  # the measured traces' parser
    series = snapshot_series(snapshot)
    assert series.peak_requested_bytes == run.result.peak_requested_bytes
    assert series.peak_reserved_bytes == run.result.peak_reserved_bytes
    assert series.reserved_bytes[-1] == run.result.final_reserved_bytes
    labels = [label for label, _ in series.markers]
    assert labels.count("step_end") == 3 and labels[:2] == ["loading", "loaded"]


def test_torchs_memory_viz_reads_the_snapshot(run):
    from torch.cuda import _memory_viz as viz

    snapshot = to_snapshot(run)

    def sizes(lines: str, state: str = "") -> int:
        return sum(int(line.rsplit(" ", 1)[1]) for line in lines.splitlines() if state in line)

    segments = viz.segments(snapshot, format_flamegraph=lambda lines: lines)
    assert sizes(segments) == run.result.final_reserved_bytes
    memory = viz.memory(snapshot, format_flamegraph=lambda lines: lines)
    alive = sizes(memory, ";active_allocated;") - sizes(memory, ";active_allocated;<gaps>")
    assert alive == snapshot_series(snapshot).requested_bytes[-1]
    assert ";active_allocated;loading:" in memory  # frames name the phase and what it holds
    assert "optimizer states" in memory and "adapters" in memory
    summary = viz.segsum(snapshot)  # checks its own accounting
    assert f"segments: {run.result.segments}\n" in summary
    assert viz.trace(snapshot).startswith(f"Device 0 ----------------\n{len(run.actions)} entries")
    for page in (viz.trace_plot(snapshot), viz.segment_plot(snapshot)):
        (encoded,) = re.findall(r'"base64": "([^"]+)"', page)
        assert pickle.loads(base64.b64decode(encoded)) == snapshot


def test_the_pickle_is_what_the_viewer_page_unpickles(run, tmp_path):
    data = write_snapshot_file(to_snapshot(run), tmp_path / "run.pickle").read_bytes()
    ops = list(pickletools.genops(data))
    assert {op.name for op, _, _ in ops} <= MEMORYVIZ_OPCODES
    assert ops[0][0].name == "PROTO" and ops[0][1] <= 4
    assert all(abs(arg) < 2**53 for op, arg, _ in ops if op.name == "LONG1")  # JS numbers
    categories = {e.get("category") for e in to_snapshot(run)["device_traces"][0]}
    assert "unknown" in categories  # MemoryViz.js fails on categories without it


@pytest.mark.parametrize(
    "path", marked(committed_traces()), ids=[p.name[:8] for p in committed_traces()]
)
def test_a_measured_trace_reads_as_a_snapshot(path):
    from torch.cuda import _memory_viz as viz

    snapshot = from_trace_file(path)
    record = measured_record(path)
    config = allocator_config(record.get("pytorch_cuda_alloc_conf") or "")
    entries = snapshot["device_traces"][0]
    measured = world_trace_from_snapshot(entries)  # per stream
    replayed = replay(
        measured, config, gpu_bound=True, segment_addresses=segment_addresses(entries)
    )
    assert replayed.peak_reserved_bytes == record["peak_reserved_bytes"]
    series = snapshot_series(snapshot)
    assert series.peak_reserved_bytes == record["peak_reserved_bytes"]
    assert series.reserved_bytes[-1] == sum(s["total_size"] for s in snapshot["segments"])
    # training runs align on loading and each step; a serving run has rounds, no steps, and
    # is drawn on the run's fraction
    assert (aligned_positions(series) is None) == (record.get("kind") == "serve")
    viz.segsum(snapshot)


def test_timelines_and_snapshots_are_written(run, tmp_path):
    assert write_timeline(run, tmp_path / "t.png").read_bytes()[:8] == PNG
    assert "MemoryViz.js" in write_timeline(run, tmp_path / "t.html").read_text()
    assert read_snapshot(write_snapshot(run, tmp_path / "s.pickle")) == to_snapshot(run)
    with pytest.raises(InvalidPlanError, match=r"--timeline .*t\.txt: the file must end in"):
        write_timeline(run, tmp_path / "t.txt")


def test_a_multi_gpu_plan_has_no_single_timeline():
    plan = TrainingPlan(model="tiny", method="lora", num_gpus=2)
    with pytest.raises(InvalidPlanError, match="--gpus 2"):
        record_plan(plan)


def test_predicted_and_measured_are_drawn_together(run, tmp_path):
    measured = committed_traces()[0]
    out = compare_timelines(to_snapshot(run), measured, tmp_path / "compare.png")
    assert out.read_bytes()[:8] == PNG


@pytest.mark.slow
def test_a_plan_from_its_config_file(tmp_path):
    import json

    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    plan = TrainingPlan(model=str(config), seq_len=64, batch_size=2, method="lora")
    run = record_plan(plan)
    assert run.result == record_run(trace_steps(TINY, plan, steps=3), plan).result
    assert write_timeline(plan, tmp_path / "plan.png").read_bytes()[:8] == PNG
    assert read_snapshot(write_snapshot(plan, tmp_path / "plan.pickle"))["segments"]


@pytest.mark.slow
def test_the_report_draws_a_committed_trace(tmp_path):
    out = report_timeline("fc9b19592f9ad669", tmp_path)
    assert out == Path(tmp_path) / "timeline_fc9b19592f9ad669.png"
    assert out.read_bytes()[:8] == PNG
