"""The simulated run, action by action: what is alive when, and what it is.

``record_run`` replays loading and the traced steps (``memory/slack.py``'s layout) through
the allocator model with an observer (``allocator.simulate(..., observer=...)``) and keeps
every action, the segments at the end, the phases (loading, then each step's forward,
backward and optimizer passes, from the trace's markers) and what each allocation holds
(``Provenance``). ``timeline`` turns it into allocated and reserved bytes after each event,
and ``peak_composition`` says what is alive at a moment, grouped.

What an allocation holds, and the phases, are ``memory/provenance.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramcalc.memory.allocator import (
    AllocatorAction,
    AllocatorConfig,
    AllocatorResult,
    CachingAllocator,
    SegmentState,
    simulate,
)
from vramcalc.memory.provenance import (
    UNKNOWN,
    Phase,
    Provenance,
    phase_index,
    provenance,
    run_phases,
)
from vramcalc.memory.slack import load_events
from vramcalc.trace.events import StepTrace
from vramcalc.training_plan import TrainingPlan


@dataclass(frozen=True)
class RecordedRun:
    """A simulated run, every event and every action of the allocator on it."""

    events: tuple[tuple[int, int, int], ...]  # loading, then the steps: (op, handle, nbytes)
    load_events: int
    actions: tuple[AllocatorAction, ...]
    segments: tuple[SegmentState, ...]  # at the end
    result: AllocatorResult
    phases: tuple[Phase, ...]
    provenance: dict[int, Provenance]  # handle -> what its allocation holds
    config: AllocatorConfig
    title: str = ""


def record_run(
    trace: StepTrace,
    plan: TrainingPlan,
    config: AllocatorConfig | None = None,
    vocab_size: int | None = None,
    title: str = "",
) -> RecordedRun:
    """Replay loading and ``trace``'s steps (as ``slack.simulate_run`` does), observed.

    ``trace`` should carry its markers and tags (``recipe.plan_steps(..., labelled=True)``);
    without them the steps are one phase and no allocation has a layer. ``vocab_size`` lets
    logit-sized tensors be told apart (``LOGITS``)."""
    labels: list[str] = []
    loading = load_events(trace, plan, labels)
    events = (*loading, *trace.events)
    config = config or AllocatorConfig(expandable_segments=plan.allocator == "expandable")
    actions: list[AllocatorAction] = []
    allocator = CachingAllocator(config)
    result = simulate(events, config, actions.append, allocator)
    phases = run_phases(len(loading), len(events), trace.markers)
    holds = provenance(events, len(loading), labels, trace.tags, phases, plan, vocab_size,
                             trace.num_layers)  # fmt: skip
    return RecordedRun(events, len(loading), tuple(actions), tuple(allocator.segment_states()),
                       result, phases, holds, config, title)  # fmt: skip


@dataclass(frozen=True)
class Timeline:
    """Allocated and reserved bytes after each event of a run, its phases and its peaks."""

    allocated_bytes: tuple[int, ...]
    reserved_bytes: tuple[int, ...]
    phases: tuple[Phase, ...]
    peak_allocated_index: int  # the first event at the allocated peak
    peak_reserved_index: int
    peak: PeakComposition  # what is alive at the allocated peak
    title: str = ""

    @property
    def peak_allocated_bytes(self) -> int:
        return self.allocated_bytes[self.peak_allocated_index] if self.allocated_bytes else 0

    @property
    def peak_reserved_bytes(self) -> int:
        return self.reserved_bytes[self.peak_reserved_index] if self.reserved_bytes else 0


@dataclass(frozen=True)
class PeakComposition:
    """What is allocated after event ``event_index``: bytes (allocated blocks) by category, and
    by category and decoder layer (layer -1: none). Both sum to the allocated bytes."""

    event_index: int
    phase: str
    by_category: tuple[tuple[str, int], ...]  # largest first
    by_layer: tuple[tuple[str, int, int], ...]  # (category, layer, bytes), largest first

    @property
    def allocated_bytes(self) -> int:
        return sum(nbytes for _, nbytes in self.by_category)


def timeline(run: RecordedRun) -> Timeline:
    """The series of ``run``: statistics after each event (an event without an action keeps
    those before it; within an event reserved bytes only fall before they rise, so these
    peaks are the run's), and what is alive at the allocated peak."""
    n = len(run.events)
    allocated, reserved = [0] * n, [0] * n
    actions, k = run.actions, 0
    allocated_now = reserved_now = 0
    for i in range(n):
        while k < len(actions) and actions[k].event_index == i:  # in event order
            allocated_now, reserved_now = actions[k].allocated_bytes, actions[k].reserved_bytes
            k += 1
        allocated[i], reserved[i] = allocated_now, reserved_now
    peak_allocated = allocated.index(max(allocated)) if n else 0
    peak_reserved = reserved.index(max(reserved)) if n else 0
    return Timeline(tuple(allocated), tuple(reserved), run.phases, peak_allocated, peak_reserved,
                    peak_composition(run, peak_allocated), run.title)  # fmt: skip


def peak_composition(run: RecordedRun, event_index: int) -> PeakComposition:
    """What is allocated after event ``event_index`` of ``run``, grouped."""
    live: dict[int, int] = {}
    for action in run.actions:
        if action.event_index > event_index:
            break
        if action.action == "alloc":
            live[action.handle] = action.block_bytes
        elif action.action == "free_completed":
            live.pop(action.handle, None)
    by_category: dict[str, int] = {}
    by_layer: dict[tuple[str, int], int] = {}
    for handle, nbytes in live.items():
        what = run.provenance.get(handle, Provenance(UNKNOWN, -1, 0))
        by_category[what.category] = by_category.get(what.category, 0) + nbytes
        key = (what.category, what.layer)
        by_layer[key] = by_layer.get(key, 0) + nbytes
    where = phase_index(run.phases, len(run.events))
    phase = run.phases[where[event_index]].label if run.phases and run.events else ""
    return PeakComposition(
        event_index,
        phase,
        tuple(sorted(by_category.items(), key=lambda kv: (-kv[1], kv[0]))),
        tuple(
            sorted(
                ((c, layer, b) for (c, layer), b in by_layer.items()),
                key=lambda row: (-row[2], row[0], row[1]),
            )
        ),  # fmt: skip
    )
