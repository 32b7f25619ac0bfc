"""A world trace of a few decoder layers turned into the trace of the whole model.

``trace/unroll.py`` does this for one GPU: decoder layers are alike, so a trace of
``TRACED_LAYERS`` (5) of them holds, for every pass over the layers, one run of events
per layer; the interior layer's run is repeated for the layers the trace did not run.
A rank of an FSDP1 / DDP world passes over the layers more often -- loading, the wrap
(flattening and sharding each unit), FSDP's lazy init, each forward and backward, the
final callback of each backward, the optimizer -- and this module tags every event
with its layer so that the same unrolling applies:

* loading: each parameter's events in its layer (``worldload.load_world``);
* the wrap: ``FullyShardedDataParallel.__init__`` of a unit, accelerate's fp32 upcast
  of its flat parameter, its lazy init (``init_flat_param_attributes``), and the final
  callback's per-unit work (``_catch_all_reshard``, ``_finalize_params``) in the unit's
  layer (an FSDP unit is a decoder layer, its peft sub-units, or the root: no layer);
* forward: from a layer's pre-forward hook (its FSDP unshard included) to the next;
* backward: FSDP's pre-backward hook (the unshard, the prefetch of the layer below),
  the layer's autograd nodes (``steptrace.tag_layers``), and its post-backward hook (the
  reduce-scatter) in the layer whose hook runs;
* the optimizer and gradient clipping: by the layer of the tensor an output is made from.

What depends on the whole model and not on one layer is sized for the whole model in the
trace itself: transformers' loading warmup (``worldload.warmup_bytes``: ``copies``) and
DDP's buckets and broadcasts (``ddpreducer``: ``ModelCopies.describe``).

``unroll_world`` then unrolls the events (``unroll.unroll``) and carries each event's
stream, label and cross-stream use along; FSDP's host waits (``sync_points``, used only by
``worldreplay.replay(gpu_bound=True)``) are paired again as its rate limiter pairs them
(``_unrolled_syncs``). Under FSDP two steps are traced and the second repeated, and both
traces end with their frees in one order (``trace/worldrepeat.py``). ``tests/trace/test_worldunroll.py`` checks unrolled traces against
traces of every layer and step, event for event.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vramcalc.memory.allocator import ALLOC
from vramcalc.trace.events import UnrollError, WorldTrace
from vramcalc.trace.steptrace import decoder_layers
from vramcalc.trace.unroll import TEMPLATE, TRACED_LAYERS, unroll
from vramcalc.trace.worldrecorder import WorldRecorder


@dataclass(frozen=True)
class ModelCopies:
    """How the traced model stands for the model simulated: the traced decoder layer
    ``TEMPLATE`` for each of layers 2 .. N-3, every other tensor for itself."""

    tensor_layers: dict[int, int]  # id(tensor) -> its decoder layer (absent: none)
    num_layers: int  # decoder layers of the model simulated
    traced_layers: int  # decoder layers traced

    @property
    def repeats(self) -> int:
        """How many layers the template stands for."""
        if self.num_layers <= self.traced_layers:
            return 1
        return self.num_layers - TRACED_LAYERS + 1

    def copies(self) -> dict[int, int]:
        """``id`` -> number of tensors of the model simulated, for the template's tensors."""
        if self.repeats == 1:
            return {}
        return {key: self.repeats for key, layer in self.tensor_layers.items() if layer == TEMPLATE}

    def layer_repeats(self) -> dict[int, int]:
        """Decoder layer -> layers of the model simulated it stands for, where not 1."""
        return {TEMPLATE: self.repeats} if self.repeats > 1 else {}

    def describe(self, tensors: list[Any]) -> list[tuple[int, Any]]:
        """``(numel, dtype)`` of the model simulated's tensors that ``tensors`` (in some order)
        stand for: each consecutive run of the template layer's tensors repeated."""
        out: list[tuple[int, Any]] = []
        run: list[tuple[int, Any]] = []
        for tensor in [*tensors, None]:
            if tensor is not None and self.tensor_layers.get(id(tensor), -1) == TEMPLATE:
                run.append((tensor.numel(), tensor.dtype))
                continue
            out.extend(run * self.repeats)
            run = []
            if tensor is not None:
                out.append((tensor.numel(), tensor.dtype))
        return out


def layer_maps(model: Any) -> tuple[dict[int, int], dict[int, int]]:
    """(``id(parameter or buffer)`` -> decoder layer, ``id(module)`` -> decoder layer)."""
    tensors: dict[int, int] = {}
    modules: dict[int, int] = {}
    for index, layer in enumerate(decoder_layers(model)):
        for module in layer.modules():
            modules[id(module)] = index
        for tensor in (*layer.parameters(), *layer.buffers()):
            tensors[id(tensor)] = index
    return tensors, modules


