"""A step trace of a 5-layer model turned into the trace of the N-layer model.

Decoder layers are identical, so recording every one of them (seconds each on
fake tensors) repeats the same allocations. ``trace_steps`` tags every event
with the layer it belongs to (forward hooks, the autograd nodes of each layer
in backward, the layer of the parameter an optimizer tensor is made from).
A trace of layers 0..4 then holds, for every pass over the layers (a
"sweep": forward, backward, the graph's release, each optimizer loop), a run
of events per layer. Layers 1, 2 and 3 are interior layers: their runs in a
sweep must be alike (same allocation sizes, checked). The N-layer trace
keeps layers 0, 1 as they are, repeats layer 2's run for layers 2..N-3 (in
the sweep's direction), and gives layer 3's and 4's runs to layers N-2 and
N-1. A free refers to a tensor by its layer *relative* to the running one
(a layer frees its predecessor's output, backward frees what the same
layer's forward saved), so each copy frees the copy at the same offset.

``unroll`` raises ``UnrollError`` when the trace does not have this shape;
the caller then traces all N layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vramcalc.errors import VramcalcError
from vramcalc.memory.allocator import ALLOC, FREE
from vramcalc.trace.events import StepTrace

TRACED_LAYERS = 5
TEMPLATE = 2  # the interior layer repeated


class UnrollError(VramcalcError):
    """The trace cannot be unrolled (its layers are not alike)."""


def retag_distant_frees(events: tuple[tuple[int, int, int], ...], tags: list[int]) -> list[int]:
    """A free of a tensor two or more layers away from the running one belongs to a sweep
    over the layers (e.g. what every layer left is released at the end of the forward),
    not to the running layer: give it the tensor's layer."""
    made: dict[int, int] = {}
    out = list(tags)
    for i, (op, handle, _) in enumerate(events):
        if op == ALLOC:
            made[handle] = tags[i]
        else:
            owner = made.get(handle, -1)
            if owner >= 0 and out[i] >= 0 and abs(owner - out[i]) >= 2:
                out[i] = owner
    return out


def fill_untagged(tags: list[int]) -> list[int]:
    """Give events outside any layer the layer around them: between two events of one layer,
    that layer; between two neighbouring layers, the next one (a per-tensor prefix, such as
    the step counter fused AdamW creates before each parameter's states)."""
    out = list(tags)
    n = len(out)
    i = 0
    while i < n:
        if out[i] >= 0:
            i += 1
            continue
        j = i
        while j < n and out[j] < 0:
            j += 1
        before = out[i - 1] if i > 0 else -1
        after = out[j] if j < n else -1
        if before >= 0 and after >= 0 and abs(before - after) <= 1:
            for k in range(i, j):
                out[k] = after
        i = j
    return out


@dataclass
class _Run:
    tag: int
    start: int
    stop: int
    allocs: list[int] = field(default_factory=list)  # handles, in order
    sweep: int = -1


def _runs(tags: list[int], events: tuple[tuple[int, int, int], ...]) -> list[_Run]:
    runs: list[_Run] = []
    for i, tag in enumerate(tags):
        if not runs or runs[-1].tag != tag:
            runs.append(_Run(tag, i, i))
        runs[-1].stop = i + 1
        if events[i][0] == ALLOC:
            runs[-1].allocs.append(events[i][1])
    return runs


def release_sweeps(events: tuple[tuple[int, int, int], ...], tags: list[int]) -> list[bool]:
    """Per event: True for the frees of a release sweep -- a batch of consecutive frees
    whose tensors come from three or more decoder layers (what every layer left, released
    at once); the batch's order does not change the allocator's state."""
    made: dict[int, int] = {}
    out = [False] * len(events)
    i, n = 0, len(events)
    for k, (op, handle, _) in enumerate(events):
        if op == ALLOC:
            made[handle] = tags[k]
    while i < n:
        if events[i][0] == ALLOC:
            i += 1
            continue
        j = i
        while j < n and events[j][0] != ALLOC:
            j += 1
        layers = {made.get(events[k][1], -1) for k in range(i, j)} - {-1}
        if len(layers) >= 3:
            for k in range(i, j):
                out[k] = True
        i = j
    return out


