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
``worldreplay.replay(gpu_bound=True)``) follow their event's copies at the same distance.
``tests/trace/test_worldunroll.py`` checks unrolled traces against traces of every layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vramcalc.memory.allocator import ALLOC
from vramcalc.trace.events import WorldTrace
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

    def unit_init(self: Any, module: Any, *args: Any, **kwargs: Any) -> None:
        with recorder.in_layer(recorder.layer_of(module)):
            init(self, module, *args, **kwargs)

    def init_flat_param_attributes(self: Any) -> None:
        with recorder.in_layer(recorder.layer_of(self._fully_sharded_module)):
            init_attributes(self)

    def running(function: Any, handle_at: int) -> Any:
        """``function`` run in the layer of its handle argument (left set: the layer runs)."""

        def hook(*args: Any, **kwargs: Any) -> Any:
            handle = args[handle_at]
            if handle is not None:
                recorder.layer = recorder.layer_of(handle._fully_sharded_module)
            return function(*args, **kwargs)

        return hook

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
        (runtime_utils, "_pre_backward_hook", running(runtime_utils._pre_backward_hook, 2)),
        (runtime_utils, "_post_backward_hook", running(runtime_utils._post_backward_hook, 1)),
        (
            runtime_utils,
            "_post_backward_reshard_only_hook",
            running(runtime_utils._post_backward_reshard_only_hook, 1),
        ),
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
    events = unroll(small.events, small.tags, num_layers, positions=positions, origins=origins)
    copies: dict[int, list[int]] = {}
    for index, origin in enumerate(origins):
        copies.setdefault(origin, []).append(index)
    copies[len(small.events)] = [len(events)]
    sync_points = sorted(
        (at, max(0, at - (now - upto)))
        for now, upto in small.sync_points
        for at in copies.get(now, [])
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
        tuple(sync_points),
        num_layers,
        small.wrapper,
        tuple(small.labels[o] for o in origins) if small.labels else (),
        cross,
    )
