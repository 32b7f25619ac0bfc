"""A world trace's last step repeated, and its frees in one order (``trace/worldtrace.py``).

``repeat_world_step`` is ``repeat.repeat_last_step`` for a rank of an FSDP1 world: a trace
of two steps becomes one of more, the second step copied, each tensor a step frees that the
step before made (a unit's sharded gradient, kept until the next forward) matched to its
twin by aligning the two steps phase by phase. ``canonical_world`` puts each batch of
consecutive frees in the order its tensors were made, so that a trace unrolled from a few
layers and steps and a trace of all of them compare event by event
(``tests/trace/test_worldunroll.py``).
"""

from __future__ import annotations

from typing import Any

from vramcalc.memory.allocator import ALLOC
from vramcalc.trace.events import UnrollError, WorldTrace
from vramcalc.trace.steptrace import canonical_frees


def repeat_world_step(trace: WorldTrace, times: int) -> WorldTrace:
    """A world trace of steps 0 and 1 with step 1 repeated ``times`` more times (as
    ``repeat.repeat_last_step`` does for one GPU; ``UnrollError`` where the steps do not
    repeat).

    FSDP1 keeps each unit's sharded gradient from its reduce-scatter until the next step's
    forward, so a step frees tensors the step before made. The first step also runs FSDP's
    lazy init and creates the optimizer states, so the steps do not line up event for
    event: a tensor step 0 made is matched to its twin in step 1 by aligning the same phase
    (the step's forward, a backward pass, the optimizer step) of both steps on what each
    event does (``_phase_twins``)."""
    at = dict(trace.markers)
    if "step0" not in at or "step1" not in at or "end" not in at or "step2" in at:
        raise UnrollError("repeat the last of exactly two traced steps")
    b0, b1, end = at["step0"], at["step1"], at["end"]
    if end != len(trace.events):
        raise UnrollError("events after the last step")
    twins = _phase_twins(trace, b0, b1, end)

    def twin(index: int) -> int:
        """The index in step 1 of what step 0 did at ``index``."""
        if index not in twins:
            raise UnrollError(f"step 0's event {index} has no twin in step 1")
        return twins[index]

    made_at = {h: i for i, (op, h, _) in enumerate(trace.events) if op == ALLOC}
    top = max(made_at, default=0)
    events = list(trace.events)
    origins = list(range(len(events)))
    previous = {h: h for h in made_at}  # step 1's handles as the last copy wrote them
    for _ in range(times):
        current: dict[int, int] = {}
        for i in range(b1, end):
            op, handle, nbytes = trace.events[i]
            origins.append(i)
            if op == ALLOC:
                top += 1
                current[handle] = top
                events.append((op, top, nbytes))
                continue
            made = made_at.get(handle, -1)
            if made >= b1:
                events.append((op, current.get(handle, handle), nbytes))
            elif made >= b0:
                k = twin(made)
                if not (b1 <= k < end) or trace.events[k][0] != ALLOC:
                    raise UnrollError("a tensor crossing steps has no twin in the next step")
                mine, theirs = trace.events[made], trace.events[k]
                if (mine[2], trace.streams[made]) != (theirs[2], trace.streams[k]):
                    raise UnrollError("a tensor crossing steps has no twin in the next step")
                events.append((op, previous[theirs[1]], nbytes))
            elif made < 0:
                events.append((op, handle, nbytes))  # EMPTY_CACHE
            else:
                raise UnrollError("a later step frees a tensor from before the first step")
        previous = current
    length = end - b1
    markers = [m for m in trace.markers if m[0] != "end"]
    step1 = [(label[len("step1") :], i) for label, i in trace.markers
             if b1 <= i <= end and label.startswith("step1")]  # fmt: skip
    for copy in range(1, times + 1):
        markers += [(f"step{1 + copy}{rest}", i + copy * length) for rest, i in step1]
    markers.append(("end", end + times * length))
    syncs = list(trace.sync_points)
    for copy in range(1, times + 1):
        for now, upto in trace.sync_points:
            if not b1 < now <= end:
                continue
            if upto >= b1:
                awaited = upto + copy * length
            elif upto > b0:  # a point of the step before: its twin in the copy before
                awaited = _awaited_twin(twins, upto, b0, b1) + (copy - 1) * length
            else:
                awaited = upto
            syncs.append((now + copy * length, awaited))
    cross = set(trace.cross_stream)
    cross |= {
        events[j][1]
        for j in range(len(trace.events), len(events))
        if events[j][0] == ALLOC and trace.events[origins[j]][1] in trace.cross_stream
    }
    return WorldTrace(
        tuple(events),
        tuple(trace.streams[o] for o in origins),
        tuple(markers),
        tuple(sorted(syncs)),
        trace.num_layers,
        trace.wrapper,
        tuple(trace.labels[o] for o in origins) if trace.labels else (),
        frozenset(cross),
        tuple(trace.tags[o] for o in origins) if trace.tags else (),
    )