def unroll(
    events: tuple[tuple[int, int, int], ...],
    tags: tuple[int, ...],
    num_layers: int,
    out_tags: list[int] | None = None,
    positions: list[int] | None = None,
    origins: list[int] | None = None,
) -> tuple[tuple[int, int, int], ...]:
    """The events of the ``num_layers``-layer model from a ``TRACED_LAYERS``-layer trace.

    ``out_tags``, when given, receives each new event's decoder layer (-1: none);
    ``positions`` the index of each traced event's first copy, then the new length;
    ``origins`` the traced event each new event copies (what else a caller keeps per
    event follows from it: a world trace's streams)."""
    n = num_layers
    if n <= TRACED_LAYERS:
        raise UnrollError(f"{n} layers need no unrolling")
    sweep_free = release_sweeps(events, list(tags))
    base_tags = list(tags)
    for k in range(len(events)):
        if sweep_free[k]:
            base_tags[k] = -2  # placeholder: takes its neighbours' tag below
    retagged = retag_distant_frees(events, base_tags)
    last = -1
    for k in range(len(events)):
        if sweep_free[k]:
            retagged[k] = last
        else:
            last = retagged[k]
    filled = fill_untagged(retagged)
    runs = _runs(filled, events)
    tagged = [r for r in runs if r.tag >= 0]
    # sweeps: each template run with its neighbouring runs of layers 1 and 3
    sweeps: list[tuple[_Run, _Run, _Run, bool]] = []  # (r1, r2, r3, ascending)
    for pos, run in enumerate(tagged):
        if run.tag != TEMPLATE:
            continue
        prev = tagged[pos - 1].tag if pos > 0 else None
        nxt = tagged[pos + 1].tag if pos + 1 < len(tagged) else None
        if (prev, nxt) == (1, 3):
            r1, r3, ascending = tagged[pos - 1], tagged[pos + 1], True
        elif (prev, nxt) == (3, 1):
            r3, r1, ascending = tagged[pos - 1], tagged[pos + 1], False
        else:
            raise UnrollError(
                f"layer {TEMPLATE}'s run at event {run.start} sits between {prev} and {nxt}"
            )
        sizes = [
            [events[i][2] for i in range(r.start, r.stop) if events[i][0] == ALLOC]
            for r in (r1, run, r3)
        ]
        if not sizes[0] == sizes[1] == sizes[2]:
            raise UnrollError(f"interior layers allocate differently at event {run.start}")
        for r in (r1, run, r3):
            r.sweep = len(sweeps)
        sweeps.append((r1, run, r3, ascending))
    where: dict[int, tuple[_Run, int]] = {}  # handle -> (run it was made in, index there)
    for run in runs:
        for index, handle in enumerate(run.allocs):
            where[handle] = (run, index)
    layer_of_tag = {0: 0, 1: 1, 3: n - 2, 4: n - 1}
    fresh: dict[tuple[int, int], int] = {}
    top = max((h for _, h, _ in events), default=0)

    def copy(handle: int, layer: int) -> int:
        key = (handle, layer)
        if key not in fresh:
            fresh[key] = top + 1 + len(fresh)
        return fresh[key]

    def resolve(handle: int, running_layer: int | None, running_tag: int) -> int:
        made = where.get(handle)
        if made is None:
            return handle
        run, index = made
        if TEMPLATE not in (run.tag, running_tag):
            # between layers that exist once in both models: the same tensor, unless the
            # distance between them changes (layers 1 and N-2)
            if {run.tag, running_tag} == {1, 3}:
                raise UnrollError("layers 1 and 3 refer to each other's tensors")
            return handle
        if run.tag < 0 or running_tag < 0:
            if run.tag == TEMPLATE:
                raise UnrollError("a layer-less event refers to an interior layer's tensor")
            return handle
        assert running_layer is not None
        target = running_layer + run.tag - running_tag
        if run.tag != TEMPLATE and layer_of_tag[run.tag] == target:
            return handle
        if run.sweep < 0:
            raise UnrollError(f"layer {run.tag}'s tensor is referred to from layer offset {target}")
        r1, r2, r3, _ = sweeps[run.sweep]
        if 2 <= target <= n - 3:
            return copy(r2.allocs[index], target)
        if target == 1:
            return r1.allocs[index]
        if target == n - 2:
            return r3.allocs[index]
        raise UnrollError(f"no layer {target} for a tensor of layer {run.tag}")

    def release(handle: int, nbytes: int) -> list[tuple[int, int, int]]:
        """A free of a release sweep: of the tensor itself, or of every interior copy."""
        made = where.get(handle)
        if made is None or made[0].tag != TEMPLATE:
            return [(FREE, handle, nbytes)]
        run, index = made
        if run.sweep < 0:
            raise UnrollError("a release sweep frees an interior tensor outside any sweep")
        template = sweeps[run.sweep][1]
        return [(FREE, copy(template.allocs[index], layer), nbytes) for layer in range(2, n - 2)]

    def layer_at(k: int, running: int | None) -> int:
        """The new model's layer of traced event ``k`` outside the interior runs: the layer
        it was traced in, or the running layer's for an interior tag (a retagged free)."""
        tag = tags[k]
        if tag < 0:
            return -1
        found = layer_of_tag.get(tag, running)
        return -1 if found is None else found

    out: list[tuple[int, int, int]] = []
    for run in runs:
        if any(sweep_free[run.start : run.stop]) and run.tag == TEMPLATE:
            raise UnrollError("a release sweep inside an interior layer's run")
        if run.tag == TEMPLATE:
            if positions is not None:
                positions.extend(range(len(out), len(out) + run.stop - run.start))
            layers = range(2, n - 2) if sweeps[run.sweep][3] else range(n - 3, 1, -1)
            for layer in layers:
                for op, handle, nbytes in events[run.start : run.stop]:
                    if op == ALLOC:
                        out.append((op, copy(handle, layer), nbytes))
                    else:
                        out.append((op, resolve(handle, layer, TEMPLATE), nbytes))
                if origins is not None:
                    origins.extend(range(run.start, run.stop))
                if out_tags is not None:  # untagged events stay untagged
                    out_tags.extend(layer if t >= 0 else -1 for t in tags[run.start : run.stop])
            continue
        running = layer_of_tag.get(run.tag)
        for k, (op, handle, nbytes) in enumerate(events[run.start : run.stop], run.start):
            if positions is not None:
                positions.append(len(out))
            if sweep_free[k]:
                freed = release(handle, nbytes)
                out.extend(freed)
                if origins is not None:
                    origins.extend([k] * len(freed))
                if out_tags is not None:  # one free, or one per interior copy
                    out_tags.extend(range(2, n - 2) if len(freed) > 1 else [layer_at(k, running)])
                continue
            if op == ALLOC:
                out.append((op, handle, nbytes))
            else:
                out.append((op, resolve(handle, running, run.tag), nbytes))
            if origins is not None:
                origins.append(k)
            if out_tags is not None:
                out_tags.append(layer_at(k, running))
    if positions is not None:
        positions.append(len(out))
    return tuple(out)


