"""A serving run replayed through the caching-allocator model: peak allocated and reserved.

``simulate_serving`` takes the recorded run of ``servetrace.trace_serving`` (five decoder
layers, each full generate's first loop steps, two timed rounds) and makes it the plan's
whole run, exactly:

1. **decoding steps**: a generate of N new tokens traced for K < N loop steps gets steps
   K+1..N as copies of step K: the same operations, new handles, each allocation's size
   continued along the line of the last traced steps (the KV cache and the attention mask
   grow by one position per step: sizes are affine in the step; checked on steps K-2, K-1,
   K, which must be alike); a tensor one step leaves to a later one is found at the same
   position of the step it was made in, and what the end of the loop frees is taken from
   step N instead of K (``expand_steps``); a generate's steps K+1..N are held as one
   ``compactrun.DecodeSteps`` piece (step K and that rule), laid out only when asked;
2. **rounds**: the harness's timed rounds after the second repeat it
   (``repeat_last_round``, as ``trace/unroll.repeat_last_step`` repeats a training step);
3. **layers**: ``trace/unroll.unroll`` turns the five traced layers into all of them;
4. **loading**: ``memory/loading.from_pretrained_events`` lays out ``from_pretrained`` of the
   whole model; the recorder's stand-ins for the loaded parameters take their handles (a
   merge that replaces a weight frees its loading allocation).

The replay (``memory/allocator.py``; ``splitreplay``, which needs no laid-out steps) gives
peak allocated and reserved bytes, the phase at each peak and per phase (``load``,
``adapters``, ``merge``, ``prefill``, ``decode``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from operator import itemgetter
from typing import Any

from vramcalc.errors import VramcalcError
from vramcalc.memory.allocator import ALLOC, FREE
from vramcalc.serving.compactrun import DecodeSteps, Run
from vramcalc.serving.servetrace import GenerateSpan

Event = tuple[int, int, int]
_OP, _HANDLE = itemgetter(0), itemgetter(1)


class ServeSimulationError(VramcalcError):
    """A serving trace whose shape the expansion does not allow."""


def _remapped(event: Event, remap: dict[int, int]) -> Event:
    op, handle, nbytes = event
    return (op, remap.get(handle, handle), nbytes) if op == FREE else event


def expand_steps(
    events: tuple[Event, ...],
    tags: tuple[int, ...],
    markers: tuple[tuple[str, int], ...],
    spans: Iterable[GenerateSpan],
) -> tuple[Run, dict[str, int]]:
    """Every generate's loop steps K+1..N from its traced steps (module docstring), each
    generate's as one ``DecodeSteps`` piece; returns the run (its markers those of the
    events) and the output handle of each generate by its marker."""
    at = dict(markers)
    todo = {s.marker: s for s in spans if s.new_tokens > s.traced_steps}
    outputs = {s.marker: s.output_handle for s in spans}
    out = Run()
    remap: dict[int, int] = {}
    top = max((h for _, h, _ in events), default=0)
    order = sorted(markers, key=lambda m: m[1])
    cursor = 0
    for label, index in order:
        if cursor < index:
            out.extend([[_remapped(e, remap) for e in events[cursor:index]]])
            cursor = index
        span = todo.get(label.rpartition(".s")[0]) if ".s" in label else None
        step = int(label.rpartition(".s")[2]) if span is not None else 0
        if span is None or step != span.traced_steps + 1:
            out.mark(label)
            continue
        # the loop's final test of a generate traced short: add steps K+1..N, then go on
        bounds = [at[f"{span.marker}.s{k}"] for k in range(1, span.traced_steps + 2)]
        top = _add_steps(events, tags, bounds, span, out, remap, top)
        out.mark(f"{span.marker}.s{span.new_tokens + 1}")
        outputs[span.marker] = remap.get(span.output_handle, span.output_handle)
    out.extend([[_remapped(e, remap) for e in events[cursor:]]])
    return out, outputs


def _step_shape(
    events: tuple[Event, ...], bounds: list[int], k: int, made: dict[int, tuple[int, int]]
) -> list[tuple[int, Any]]:
    """Step ``k``'s events as (op, size or (steps back, allocation number in that step) of
    what a FREE frees)."""
    shape: list[tuple[int, Any]] = []
    for i in range(bounds[k - 1], bounds[k]):
        op, handle, nbytes = events[i]
        if op == ALLOC:
            shape.append((op, nbytes))
        else:
            origin = made.get(handle)
            shape.append((op, None if origin is None else (k - origin[0], origin[1])))
    return shape


def _add_steps(
    events: tuple[Event, ...],
    tags: tuple[int, ...],
    bounds: list[int],
    span: GenerateSpan,
    out: Run,
    remap: dict[int, int],
    top: int,
) -> int:
    """Append steps K+1..N of ``span`` (template: traced step K) as one ``DecodeSteps`` piece
    and point ``remap`` at step N - d for what the rest of the run frees of traced step
    K - d; returns the piece's last handle."""
    traced, wanted = span.traced_steps, span.new_tokens
    if traced < 5:  # steps 3, 4, 5: the first decoding step still frees the prefill's
        raise ServeSimulationError(f"{span.marker}: {traced} traced steps, at least 5 needed")
    made: dict[int, tuple[int, int]] = {}  # handle -> (step, its allocations before it)
    allocs: dict[int, list[int]] = {}  # step -> its ALLOC handles in order
    traced_sizes: dict[int, tuple[int, ...]] = {}  # step -> their bytes
    for k in range(1, traced + 1):
        made_here = [e for e in events[bounds[k - 1] : bounds[k]] if e[0] == ALLOC]
        allocs[k] = [handle for _, handle, _ in made_here]
        traced_sizes[k] = tuple(nbytes for _, _, nbytes in made_here)
        for ordinal, handle in enumerate(allocs[k]):
            made[handle] = (k, ordinal)
    shapes = {k: _step_shape(events, bounds, k, made) for k in (traced - 2, traced - 1, traced)}
    last, before, first = shapes[traced], shapes[traced - 1], shapes[traced - 2]
    if not len(first) == len(before) == len(last):
        raise ServeSimulationError(f"{span.marker}: decoding steps differ in length")
    slopes: list[int] = []
    for a, b, c in zip(first, before, last, strict=True):
        if not a[0] == b[0] == c[0]:
            raise ServeSimulationError(f"{span.marker}: decoding steps differ in their ops")
        if c[0] == ALLOC:
            if c[1] - b[1] != b[1] - a[1]:
                raise ServeSimulationError(f"{span.marker}: sizes do not grow by steps alike")
            slopes.append(c[1] - b[1])
        else:  # the same tensor of a step before (the first steps free the prefill's)
            if c[1] is None or b[1] != c[1]:
                raise ServeSimulationError(f"{span.marker}: decoding steps free differently")
            slopes.append(0)
    sizes = [c[1] for c in last if c[0] == ALLOC]
    slope_of = [sl for c, sl in zip(last, slopes, strict=True) if c[0] == ALLOC]
    for back, ordinal in {c[1] for c in last if c[0] == FREE and c[1][0] > 0}:
        step = traced + 1 - back  # the traced step the first copy refers to
        if step < 1 or len(allocs[step]) != len(sizes):
            raise ServeSimulationError(f"{span.marker}: a step refers to an irregular one")
        size = traced_sizes[step][ordinal]
        if size != sizes[ordinal] - (traced - step) * slope_of[ordinal]:
            raise ServeSimulationError(f"{span.marker}: a step refers to another tensor")
    start = bounds[traced - 1]
    # the template, by position: (1, first size, slope) for an ALLOC, (0, back, ordinal) else
    template = tuple((1, events[start + pos][2], slopes[pos]) if op == ALLOC else (0, *what)
                     for pos, (op, what) in enumerate(last))  # fmt: skip
    # a copy's handles are numbered in order: step s > K's allocation o is top + ... + o + 1
    piece = DecodeSteps(template, tuple(tags[start : start + len(last)]), traced, wanted, top,
                        len(sizes), {k: tuple(v) for k, v in allocs.items()}, traced_sizes)  # fmt: skip
    out.markers.extend(
        (f"{span.marker}.s{step}", len(out) + (step - traced - 1) * len(template))
        for step in range(traced + 1, wanted + 1)
    )
    out.extend([piece])
    for handle, (step, ordinal) in made.items():
        target = wanted - (traced - step)
        if target > traced:
            remap[handle] = piece.handle(target, ordinal)
    return piece.top


