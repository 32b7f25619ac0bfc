"""What each allocation of a simulated run holds, and what is alive at its peak.

A run is loading (``memory/slack.py::load_events``, which labels what each allocation
holds) followed by the traced steps. Its phases are loading, then each step's forward,
backward and optimizer passes, read from the trace's markers (``run_phases``). What an
allocation holds (``provenance``) is read from when it is made and freed, and from the
decoder layer the trace tagged it with (``StepTrace.tags``):

- loading: ``WEIGHTS``, ``ADAPTERS``, ``LOAD_BUFFER``;
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

``live_at_peak`` replays a run to its allocated peak and sums the blocks alive then by
category: the simulation's own account of the peak (``memory/slack.py`` keeps it with each
simulated plan; ``memory/timeline.py`` draws the whole run).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vramcalc.memory.allocator import ALLOC, EMPTY_CACHE, FREE, AllocatorConfig, CachingAllocator
from vramcalc.training_plan import TrainingPlan

#: what a loading allocation holds (``slack.load_events``' labels)
LOAD_BUFFER, WEIGHTS, ADAPTERS = "loading buffer", "weights", "adapters"
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


def run_phases(
    load_events: int, total_events: int, markers: Sequence[tuple[str, int]]
) -> tuple[Phase, ...]:
    """Loading, then a phase per forward, backward and optimizer pass of each step, read from a
    trace's markers (``step0``, ``step0_backward0``, ``step0_micro1``, ``step0_optimizer``,
    ..., ``end``), positions counted after the ``load_events`` loading events."""
    phases = [Phase(LOAD, -1, -1, 0, load_events)] if load_events else []
    cuts = [(at, *where) for label, at in markers if (where := marker_pass(label))]
    if not cuts:
        return (*phases, Phase(STEPS, 0, 0, load_events, total_events))
    bounds = [load_events + at for at, *_ in cuts] + [total_events]
    for (_, kind, step, micro), start, stop in zip(cuts, bounds, bounds[1:], strict=False):
        if stop > start:
            phases.append(Phase(kind, step, micro, start, stop))
    return tuple(phases)


def marker_pass(label: str) -> tuple[str, int, int] | None:
    """``(kind, step, micro)`` of the pass a trace's marker starts (``step0``: the forward of
    step 0's first micro-batch, ``step0_micro1``, ``step0_backward1``, ``step0_optimizer``);
    None for the others (``load``, ``wrap``, ``end``)."""
    if not label.startswith("step"):
        return None
    head, _, rest = label.partition("_")
    step = int(head[4:])
    if not rest:
        return FORWARD, step, 0
    if rest.startswith("micro"):
        return FORWARD, step, int(rest[5:])
    if rest.startswith("backward"):
        return BACKWARD, step, int(rest[8:])
    if rest == "optimizer":
        return OPTIMIZER, step, 0
    return None


def phase_index(phases: Sequence[Phase], total_events: int) -> list[int]:
    """Per event of the run: the index of its phase."""
    out = [0] * total_events
    for index, phase in enumerate(phases):
        out[phase.start : phase.stop] = [index] * (phase.stop - phase.start)
    return out


def provenance(
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


def live_at_peak(
    events: Sequence[tuple[int, int, int]],
    config: AllocatorConfig,
    holds: Mapping[int, Provenance],
    phases: Sequence[Phase],
    peak_allocated_bytes: int,
) -> tuple[str, dict[str, int]]:
    """Replay ``events`` to the first moment the allocated bytes reach
    ``peak_allocated_bytes`` (the run's peak, from a plain replay): the label of the phase it
    falls in and the bytes of the blocks alive then by category, summing to the peak."""
    allocator = CachingAllocator(config)
    at = -1
    for index, (op, handle, nbytes) in enumerate(events):
        if op == FREE:
            allocator.free(handle)
        elif op == ALLOC:
            allocator.malloc(handle, nbytes)
            if allocator.allocated_bytes >= peak_allocated_bytes:
                at = index
                break
        elif op == EMPTY_CACHE:
            allocator.empty_cache()
    if at < 0:
        raise ValueError(f"the run never reaches {peak_allocated_bytes:,} allocated bytes")
    by_category: dict[str, int] = {}
    for live, nbytes in allocator.live_block_bytes().items():
        category = holds[live].category if live in holds else UNKNOWN
        by_category[category] = by_category.get(category, 0) + nbytes
    where = phase_index(phases, len(events))
    return (phases[where[at]].label if phases else ""), by_category