def _awaited_twin(twins: dict[int, int], upto: int, b0: int, b1: int) -> int:
    """Where in step 1 the point before step 0's event ``upto`` lies: just after the twin of
    the last event before it that has one. Step 0 alone has some events (ZeRO-3 gathers at
    the end of its first backward what the second step's prefetch gathered earlier), and a
    host wait of step 1 on the point after one of them waits, in the next copy, on the
    point where step 1 has done the same work: after the twin of the event before it
    (none: the start of step 1)."""
    for index in range(upto - 1, b0 - 1, -1):
        if index in twins:
            return twins[index] + 1
    return b1


def _phase_twins(trace: WorldTrace, b0: int, b1: int, end: int) -> dict[int, int]:
    """Step 0's event index -> its twin's in step 1: each phase of step 0 (from one of its
    markers to the next) aligned with the same phase of step 1 on (op, bytes, stream, what
    made it) by ``difflib``'s matching (``matching.FastMatcher``: the same blocks, faster);
    events step 0 alone has (lazy init, the optimizer states) have none."""
    from vramcalc.trace.matching import FastMatcher  # numpy: not on a warm plan's path

    def signature(i: int) -> tuple[Any, ...]:
        op, _, nbytes = trace.events[i]
        return (op, nbytes, trace.streams[i], trace.labels[i] if trace.labels else "")

    def phases(step: str, lo: int, hi: int) -> dict[str, tuple[int, int]]:
        marks = sorted(
            (i, label[len(step) :]) for label, i in trace.markers
            if label.startswith(step) and lo <= i <= hi
        )  # fmt: skip
        return {
            rest: (i, marks[n + 1][0] if n + 1 < len(marks) else hi)
            for n, (i, rest) in enumerate(marks)
        }

    first, second = phases("step0", b0, b1), phases("step1", b1, end)
    if set(first) != set(second):
        raise UnrollError("steps 0 and 1 have different phases")
    twins: dict[int, int] = {}
    for rest, (lo0, hi0) in first.items():
        lo1, hi1 = second[rest]
        a = [signature(i) for i in range(lo0, hi0)]
        b = [signature(i) for i in range(lo1, hi1)]
        matcher = FastMatcher(a, b)
        for i, j, size in matcher.get_matching_blocks():
            for d in range(size):
                twins[lo0 + i + d] = lo1 + j + d
    return twins


def canonical_world(trace: WorldTrace) -> WorldTrace:
    """``trace`` with each batch of consecutive frees in the order its tensors were made
    (``steptrace.canonical_frees``; a batch does not cross a marker or a host wait): Python
    releases some groups in an order that changes with the number of layers traced (a
    foreach optimizer's temporaries, a dict of saved tensors), and the order of frees with
    no allocation between them does not change the allocator's state, so a trace unrolled
    from a few layers and one of every layer compare event by event."""
    cuts = [*trace.markers, *(("wait", now) for now, _ in trace.sync_points)]
    cuts += [("awaited", upto) for _, upto in trace.sync_points]
    tags = list(trace.tags) or [-1] * len(trace.events)
    events, new_tags, position = canonical_frees(list(trace.events), tags, cuts)
    return WorldTrace(
        events,
        tuple(trace.streams[o] for o in position),
        trace.markers,
        trace.sync_points,
        trace.num_layers,
        trace.wrapper,
        tuple(trace.labels[o] for o in position) if trace.labels else (),
        trace.cross_stream,
        new_tags if trace.tags else (),
    )
