"""A plan's predicted memory timeline: a picture, a torch memory snapshot, a comparison.

::

    from vramcalc.training_plan import TrainingPlan
    from vramcalc.timeline import compare_timelines, write_snapshot, write_timeline

    plan = TrainingPlan(model="Qwen/Qwen2.5-0.5B", method="lora", batch_size=8, seq_len=1024)
    write_timeline(plan, "timeline.png")  # allocated and reserved over loading and 3 steps
    write_snapshot(plan, "predicted.pickle")  # opens in https://pytorch.org/memory_viz
    compare_timelines("predicted.pickle", "measured.pickle", "compare.png")

The run is the one the allocator simulation replays (``memory/slack.py``: loading, then
``SIMULATED_STEPS`` optimizer steps traced on fake tensors), observed action by action
(``memory/timeline.py``); snapshots are torch's format (``memory/snapshot.py``), so a
measured ``torch.cuda.memory._dump_snapshot()`` and a predicted one open side by side in
torch's viewer and read through the same parser here.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

from vramcalc.catalog import resolve
from vramcalc.errors import AllocatorTraceError, InvalidPlanError
from vramcalc.measurements import plan_of
from vramcalc.memory.slack import SIMULATED_STEPS, vocab_size
from vramcalc.memory.snapshot import (
    from_trace_file,
    read_snapshot,
    snapshot_series,
    to_snapshot,
    write_snapshot_file,
)
from vramcalc.memory.timeline import RecordedRun, record_run, timeline
from vramcalc.progress import describe
from vramcalc.render.timeline import render_comparison, render_timeline, trace_html
from vramcalc.serving.serve_planner import compiled_decoding
from vramcalc.serving.servecompare import serve_plan_of
from vramcalc.trace.recipe import plan_steps
from vramcalc.training_plan import TrainingPlan

TIMELINE_SUFFIXES = (".png", ".svg", ".pdf", ".html")
MEASUREMENTS = Path(__file__).resolve().parent.parent / "data" / "measurements"
#: the committed trace the report shows: gemma-2-2b LoRA, batch 4 x 1024, eager attention,
#: default allocator (6.5 GiB of slack, a third of it added in the second step)
REPORT_CASE = "d2929c094726f99c"


def _plan_of(plan: Any) -> TrainingPlan:
    """A plan, or the plan of an estimate (anything with a ``plan``)."""
    plan = getattr(plan, "plan", plan)
    if not isinstance(plan, TrainingPlan):
        raise TypeError(f"expected a TrainingPlan or a MemoryEstimate, got {type(plan).__name__}")
    return plan


def describe_plan(plan: TrainingPlan) -> str:
    """A plan's recipe and sizes in one line, for titles."""

    parts = [describe(plan.model, plan.method, plan.quant)]
    if plan.uses_adapters:
        parts.append(f"r={plan.adapter_rank}")
    accumulation = f" x {plan.grad_accum} micro-batches" if plan.grad_accum > 1 else ""
    parts.append(f"batch {plan.batch_size} x {plan.seq_len}{accumulation}")
    if plan.gradient_checkpointing:
        parts.append("checkpointing")
    parts += [plan.optimizer, f"{plan.allocator} allocator"]
    return ", ".join(parts)


def record_plan(plan: Any) -> RecordedRun:
    """The simulated run of a single-GPU ``plan`` (a ``TrainingPlan`` or an estimate of one),
    every allocator action of it: traced once per recipe (seconds to a minute of CPU; cached),
    replayed in well under a second."""

    plan = _plan_of(plan)
    if plan.num_gpus > 1:
        raise InvalidPlanError(
            [f"--timeline and --snapshot show one GPU's run; the plan has --gpus {plan.num_gpus}"]
        )
    config_dict = resolve(plan.model).config_dict
    trace = plan_steps(config_dict, plan, SIMULATED_STEPS, labelled=True)
    return record_run(trace, plan, vocab_size=vocab_size(config_dict),
                      title=f"{describe_plan(plan)}: predicted")  # fmt: skip


def _run(plan_or_run: Any) -> RecordedRun:
    return plan_or_run if isinstance(plan_or_run, RecordedRun) else record_plan(plan_or_run)


