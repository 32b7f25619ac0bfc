"""The steps and micro-batches a trace repeats: a trace of its first steps made longer, and
the last traced micro-batch repeated for more gradient accumulation.

Steps after the first run the same operations (the first also creates the optimizer
states; AdaLoRA's rank allocator makes its moving averages in step 0 and replaces them from
step 1 on, so its steps are alike from step 1), and so do micro-batches after the second: a
repeated one frees what the one before it left for it at the same position from its start
(``UnrollError`` where a trace does not have that shape). ``unroll.py`` then expands the
decoder layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vramcalc.memory.allocator import ALLOC
from vramcalc.trace.events import UnrollError

if TYPE_CHECKING:
    from vramcalc.training_plan import TrainingPlan

TRACED_STEPS = 2  # steps 0 and 1: the rest repeat step 1 (repeat_last_step)


def steps_to_trace(plan: TrainingPlan) -> int:
    """Steps a recipe's trace holds: ``TRACED_STEPS``, and one more for AdaLoRA, whose rank
    allocator makes its moving averages in step 0 and replaces them from step 1 on (its
    steps are alike from step 1)."""
    return TRACED_STEPS + (plan.method == "adalora")


def traced_steps(markers: tuple[tuple[str, int], ...]) -> int:
    """How many steps a trace's markers hold (``step0``, ``step1``, ...)."""
    return sum(1 for label, _ in markers if label[:4] == "step" and label[4:].isdigit())


def repeat_last_step(
    events: tuple[tuple[int, int, int], ...],
    tags: tuple[int, ...],
    markers: tuple[tuple[str, int], ...],
    times: int,
) -> tuple[tuple[tuple[int, int, int], ...], tuple[int, ...]]:
    """A trace of steps 0..K-1 (K >= 2) with its last step repeated ``times`` more times.

    The last two traced steps run the same operations, so a later step's events are the
    last one's with new handles. A tensor one step leaves to the next (freed early in the
    next step) is found at the same position from the start of the step it was made in.
    """
    at = dict(markers)
    count = traced_steps(markers)
    if count < 2 or any(f"step{k}" not in at for k in range(count)):
        raise UnrollError("the trace has no step markers")
    b0, b1 = at[f"step{count - 2}"], at[f"step{count - 1}"]
    b2 = at.get("end", len(events))
    if b2 != len(events):
        raise UnrollError("the trace goes on after its last step")
    made_at = {h: i for i, (op, h, _) in enumerate(events) if op == ALLOC}
    out, out_tags = list(events), list(tags)
    top = max(made_at, default=0)
    copy_segment(events, tags, made_at, (b0, b1, b2), times, top, out, out_tags, "step")
    return tuple(out), tuple(out_tags)


def copy_segment(
    events: tuple[tuple[int, int, int], ...],
    tags: tuple[int, ...],
    made_at: dict[int, int],
    bounds: tuple[int, int, int],
    times: int,
    top: int,
    out: list[tuple[int, int, int]],
    out_tags: list[int],
    unit: str,
    older: str = "raise",
) -> tuple[dict[int, int], int]:
    """Append ``times`` copies of the segment ``[start, stop)`` with fresh handles (above
    ``top``) to ``out``. A copy frees its own tensors as the segment does, and a tensor the
    segment frees from the one before it (``[prev, start)``, of the same length) is the
    previous copy's twin: the one at the same position from its start. A tensor from before
    both is an ``UnrollError``, or freed as it is with ``older="keep"`` (a serving round frees
    what loading made). Returns the last copy's handles (the segment's handle -> the copy's)
    and the new top handle."""
    prev, start, stop = bounds
    previous = {events[i][1]: events[i][1] for i in range(start, stop) if events[i][0] == ALLOC}
    for _ in range(times):
        current: dict[int, int] = {}
        for i in range(start, stop):
            op, handle, nbytes = events[i]
            if op == ALLOC:
                top += 1
                current[handle] = top
                out.append((op, top, nbytes))
            else:
                made = made_at.get(handle, -1)
                if start <= made < stop:
                    out.append((op, current[handle], nbytes))
                elif prev <= made < start:  # made by the segment before: its twin's last copy
                    twin = events[made - prev + start]
                    if twin[0] != ALLOC or twin[2] != events[made][2]:
                        raise UnrollError(
                            f"a tensor crossing {unit}s has no twin in the next {unit}"
                        )
                    out.append((op, previous[twin[1]], nbytes))
                elif older == "keep":
                    out.append((op, handle, nbytes))
                else:
                    raise UnrollError(f"a later {unit} frees a tensor from before the last two")
            out_tags.append(tags[i])
        previous = current
    return previous, top


