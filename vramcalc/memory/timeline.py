"""The simulated run, action by action: what is alive when, and what it is.

``record_run`` replays loading and the traced steps (``memory/slack.py``'s layout) through
the allocator model with an observer (``allocator.simulate(..., observer=...)``) and keeps
every action, the segments at the end, the phases (loading, then each step's forward,
backward and optimizer passes, from the trace's markers) and what each allocation holds
(``Provenance``). ``timeline`` turns it into allocated and reserved bytes after each event,
and ``peak_composition`` says what is alive at a moment, grouped.

What an allocation holds is read from when it is made and freed, and from the decoder
layer the trace tagged it with (``StepTrace.tags``):

- loading: ``WEIGHTS``, ``ADAPTERS``, ``LOAD_BUFFER`` (``slack.load_events`` labels them);
- made in a forward pass and freed in a later phase: ``ACTIVATIONS`` (saved for backward);
- made in a backward pass and alive after it: ``GRADIENTS``;
- made in an optimizer step and never freed: ``OPTIMIZER_STATES`` (AdaLoRA's importance
  scores too);
- never freed, made in a forward or backward pass: ``WORKSPACES`` (cuBLAS);
- whatever holds a multiple of batch x sequence x vocabulary elements (2, 4 or 8 bytes
  each), made outside the decoder layers or in the last one: ``LOGITS`` (the head's output,
  the loss's float copy and log-softmax, their gradients);
- the rest is freed within the phase that made it: ``TEMPORARIES``.

The tracer tags what runs after the last decoder layer (the final norm, the head) with that
layer, so the last layer's activations include what the head keeps for backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vramcalc.memory.allocator import (
    ALLOC,
    FREE,
    AllocatorAction,
    AllocatorConfig,
    AllocatorResult,
    CachingAllocator,
    SegmentState,
    simulate,
)
from vramcalc.memory.slack import ADAPTERS, LOAD_BUFFER, WEIGHTS, load_events
from vramcalc.trace.events import StepTrace
from vramcalc.training_plan import TrainingPlan

ACTIVATIONS = "activations"
LOGITS = "logits and loss"
TEMPORARIES = "temporaries"
GRADIENTS = "gradients"
OPTIMIZER_STATES = "optimizer states"
WORKSPACES = "workspaces"
UNKNOWN = "unknown"
#: every category, in the order plots and snapshots list them
CATEGORIES = (WEIGHTS, ADAPTERS, OPTIMIZER_STATES, GRADIENTS, ACTIVATIONS, LOGITS,
              TEMPORARIES, WORKSPACES, LOAD_BUFFER, UNKNOWN)  # fmt: skip
LOAD, FORWARD, BACKWARD, OPTIMIZER, STEPS = "load", "forward", "backward", "optimizer", "steps"


@dataclass(frozen=True)
class Phase:
    """Events ``start`` to ``stop`` (exclusive) of a run: loading, or one pass of a step.

    ``step`` and ``micro`` count from 0 (-1 for loading); ``kind`` is ``LOAD``, ``FORWARD``,
    ``BACKWARD``, ``OPTIMIZER``, or ``STEPS`` for a trace without markers."""

    kind: str
    step: int
    micro: int
    start: int
    stop: int

    @property
    def label(self) -> str:
        if self.kind == LOAD:
            return "loading"
        if self.kind == STEPS:
            return "steps"
        micro = f" (micro-batch {self.micro + 1})" if self.micro else ""
        return f"step {self.step + 1} {self.kind}{micro}"


@dataclass(frozen=True)
class Provenance:
    """What an allocation holds: a category, its decoder layer (-1: none), the phase
    that made it (an index into ``RecordedRun.phases``)."""

    category: str
    layer: int
    phase: int

    def describe(self) -> str:
        return self.category if self.layer < 0 else f"{self.category} of decoder layer {self.layer}"


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
    provenance = _provenance(events, len(loading), labels, trace.tags, phases, plan, vocab_size,
                             trace.num_layers)  # fmt: skip
    return RecordedRun(events, len(loading), tuple(actions), tuple(allocator.segment_states()),
                       result, phases, provenance, config, title)  # fmt: skip


def run_phases(
    load_events: int, total_events: int, markers: Sequence[tuple[str, int]]
) -> tuple[Phase, ...]:
    """Loading, then a phase per forward, backward and optimizer pass of each step, read from a
    trace's markers (``step0``, ``step0_backward0``, ``step0_micro1``, ``step0_optimizer``,
    ..., ``end``), positions counted after the ``load_events`` loading events."""
    phases = [Phase(LOAD, -1, -1, 0, load_events)] if load_events else []
    cuts: list[tuple[int, str, int, int]] = []  # (start, kind, step, micro)
    for label, at in markers:
        if label == "end" or not label.startswith("step"):
            continue
        head, _, rest = label.partition("_")
        step = int(head[4:])
        if not rest:
            cuts.append((at, FORWARD, step, 0))
        elif rest.startswith("micro"):
            cuts.append((at, FORWARD, step, int(rest[5:])))
        elif rest.startswith("backward"):
            cuts.append((at, BACKWARD, step, int(rest[8:])))
        elif rest == "optimizer":
            cuts.append((at, OPTIMIZER, step, 0))
    if not cuts:
        return (*phases, Phase(STEPS, 0, 0, load_events, total_events))
    bounds = [load_events + at for at, *_ in cuts] + [total_events]
    for (_, kind, step, micro), start, stop in zip(cuts, bounds, bounds[1:], strict=False):
        if stop > start:
            phases.append(Phase(kind, step, micro, start, stop))
    return tuple(phases)


def phase_index(phases: Sequence[Phase], total_events: int) -> list[int]:
    """Per event of the run: the index of its phase."""
    out = [0] * total_events
    for index, phase in enumerate(phases):
        out[phase.start : phase.stop] = [index] * (phase.stop - phase.start)
    return out


def _provenance(
    events: Sequence[tuple[int, int, int]],
    load_count: int,
    load_labels: Sequence[str],
    tags: Sequence[int],
    phases: Sequence[Phase],
    plan: TrainingPlan,
    vocab_size: int | None,
    num_layers: int,
) -> dict[int, Provenance]:
    """What each allocation of the run holds (the rules of the module docstring)."""
    where = phase_index(phases, len(events))
    made: dict[int, int] = {}
    freed: dict[int, int] = {}
    for i, (op, handle, _) in enumerate(events):
        if op == ALLOC:
            made[handle] = i
        elif op == FREE:
            freed[handle] = i
    logit_sizes = set()
    if vocab_size:
        for seq in (plan.seq_len - 1, plan.seq_len, plan.seq_len + 1):
            logit_sizes |= {k * plan.batch_size * seq * vocab_size for k in (2, 4, 8)}
    out: dict[int, Provenance] = {}
    for handle, i in made.items():
        phase = where[i]
        if i < load_count:
            out[handle] = Provenance(load_labels[i] or UNKNOWN, -1, phase)
            continue
        tag = tags[i - load_count] if len(tags) == len(events) - load_count else -1
        kind = phases[phase].kind
        end = freed.get(handle)
        if end is None:
            category = OPTIMIZER_STATES if kind == OPTIMIZER else WORKSPACES
        elif kind == OPTIMIZER:
            category = TEMPORARIES
        elif kind == STEPS:  # no markers: no phases to read it from
            category = UNKNOWN
        elif events[i][2] in logit_sizes and tag in (-1, num_layers - 1):
            category, tag = LOGITS, -1
        elif where[end] == phase:
            category = TEMPORARIES
        else:
            category = (
                ACTIVATIONS if kind == FORWARD else GRADIENTS if kind == BACKWARD else UNKNOWN
            )
        out[handle] = Provenance(category, tag if category != OPTIMIZER_STATES else -1, phase)
    return out


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