def repeat_last_round(run: Run, rounds: int, outputs: dict[str, int]) -> Run:
    """The run with its last traced round repeated up to ``rounds`` rounds: a round's
    events with new handles, a tensor the round before left (the kept output, a static
    cache) found at the same position of the round it was made in (``_copy_round``)."""
    markers = run.markers
    at = dict(markers)
    traced = sum(1 for label, _ in markers if label.startswith("round"))
    if rounds <= traced:
        return run
    first, last, end = at[f"round{traced - 2}"], at[f"round{traced - 1}"], at["after"]
    made, top = _allocations(run, first, end)
    out = Run()
    out.extend(run.slice(0, end))
    out_markers = [(m, i) for m, i in markers if i < end]
    inner = [(m, i - last) for m, i in markers if last <= i < end]
    length = end - last
    for k, copy in enumerate(range(traced, rounds)):
        base = len(out) + k * length
        out_markers += [(_renumber(m, copy, traced), base + offset) for m, offset in inner]
    remap = _Renamed(
        {h: h for i, (op, h, _) in run.literal_events(last) if op == ALLOC and i < end}
    )
    remap.ranges = [(p.base, p.top, 0) for start, p in run.spans()
                    if isinstance(p, DecodeSteps) and last <= start < end]  # fmt: skip
    for _ in range(rounds - traced):
        remap, top = _copy_round(run, made, (first, last, end), top, out, remap)
    base = len(out)
    for m, i in markers:
        if i >= end:
            out_markers.append((m, base + i - end))
    for piece in run.slice(end):
        if isinstance(piece, DecodeSteps):  # frees its own generate's tensors only
            out.extend([piece])
        else:
            out.extend([[_remapped(e, remap) for e in piece]])  # type: ignore[arg-type]
    for marker, handle in list(outputs.items()):
        outputs[marker] = remap.get(handle, handle)
    out.markers = out_markers
    return out