def add_modules(recorder: WorldRecorder, wrapped: Any) -> None:
    """The wrapped model's modules (FSDP's unit wrappers) in the recorder's layer map."""
    for index, layer in enumerate(decoder_layers(wrapped)):
        for module in layer.modules():
            recorder.module_layers[id(module)] = index


@contextlib.contextmanager
def fsdp_layer_tags(recorder: WorldRecorder) -> Iterator[None]:
    """FSDP1's per-unit work in the unit's decoder layer (module docstring)."""
    import torch.distributed.fsdp._flat_param as flat_param_module
    import torch.distributed.fsdp._runtime_utils as runtime_utils
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    init = FSDP.__init__
    init_attributes = flat_param_module.FlatParamHandle.init_flat_param_attributes
    runtime_utils_pre_backward = runtime_utils._pre_backward_hook
    runtime_utils_final_callback = runtime_utils._post_backward_final_callback

    def unit_init(self: Any, module: Any, *args: Any, **kwargs: Any) -> None:
        with recorder.in_layer(recorder.layer_of(module)):
            init(self, module, *args, **kwargs)

    def init_flat_param_attributes(self: Any) -> None:
        with recorder.in_layer(recorder.layer_of(self._fully_sharded_module)):
            init_attributes(self)

    finished: set[int] = set()  # layers whose unit's post-backward hook ran (this backward)

    def layer_of(handle: Any) -> int:
        return recorder.layer_of(handle._fully_sharded_module)

    def pre_backward(*args: Any, **kwargs: Any) -> Any:
        # a layer's backward ends with its unit's post-backward hook: a pre-backward hook
        # that runs before it (peft units: the reshard-only hook of the layer above fires
        # after the pre-backward hook of the layer below, both on the same tensor) is still
        # part of the running layer; one that runs after it starts its own layer
        handle = args[2]
        if handle is not None:
            running = recorder.layer
            if running < 0 or running in finished or running == layer_of(handle):
                recorder.layer = layer_of(handle)
        return runtime_utils_pre_backward(*args, **kwargs)

    def post_backward(function: Any) -> Any:
        """A post-backward hook in its handle's layer; the layer's backward ends with its unit's."""

        def hook(*args: Any, **kwargs: Any) -> Any:
            handle = args[1]
            recorder.layer = layer_of(handle)
            try:
                return function(*args, **kwargs)
            finally:
                if id(handle._fully_sharded_module) in recorder.layer_modules:
                    finished.add(recorder.layer_of(handle._fully_sharded_module))

        return hook

    def final_callback(state: Any, module: Any) -> Any:
        finished.clear()  # the backward is over
        return runtime_utils_final_callback(state, module)

    def per_unit(function: Any) -> Any:
        """``function(state)`` of the final callback in the layer of the state's unit."""

        def call(state: Any) -> Any:
            with recorder.in_layer(recorder.layer_of(state._fsdp_wrapped_module)):
                return function(state)

        return call

    patches = (
        (FSDP, "__init__", unit_init),
        (
            flat_param_module.FlatParamHandle,
            "init_flat_param_attributes",
            init_flat_param_attributes,
        ),
        (runtime_utils, "_pre_backward_hook", pre_backward),
        (runtime_utils, "_post_backward_hook", post_backward(runtime_utils._post_backward_hook)),
        (
            runtime_utils,
            "_post_backward_reshard_only_hook",
            post_backward(runtime_utils._post_backward_reshard_only_hook),
        ),
        (runtime_utils, "_post_backward_final_callback", final_callback),
        (runtime_utils, "_catch_all_reshard", per_unit(runtime_utils._catch_all_reshard)),
        (runtime_utils, "_finalize_params", per_unit(runtime_utils._finalize_params)),
    )
    originals = [(target, name, getattr(target, name)) for target, name, _ in patches]
    try:
        for target, name, value in patches:
            setattr(target, name, value)
        yield
    finally:
        for target, name, value in originals:
            setattr(target, name, value)


def unroll_world(small: WorldTrace, num_layers: int) -> WorldTrace:
    """``small`` (a trace of ``TRACED_LAYERS`` decoder layers, tagged) as the trace of the
    ``num_layers``-layer model (``unroll.UnrollError`` when its layers are not alike)."""
    origins: list[int] = []
    positions: list[int] = []
    out_tags: list[int] = []
    events = unroll(
        small.events, small.tags, num_layers, out_tags, positions=positions, origins=origins
    )
    cross = frozenset(
        events[index][1]
        for index, origin in enumerate(origins)
        if events[index][0] == ALLOC and small.events[origin][1] in small.cross_stream
    )
    return WorldTrace(
        events,
        tuple(small.streams[o] for o in origins),
        tuple((label, positions[at]) for label, at in small.markers),
        _unrolled_syncs(small, events, origins, out_tags),
        num_layers,
        small.wrapper,
        tuple(small.labels[o] for o in origins) if small.labels else (),
        cross,
    )


