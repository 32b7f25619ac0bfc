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

from dataclasses import dataclass, field, replace

from vramcalc.memory.allocator import ALLOC, EMPTY_CACHE, FREE
from vramcalc.trace.events import StepTrace, UnrollError
from vramcalc.trace.repeat import repeat_last_step, repeat_step_markers, traced_steps

TRACED_LAYERS = 5
TEMPLATE = 2  # the interior layer repeated


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
    """The parameter list of the ``num_layers``-layer model, names renumbered, in the model's
    order: layer by layer (the interior layer's parameters, contiguous in the traced model,
    repeated as a block for layers 2..N-3)."""
    n = num_layers
    template = [param for param, layer in zip(params, param_layers, strict=True)
                if layer == TEMPLATE]  # fmt: skip
    marker = f".{TEMPLATE}."
    out = []
    for param, layer in zip(params, param_layers, strict=True):
        if layer < 0 or layer < TEMPLATE:
            out.append(param)
        elif layer == TEMPLATE:
            if param is template[0]:
                for k in range(2, n - 2):
                    out.extend((p[0].replace(marker, f".{k}.", 1), *p[1:]) for p in template)
        else:
            new = {3: n - 2, 4: n - 1}[layer]
            out.append((param[0].replace(f".{layer}.", f".{new}.", 1), *param[1:]))
    return tuple(out)


def with_tensor_count(small: StepTrace, count: int) -> StepTrace:
    """``small`` with its allocations of one element per trainable tensor
    (``StepTrace.per_tensor``) sized for ``count`` trainable tensors."""
    if not small.per_tensor or count == small.traced_tensors:
        return small
    traced = small.traced_tensors
    resized = set(small.per_tensor)
    events = tuple(
        (op, handle, nbytes // traced * count) if op != EMPTY_CACHE and handle in resized else
        (op, handle, nbytes)
        for op, handle, nbytes in small.events
    )  # fmt: skip
    return replace(small, events=events)


def expand(small: StepTrace, steps: int, num_layers: int, labelled: bool = False) -> StepTrace:
    """A trace of two or more steps of at most ``TRACED_LAYERS`` layers as ``steps`` steps
    of ``num_layers`` layers (``UnrollError`` when its shape does not allow it).

    With ``labelled``, the result keeps each event's decoder layer (``tags``) and the phase
    markers of every step (``markers``: step starts, micro-batches, backward passes,
    optimizer steps, the end), for timelines; without, it has neither (unrolled), as a
    replay needs neither."""
    unrolled = num_layers > small.num_layers
    params = (
        unroll_params(small.params, small.param_layers, num_layers) if unrolled else small.params
    )
    small = with_tensor_count(small, sum(1 for p in params if p[3]))
    more = steps - traced_steps(small.markers)
    if more < 0:
        raise UnrollError(f"{steps} steps asked of a trace of more")
    events, tags = repeat_last_step(small.events, small.tags, small.markers, more)
    markers = repeat_step_markers(small.markers, more) if labelled else ()
    if unrolled:
        out_tags: list[int] | None = [] if labelled else None
        positions: list[int] | None = [] if labelled else None
        events = unroll(events, tags, num_layers, out_tags, positions)
        tags = tuple(out_tags) if out_tags is not None else ()
        if positions is not None:
            markers = tuple((label, positions[i]) for label, i in markers)
    return StepTrace(events, tags, markers, params, (), num_layers)