def unroll_params(
    params: tuple[tuple[str, tuple[int, ...], str, bool, bool], ...],
    param_layers: tuple[int, ...],
    num_layers: int,
) -> tuple[tuple[str, tuple[int, ...], str, bool, bool], ...]:
    """The parameter list of the ``num_layers``-layer model, names renumbered."""
    n = num_layers
    out = []
    for param, layer in zip(params, param_layers, strict=True):
        name = param[0]
        if layer < 0 or layer < TEMPLATE:
            out.append(param)
        elif layer == TEMPLATE:
            marker = f".{TEMPLATE}."
            for k in range(2, n - 2):
                out.append((name.replace(marker, f".{k}.", 1), *param[1:]))
        else:
            new = {3: n - 2, 4: n - 1}[layer]
            out.append((name.replace(f".{layer}.", f".{new}.", 1), *param[1:]))
    return tuple(out)


def repeat_last_step(
    events: tuple[tuple[int, int, int], ...],
    tags: tuple[int, ...],
    markers: tuple[tuple[str, int], ...],
    times: int,
) -> tuple[tuple[tuple[int, int, int], ...], tuple[int, ...]]:
    """A trace of steps 0 and 1 with step 1 repeated ``times`` more times.

    Steps after the first run the same operations (the first also creates the optimizer
    states), so a later step's events are step 1's with new handles. A tensor one step
    leaves to the next (freed early in the next step) is found at the same position from
    the start of the step it was made in.
    """
    at = dict(markers)
    if "step0" not in at or "step1" not in at:
        raise UnrollError("the trace has no step markers")
    b0, b1 = at["step0"], at["step1"]
    b2 = at.get("step2", at.get("end", len(events)))
    if b2 != len(events):
        raise UnrollError("repeat the last of exactly two traced steps")
    made_at = {h: i for i, (op, h, _) in enumerate(events) if op == ALLOC}
    top = max(made_at, default=0)
    out, out_tags = list(events), list(tags)
    previous: dict[int, int] = {h: h for h in made_at}  # step 1's handles as last written
    for _ in range(times):
        current: dict[int, int] = {}
        for i in range(b1, b2):
            op, handle, nbytes = events[i]
            if op == ALLOC:
                top += 1
                current[handle] = top
                out.append((op, top, nbytes))
            else:
                made = made_at.get(handle, -1)
                if made >= b1:
                    out.append((op, current[handle], nbytes))
                elif made >= b0:  # made by the step before: its counterpart in the last copy
                    twin = events[made - b0 + b1]
                    if twin[0] != ALLOC or twin[2] != events[made][2]:
                        raise UnrollError("a tensor crossing steps has no twin in the next step")
                    out.append((op, previous[twin[1]], nbytes))
                else:
                    raise UnrollError("a later step frees a tensor from before the first step")
            out_tags.append(tags[i])
        previous = current
    return tuple(out), tuple(out_tags)


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
                    if handle in made_in:
                        out.append((op, current[handle], nbytes))
                    elif prev <= made < start:
                        twin = events[made - prev + start]
                        if twin[0] != ALLOC or twin[2] != events[made][2]:
                            raise UnrollError("a tensor crossing micro-batches has no twin")
                        out.append((op, previous[twin[1]], nbytes))
                    else:
                        raise UnrollError("a micro-batch frees a tensor from before the last two")
                out_tags.append(tags[i])
            previous = current
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
    """The markers of ``repeat_last_step``'s result: step 1's markers again for each copy
    (``step2``, ``step2_backward0``, ...), and the end after the last."""
    at = dict(markers)
    b1 = at["step1"]
    b2 = at.get("step2", at.get("end", b1))
    length = b2 - b1
    step1 = [(label[len("step1") :], i) for label, i in markers
             if b1 <= i < b2 and (label == "step1" or label.startswith("step1_"))]  # fmt: skip
    out = [(label, i) for label, i in markers if label != "end"]
    for copy in range(1, times + 1):
        out += [(f"step{1 + copy}{rest}", i + copy * length) for rest, i in step1]
    return (*out, ("end", b2 + times * length))


def expand(small: StepTrace, steps: int, num_layers: int, labelled: bool = False) -> StepTrace:
    """A trace of two steps of at most ``TRACED_LAYERS`` layers as ``steps`` steps of
    ``num_layers`` layers (``UnrollError`` when its shape does not allow it).

    With ``labelled``, the result keeps each event's decoder layer (``tags``) and the phase
    markers of every step (``markers``: step starts, micro-batches, backward passes,
    optimizer steps, the end), for timelines; without, it has neither (unrolled), as a
    replay needs neither."""
    events, tags = repeat_last_step(small.events, small.tags, small.markers, steps - 2)
    params = small.params
    markers = repeat_step_markers(small.markers, steps - 2) if labelled else ()
    if num_layers > small.num_layers:
        out_tags: list[int] | None = [] if labelled else None
        positions: list[int] | None = [] if labelled else None
        events = unroll(events, tags, num_layers, out_tags, positions)
        params = unroll_params(small.params, small.param_layers, num_layers)
        tags = tuple(out_tags) if out_tags is not None else ()
        if positions is not None:
            markers = tuple((label, positions[i]) for label, i in markers)
    return StepTrace(events, tags, markers, params, (), num_layers)