def _unrolled_syncs(
    small: WorldTrace,
    events: tuple[tuple[int, int, int], ...],
    origins: list[int],
    out_tags: list[int],
) -> tuple[tuple[int, int], ...]:
    """``small``'s host waits in the unrolled trace, each at every copy of the event it
    precedes. A wait for everything (a synchronize) stays one; a wait for an earlier point
    is FSDP's rate limiter, which records an event after each unit's reshard and, before
    an all-gather with two in flight, waits for the oldest (a FIFO queue): the points
    awaited in ``small`` are copied with the free they follow, and the waits of the
    unrolled trace take them in order. Where ``small``'s waits are not in that order, each
    wait awaits the copy of its awaited event in the layer at the same distance (``anchor``)."""
    copies: dict[int, list[int]] = {}
    for index, origin in enumerate(origins):
        copies.setdefault(origin, []).append(index)
    copies[len(small.events)] = [len(events)]
    tags = small.tags

    def run_start(sequence: Any, k: int) -> int:
        while k > 0 and sequence[k - 1] == sequence[k]:
            k -= 1
        return k

    def run_end(sequence: Any, k: int) -> int:
        while k + 1 < len(sequence) and sequence[k + 1] == sequence[k]:
            k += 1
        return k + 1

    def anchor(k: int, at: int, now: int) -> int:
        """The new index of the copy of ``small``'s event ``k`` that a wait at ``at`` awaits."""
        tag_k = tags[k]
        layer = out_tags[at] if at < len(out_tags) else -1
        tag_now = tags[now] if now < len(tags) else -1
        if tag_k >= 0 and tag_now >= 0 and layer >= 0:
            target = layer + tag_k - tag_now
            start = run_start(tags, k)
            # runs of the awaited layer between its event and the wait (a forward's and
            # the backward's runs of one layer): as many are passed over in the new trace
            later = sum(1 for i in range(k + 1, now) if tags[i] == tag_k != tags[i - 1])
            j = at
            for _ in range(later + 1):
                j -= 1
                while j >= 0 and out_tags[j] != target:
                    j -= 1
                if j < 0:
                    break
                j = run_start(out_tags, j)
            if j >= 0:
                # the same event of the layer's run: as far from its start, or (a first or
                # last layer's run holds more: the root unit's work) from its end
                stop = run_end(tags, k)
                for found in (j + k - start, run_end(out_tags, j) - (stop - k)):
                    if 0 <= found < at and _alike(small, origins[found], k):
                        return found
            raise UnrollError(f"a host wait at event {now} has no awaited event in layer {target}")
        before = [c for c in copies[k] if c < at]
        if not before:
            raise UnrollError(f"a host wait at event {now} awaits no earlier event")
        return before[-1]

    def _anchor_of(upto: int, at: int, now: int) -> int:
        return anchor(upto - 1, at, now) + 1 if upto else 0

    waits = sorted((now, upto) for now, upto in small.sync_points if upto != now)
    out = [(at, at) for now, upto in small.sync_points if upto == now for at in copies[now]]
    awaited = sorted({upto for _, upto in waits})
    if [upto for _, upto in waits] == awaited:  # each point awaited once, in order: FIFO
        points = sorted(c + 1 if p else 0 for p in awaited for c in copies[max(p - 1, 0)])
        times = sorted((at, now, upto) for now, upto in waits for at in copies[now])
        if any(p > t for p, (t, _, _) in zip(points, times, strict=False)):
            raise UnrollError("the unrolled rate limiter waits for points not yet recorded")
        out += [(t, p) for p, (t, _, _) in zip(points, times, strict=False)]
        # the last waits await points ``small`` never awaits (its run ends first: a copy of
        # an interior layer's last reshard): the awaited event's copy by layer distance
        out += [(t, _anchor_of(upto, t, now)) for t, now, upto in times[len(points) :]]
    else:
        out += [(at, _anchor_of(upto, at, now)) for now, upto in waits for at in copies[now]]
    return tuple(sorted(set(out)))


def _alike(trace: WorldTrace, i: int, j: int) -> bool:
    """Events ``i`` and ``j`` of ``trace`` do the same (op, bytes, stream, what made it)."""
    same_label = not trace.labels or trace.labels[i] == trace.labels[j]
    return (
        trace.events[i][0] == trace.events[j][0]
        and trace.events[i][2] == trace.events[j][2]
        and trace.streams[i] == trace.streams[j]
        and same_label
    )
