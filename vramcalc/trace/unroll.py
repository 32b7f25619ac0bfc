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
from vramcalc.memory.allocator import ALLOC

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


def unroll(
    events: tuple[tuple[int, int, int], ...], tags: tuple[int, ...], num_layers: int
) -> tuple[tuple[int, int, int], ...]:
    """The events of the ``num_layers``-layer model from a ``TRACED_LAYERS``-layer trace."""
    n = num_layers
    if n <= TRACED_LAYERS:
        raise UnrollError(f"{n} layers need no unrolling")
    filled = fill_untagged(retag_distant_frees(events, list(tags)))
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

    out: list[tuple[int, int, int]] = []
    for run in runs:
        if run.tag == TEMPLATE:
            layers = range(2, n - 2) if sweeps[run.sweep][3] else range(n - 3, 1, -1)
            for layer in layers:
                for op, handle, nbytes in events[run.start : run.stop]:
                    if op == ALLOC:
                        out.append((op, copy(handle, layer), nbytes))
                    else:
                        out.append((op, resolve(handle, layer, TEMPLATE), nbytes))
            continue
        running = layer_of_tag.get(run.tag)
        for op, handle, nbytes in events[run.start : run.stop]:
            if op == ALLOC:
                out.append((op, handle, nbytes))
            else:
                out.append((op, resolve(handle, running, run.tag), nbytes))
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