class _Renamed(dict[int, int]):
    """Handles renamed: a dict, and ``ranges`` of (low, high, shift): a handle in
    (low, high] (a ``DecodeSteps`` piece's) is renamed to handle + shift."""

    ranges: list[tuple[int, int, int]]

    def __init__(self, renamed: dict[int, int] | None = None) -> None:
        super().__init__(renamed or {})
        self.ranges = []

    def get(self, handle: int, default: int | None = None) -> int | None:  # type: ignore[override]
        found = dict.get(self, handle)
        if found is not None:
            return found
        for low, high, shift in self.ranges:
            if low < handle <= high:
                return handle + shift
        return default

    def __getitem__(self, handle: int) -> int:
        found = self.get(handle)
        if found is None:
            raise KeyError(handle)
        return found


def _copy_round(
    run: Run,
    made_at: Any,
    bounds: tuple[int, int, int],
    top: int,
    out: Run,
    previous: _Renamed,
) -> tuple[_Renamed, int]:
    """``trace/repeat.copy_segment`` of the round ``[start, stop)`` once, ``older="keep"``
    (a serving round frees what loading made), its ``DecodeSteps`` pieces moved to fresh
    handles whole: a copy's handles are numbered in order, so a piece's stay in one range.
    Returns the copy's handles (the round's handle -> the copy's) and the new top."""
    prev, start, stop = bounds
    current = _Renamed()
    event_at = run.event_at

    def freed(handle: int) -> int:
        made = made_at.get(handle, -1)
        if start <= made < stop:
            return current[handle]
        if prev <= made < start:  # made by the round before: its twin's last copy
            twin = event_at(made - prev + start)
            if twin[0] != ALLOC or twin[2] != event_at(made)[2]:
                raise ServeSimulationError("a tensor crossing rounds has no twin in the next round")
            return previous[twin[1]]
        return handle

    for piece in run.slice(start, stop):
        if isinstance(piece, DecodeSteps):
            # the traced tensors its steps free: step s frees allocation o of step s - back
            used = {(step, ordinal) for is_alloc, back, ordinal in piece.template if not is_alloc
                    for step in range(piece.traced + 1 - back,
                                      min(piece.traced, piece.wanted - back) + 1)}  # fmt: skip
            traced = {k: list(hs) for k, hs in piece.traced_allocs.items()}
            for step, ordinal in used:
                traced[step][ordinal] = freed(traced[step][ordinal])
            moved = piece.moved(top, {k: tuple(hs) for k, hs in traced.items()})
            current.ranges.append((piece.base, piece.top, top - piece.base))
            top = moved.top
            out.extend([moved])
            continue
        copied: list[Event] = []
        for op, handle, nbytes in piece:
            if op == ALLOC:
                top += 1
                current[handle] = top
                copied.append((op, top, nbytes))
            else:
                copied.append((op, freed(handle), nbytes))
        out.extend([copied])
    return current, top