def write_timeline(plan_or_run: Any, path: str | Path) -> Path:
    """Draw a plan's (or a recorded run's) allocated and reserved bytes over loading and the
    steps, phases shaded, the peak annotated with what is alive then: ``.png``, ``.svg`` or
    ``.pdf``; ``.html`` writes torch's interactive viewer page of the run's snapshot."""
    path = Path(path)
    if path.suffix.lower() not in TIMELINE_SUFFIXES:
        raise InvalidPlanError(
            [f"--timeline {path}: the file must end in {', '.join(TIMELINE_SUFFIXES)}"]
        )
    run = _run(plan_or_run)
    if path.suffix.lower() == ".html":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(trace_html(to_snapshot(run)))
        return path

    return render_timeline(timeline(run), path)


def write_snapshot(plan_or_run: Any, path: str | Path) -> Path:
    """Write a plan's (or a recorded run's) simulated run as a torch memory snapshot pickle:
    it opens in https://pytorch.org/memory_viz and ``python -m torch.cuda._memory_viz``."""

    return write_snapshot_file(to_snapshot(_run(plan_or_run)), path)


def load_snapshot(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A snapshot dict, or one read from a pickle or a harness trace (``.json.gz``)."""

    if isinstance(source, dict):
        return source
    try:
        return read_snapshot(source)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, KeyError,
            AttributeError, ImportError) as err:  # fmt: skip
        raise AllocatorTraceError(f"{source}: not a readable memory snapshot ({err})") from err


def compare_timelines(
    predicted: str | Path | dict[str, Any],
    measured: str | Path | dict[str, Any],
    path: str | Path,
    title: str = "",
) -> Path:
    """Overlay two snapshots' in-use and reserved bytes (each a path or a snapshot dict),
    aligned on loading and each step where both carry the markers, and write a PNG."""

    ours, theirs = (
        snapshot_series(load_snapshot(predicted)),
        snapshot_series(load_snapshot(measured)),
    )
    return render_comparison(ours, theirs, path, title or theirs.title or ours.title)


def committed_traces() -> list[Path]:
    """Every allocator trace the harness recorded and the repository keeps."""
    return sorted(MEASUREMENTS.glob("*_traces/*.json.gz"))


def measured_record(trace_path: str | Path) -> dict[str, Any]:
    """The measurement record of a committed trace (``NAME.jsonl`` beside ``NAME_traces/``)."""
    trace_path = Path(trace_path)
    case_id = trace_path.name.removesuffix(".json.gz")
    jsonl = trace_path.parent.with_name(trace_path.parent.name.removesuffix("_traces") + ".jsonl")
    for line in jsonl.read_text().splitlines():
        record = json.loads(line)
        if record.get("case_id") == case_id:
            return record
    raise AllocatorTraceError(f"no record of {case_id} in {jsonl}")


def captures_cuda_graphs(record: dict[str, Any]) -> bool:
    """Whether the measured run captured CUDA graphs: a serving run whose decoding
    transformers compiles (``serve_planner.compiled_decoding``: a static cache on a 16-bit
    base). Allocations made while capturing go to a private pool that emptying the cache
    (``torch.cuda.graph`` does it before each capture) does not release: replaying such a
    trace puts the capture stream's allocations in a private pool
    (``allocator_trace.capture_streams``, ``CachingAllocator.begin_allocate_to_pool``), which
    gives ``h100_servetrace``'s measured peaks exactly (without it, peak reserved was 322 MiB
    short of the 41.27 GB measured; 2 MiB short with the generator's seed and offset put in
    the pool too)."""
    if record.get("kind") != "serve":
        return False
    return compiled_decoding(serve_plan_of(record))


def report_timeline(case: str | Path = REPORT_CASE, out_dir: str | Path = "reports") -> Path:
    """The report's picture: the predicted timeline of a committed trace's plan against the
    measured one, written to ``out_dir/timeline_<case>.png`` (``case``: a case id of
    ``committed_traces()`` or a trace path)."""

    path = Path(case)
    if not path.name.endswith(".json.gz"):
        found = [p for p in committed_traces() if p.name.startswith(str(case))]
        if len(found) != 1:
            raise AllocatorTraceError(f"{case}: {len(found)} committed traces match")
        path = found[0]
    record = measured_record(path)
    plan = plan_of(record)
    run = record_plan(plan)
    measured = from_trace_file(path)
    case_id = str(record["case_id"])
    gpu = record.get("gpu_name", "GPU")
    title = f"{describe_plan(plan)}\npredicted vs measured on {gpu} (case {case_id})"
    return compare_timelines(to_snapshot(run), measured, Path(out_dir) / f"timeline_{case_id}.png",
                             title)  # fmt: skip