def repeat_micro(
    events: tuple[tuple[int, int, int], ...],
    tags: tuple[int, ...],
    markers: tuple[tuple[str, int], ...],
    times: int,
) -> tuple[tuple[tuple[int, int, int], ...], tuple[int, ...], tuple[tuple[str, int], ...]]:
    """Each step's last traced micro-batch repeated ``times`` more times (gradient
    accumulation over more micro-batches than were traced).

    Micro-batches after the second run the same operations: each one frees what the one
    before it left for it (the accumulated gradients it replaces) at the same position from
    its start, so a copy frees the previous copy's tensors, and what follows the last
    micro-batch (the optimizer step) frees the last copy's."""
    at = dict(markers)
    steps = sorted(
        int(label[4:]) for label in at if label.startswith("step") and label[4:].isdigit()
    )
    last = max((int(label.rsplit("micro", 1)[1]) for label in at if "_micro" in label), default=0)
    if last < 2 or times <= 0:
        raise UnrollError("repeat the last of three or more traced micro-batches")
    segments = []
    for step in steps:
        try:
            prev, start = at[f"step{step}_micro{last - 1}"], at[f"step{step}_micro{last}"]
            stop = at[f"step{step}_optimizer"]
        except KeyError as err:
            raise UnrollError(f"the trace has no marker {err}") from err
        if stop - start != start - prev:
            raise UnrollError("the last two micro-batches differ in length")
        segments.append((prev, start, stop))
    made_at = {h: i for i, (op, h, _) in enumerate(events) if op == ALLOC}
    top = max(made_at, default=0)
    out: list[tuple[int, int, int]] = []
    out_tags: list[int] = []
    remap: dict[int, int] = {}  # a segment's tensor -> its counterpart in the last copy
    shifts: list[tuple[int, int]] = []  # (event index, events inserted before it)
    position = 0
    for prev, start, stop in segments:
        for i in range(position, stop):
            op, handle, nbytes = events[i]
            out.append((op, remap.get(handle, handle) if op != ALLOC else handle, nbytes))
            out_tags.append(tags[i])
        position = stop
        made_in = {h for h in (events[i][1] for i in range(start, stop) if events[i][0] == ALLOC)}
        freed_in = {events[i][1] for i in range(start, stop) if events[i][0] != ALLOC}
        for i in range(start, stop):  # a tensor the segment leaves must replace its twin
            op, handle, _ = events[i]
            if op == ALLOC and any(
                events[k][1] == handle and events[k][0] != ALLOC for k in range(i + 1, stop)
            ):
                continue
            if op == ALLOC:
                twin = events[i - start + prev]
                if twin[0] != ALLOC or twin[1] not in freed_in:
                    raise UnrollError("a micro-batch leaves a tensor that the next does not free")
        previous, top = copy_segment(
            events, tags, made_at, (prev, start, stop), times, top, out, out_tags, "micro-batch"
        )
        remap.update({h: previous[h] for h in made_in})
        shifts.append((stop, times * (stop - start)))
    for i in range(position, len(events)):
        op, handle, nbytes = events[i]
        out.append((op, remap.get(handle, handle) if op != ALLOC else handle, nbytes))
        out_tags.append(tags[i])

    # the copies stand just before each optimizer marker: later markers move by what came in,
    # and each copy starts a micro-batch of its own
    moved = [
        (label, index + sum(n for where, n in shifts if where <= index)) for label, index in markers
    ]
    for step, (_, start, stop) in zip(steps, segments, strict=True):
        base = stop + sum(n for where, n in shifts if where < stop)
        moved += [
            (f"step{step}_micro{last + k}", base + (k - 1) * (stop - start))
            for k in range(1, times + 1)
        ]
        backward = at.get(f"step{step}_backward{last}")  # where backward starts in a copy
        if backward is not None and start <= backward < stop:
            moved += [
                (
                    f"step{step}_backward{last + k}",
                    base + (k - 1) * (stop - start) + backward - start,
                )
                for k in range(1, times + 1)
            ]
    new_markers = tuple(sorted(moved, key=lambda m: (m[1], _marker_order(m[0]))))
    return tuple(out), tuple(out_tags), new_markers


def _marker_order(label: str) -> int:
    """At one position: a step starts before its micro-batches, whose backward passes come
    before its optimizer step, which comes before the end."""
    if label == "end":
        return 4
    if label.endswith("_optimizer"):
        return 3
    if "_backward" in label:
        return 2
    return 1 if "_micro" in label else 0


def repeat_step_markers(
    markers: tuple[tuple[str, int], ...], times: int
) -> tuple[tuple[str, int], ...]:
    """The markers of ``repeat_last_step``'s result: the last traced step's markers again
    for each copy (``step2``, ``step2_backward0``, ...), and the end after the last."""
    at = dict(markers)
    last = traced_steps(markers) - 1
    b1 = at[f"step{last}"]
    b2 = at.get("end", b1)
    length = b2 - b1
    name = f"step{last}"
    steps = [(label[len(name) :], i) for label, i in markers
             if b1 <= i < b2 and (label == name or label.startswith(name + "_"))]  # fmt: skip
    out = [(label, i) for label, i in markers if label != "end"]
    for copy in range(1, times + 1):
        out += [(f"step{last + copy}{rest}", i + copy * length) for rest, i in steps]
    return (*out, ("end", b2 + times * length))