class _Made:
    """Where each handle allocated in a run is (``_allocations``): literal ALLOCs by a
    dict, ``DecodeSteps`` pieces' by their handle ranges."""

    def __init__(self, literal: dict[int, int], pieces: list[tuple[int, DecodeSteps]]):
        self.literal, self.pieces = literal, pieces

    def get(self, handle: int, default: int = -1) -> int:
        found = self.literal.get(handle)
        if found is not None:
            return found
        for start, piece in self.pieces:
            index = piece.alloc_index(handle)
            if index is not None:
                return start + index
        return default


def _allocations(run: Run, first: int, end: int) -> tuple[_Made, int]:
    """Where each handle allocated in ``events[first:end]`` is, and the top handle
    allocated anywhere (literal events at C speed, pieces by their ranges): for
    ``_copy_round``, which reads where a tensor freed from ``end - 1`` back was made when
    that is from ``first`` on (else it keeps it), this is where all of ``events`` say,
    unless a handle is allocated again after ``end``."""

    def allocated(start: int, stop: int | None) -> Iterator[tuple[int, int]]:
        for index, piece in run.spans():
            if isinstance(piece, DecodeSteps) or index + len(piece) <= start:
                continue
            if stop is not None and index >= stop:
                break
            lo = max(start - index, 0)
            hi = len(piece) if stop is None else min(stop - index, len(piece))
            part = itertools.islice(piece, lo, hi)
            ops, handles = itertools.tee(part)
            is_alloc = list(map(ALLOC.__eq__, map(_OP, ops)))
            yield from zip(
                itertools.compress(map(_HANDLE, handles), is_alloc),
                itertools.compress(itertools.count(index + lo), is_alloc),
                strict=True,
            )

    pieces = [(i, p) for i, p in run.spans() if isinstance(p, DecodeSteps)]
    inside = [(i, p) for i, p in pieces if first <= i < end]
    made = dict(allocated(first, end))
    after = [h for h, _ in allocated(end, None)]
    outside = [h for h, _ in allocated(0, first)] + after
    if not made.keys().isdisjoint(after):
        made, inside = dict(allocated(0, None)), pieces
    tops = [p.top for _, p in pieces if p.count]
    return _Made(made, inside), max((*made, *outside, *tops), default=0)


def _renumber(label: str, copy: int, traced: int) -> str:
    """A marker of the last traced round, as the same marker of round ``copy``."""
    if label.startswith("round"):
        return f"round{copy}"
    if label.startswith("g"):
        number, _, rest = label[1:].partition(".")
        generate = int(number) + 2 * (copy - traced + 1)
        return f"g{generate}" + (f".{rest}" if rest else "")
    return label
