"""The allocation recorder of one rank of a fake world: device memory only, per stream.

``memory/steptrace.py`` records a single-GPU step: every new storage an aten op
creates is an ALLOC, its death a FREE. A rank of an FSDP / DDP world needs three
things more, all added here:

* **streams**: FSDP1 allocates the all-gather destination on its ``unshard``
  stream, the low-precision / H2D copy of a shard on ``pre_unshard`` and the
  reduce-scatter buffers on ``post_backward``. The caching allocator keeps a free
  block in the pool of the stream it was allocated on, so each event carries the
  stream it was allocated on (``WorldRecorder.streams``); ``FakeDeviceHandle`` is
  the ``torch.cuda``-like object FSDP1 gets as its device handle, and tells the
  recorder which stream is current. In backward each autograd node runs on the stream
  its forward op ran on (``trace/nodestreams.py``): FSDP1 makes its flat parameters'
  views on the unshard stream, so their gradients are concatenated there (and a tied
  parameter's two gradients added there).
* **storage resizes**: FSDP1 and FSDP2 free and re-allocate the unsharded flat
  parameter by resizing its storage (``_free_storage``/``_alloc_storage``,
  ``storage.resize_``), which no aten op shows: ``resized`` turns a resize to 0
  into a FREE and a resize from 0 into an ALLOC.
* **host memory**: the trace runs on CPU fake tensors, so the GPU and the host
  (a CPU-loaded model before FSDP moves it, CPU-offloaded shards, pinned gradient
  copies, the optimizer on offloaded shards) share one device. Storages known to be
  on the host are not recorded; an op whose tensor inputs are all on the host makes
  host outputs; ``scope("host")`` / ``scope("device")`` force one side where the
  real code moves tensors between them (the CUDA ``.to(device)`` that is a no-op on
  CPU). A trace may instead tell the two apart by device (``split_devices``, ZeRO-Offload:
  ``trace/zerotrace.py``): the fake GPU is ``cpu:0`` and a new storage of a tensor on
  plain ``cpu`` (device index None) is on the host, one on ``cpu:0`` on the device
  whatever its inputs (``t.to("cpu:0")`` of a host tensor). ``FakeTensorMode`` keeps the two
  devices apart as CUDA's and the CPU's are: ``t.to("cpu")`` of a ``cpu:0`` tensor is a
  copy (``aten._to_copy``, a device-to-host copy), ``t.to("cpu:0")`` a no-op, factory ops
  put their outputs on their ``device`` argument, and an op mixing the two (beyond CPU
  scalars) raises.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

from vramcalc.memory.allocator import EMPTY_CACHE
from vramcalc.trace.nodestreams import DEFAULT_STREAM, NodeStreams
from vramcalc.trace.steptrace import StepRecorder
from vramcalc.training_plan import TrainingPlan

#: the fake GPU's device where a trace tells it from the host (``WorldRecorder.split_devices``)
FAKE_GPU = "cpu:0"


class WorldRecorder(StepRecorder):
    """``steptrace``'s recorder with streams, storage resizes and host storages."""

    def __init__(self, plan: TrainingPlan, attn_shape: tuple[int, int, int, int]) -> None:
        super().__init__(plan, attn_shape)
        self.stream = DEFAULT_STREAM  # the stream allocations go to now (FakeDeviceHandle)
        self.streams: list[int] = []  # per event: its stream (FREE: the block's stream)
        self.labels: dict[int, str] = {}  # handle -> what allocated it (the aten op, ...)
        self.label = "load"
        # host waits on the GPU: (events before the wait, events before the awaited point)
        self.sync_points: list[tuple[int, int]] = []
        self.cross_stream: set[int] = set()  # handles used on a stream not their own
        self._host: set[int] = set()  # storage keys on the host
        self._live: dict[int, tuple[int, int]] = {}  # storage key -> (handle, nbytes) now
        self._made_on: dict[int, int] = {}  # handle -> stream
        self._scope: str | None = None
        #: True: the fake GPU is ``cpu:0``, a tensor on ``cpu`` is on the host (module docstring)
        self.split_devices = False
        self._inputs_on_host = False
        self.module_layers: dict[int, int] = {}  # id(module) -> its decoder layer (tags)
        self.layer_modules: set[int] = set()  # id of each decoder layer module
        self.stopped = False  # True: nothing more is recorded (the run is over)
        # decoder layer -> how many layers of the model simulated it stands for, where that is
        # not 1 (a model traced with fewer layers than it has: trace/worldunroll.py)
        self.layer_repeats: dict[int, int] = {}
        self._whole_model_bytes: int | None = None  # the next output's bytes, sized so
        # autograd nodes made on a side stream, run there in backward (trace/nodestreams.py)
        self.node_streams = NodeStreams(self._set_stream, self.used_on, self._key)

    def _set_stream(self, index: int) -> None:
        self.stream = index

    # -- layers -------------------------------------------------------------------------------
    def layer_of(self, module: Any) -> int:
        """The decoder layer ``module`` belongs to (-1: none, the root unit's)."""
        return self.module_layers.get(id(module), -1)

    @contextlib.contextmanager
    def in_layer(self, layer: int) -> Iterator[None]:
        """Events in here belong to decoder layer ``layer`` (-1: none); the layer before after."""
        previous, self.layer = self.layer, layer
        try:
            yield
        finally:
            self.layer = previous

    # -- events -------------------------------------------------------------------------------
    def _alloc(self, nbytes: int, tag: int = -1) -> int:
        handle = super()._alloc(nbytes, tag)
        self.streams.append(self.stream)
        self.labels[handle] = self.label
        self._made_on[handle] = self.stream
        return handle

    def _free(self, handle: int, nbytes: int, tag: int) -> None:
        if self.stopped:
            return
        super()._free(handle, nbytes, tag)
        self.streams.append(self._made_on.pop(handle, DEFAULT_STREAM))

    def alloc_bytes(self, nbytes: int) -> int:
        """An allocation no tensor stands for (loading staging, quantization state), in the
        running layer."""
        return self._alloc(nbytes, self.layer)

    def free_handle(self, handle: int) -> None:
        self._free(handle, 0, -1)

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()`` at this point."""
        self.events.append((EMPTY_CACHE, 0, 0))
        self.tags.append(-1)
        self.streams.append(DEFAULT_STREAM)

    # -- storages -----------------------------------------------------------------------------
    @staticmethod
    def _key(tensor: Any) -> int:
        return tensor.untyped_storage()._cdata

    def _watch(self, storage: Any, key: int, tag: int) -> None:
        self._handles[key] = (0, tag)

        def died(key: int = key, tag: int = tag) -> None:
            self._handles.pop(key, None)
            self._host.discard(key)
            handle, nbytes = self._live.pop(key, (0, 0))
            if handle:
                self._free(handle, nbytes, tag)

        weakref.finalize(storage, died)

    def bind(self, tensor: Any, handle: int, nbytes: int, layer: int = -1) -> None:
        """``tensor``'s storage is the allocation ``handle`` (made by the load layout)."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        self._watch(storage, key, layer)
        self._live[key] = (handle, nbytes)

    def keep(self, tensors: Any) -> None:
        """Device storages that exist without an event (buffers of a few bytes, as the
        single-GPU trace treats them): not allocated again, their death not a free."""
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage._cdata not in self._handles:
                self._watch(storage, storage._cdata, -1)

    def on_host(self, tensors: Any) -> None:
        """These tensors' storages are host memory (not recorded, nor what is made from them)."""
        for tensor in tensors:
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key not in self._handles:
                self._watch(storage, key, -1)
            self._host.add(key)

    def to_host(self, tensor: Any) -> None:
        """The storage moves to the host: its device allocation is freed."""
        key = self._key(tensor)
        handle, nbytes = self._live.pop(key, (0, 0))
        if handle:
            self._free(handle, nbytes, -1)
        if key not in self._handles:
            self._watch(tensor.untyped_storage(), key, -1)
        self._host.add(key)

    def is_host(self, tensor: Any) -> bool:
        if self.split_devices and tensor.device.index is None:
            return True
        return self._key(tensor) in self._host

    @contextlib.contextmanager
    def scope(self, where: str | None) -> Iterator[None]:
        """New storages go to ``where`` ("host" or "device") whatever their inputs."""
        previous, self._scope = self._scope, where
        try:
            yield
        finally:
            self._scope = previous

    def track(self, tensor: Any, tag: int) -> None:
        import torch

        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            return
        # a shape only (DeepSpeed's ``zeros_like(p, device="meta")``); ``is_meta`` of a fake
        # tensor is the same answer at 15 times the cost (2 us, asked of every new tensor)
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._handles:
            return
        self._watch(storage, key, tag)
        if self._scope is not None:
            host = self._scope == "host"
        elif self.split_devices:  # the device decides (a host-to-device copy is the GPU's)
            host = tensor.device.index is None
        else:
            host = self._inputs_on_host
        if host:
            self._host.add(key)
            return
        nbytes = int(storage.nbytes())
        if self._whole_model_bytes is not None:
            nbytes, self._whole_model_bytes = self._whole_model_bytes, None
        if nbytes:
            self._live[key] = (self._alloc(nbytes, tag), nbytes)

    def resized(self, storage: Any, nbytes: int) -> None:
        """``storage.resize_(nbytes)`` ran: 0 frees its block, from 0 allocates one."""
        key = storage._cdata
        if key in self._host or self.stopped:
            return
        self.label = "resize"
        if key not in self._handles:
            self._watch(storage, key, self.layer)
        old = self._live.pop(key, None)
        if nbytes:
            self._live[key] = (self._alloc(nbytes, self.layer), nbytes)
        if old is not None:
            self._free(old[0], old[1], self.layer)

    def sync(self, upto: int | None = None) -> None:
        """The host waits until the GPU has done the work issued before event ``upto``
        (default: everything so far): FSDP's rate limiter, a stream synchronize."""
        now = len(self.events)
        self.sync_points.append((now, now if upto is None else upto))

    def record_stream(self, tensor: Any, stream: Any) -> None:
        """``tensor.record_stream(stream)``: its block, if of another stream, is reused only
        once that stream's work issued so far is done (the caching allocator's events)."""
        self.used_on(tensor, getattr(stream, "index", DEFAULT_STREAM))

    def used_on(self, tensor: Any, stream: int) -> None:
        """``record_stream`` onto the stream of index ``stream``."""
        handle, _ = self._live.get(self._key(tensor), (0, 0))
        if handle and self._made_on.get(handle, DEFAULT_STREAM) != stream:
            self.cross_stream.add(handle)

    def _gathered_bytes(self, tensors: Any) -> int | None:
        """Bytes of a ``stack`` / ``cat`` of tensors from three or more decoder layers, run
        outside any layer (the gradient norms FSDP's and torch's clipping stack), as the
        model simulated makes it: each input as many times as its layer stands for."""
        import torch

        if self.layer >= 0 or not self.layer_repeats or not isinstance(tensors, (list, tuple)):
            return None
        layers = [self._tag_of(t) for t in tensors]
        if len(set(layers) - {-1}) < 3 or not all(isinstance(t, torch.Tensor) for t in tensors):
            return None
        return sum(
            t.numel() * t.element_size() * self.layer_repeats.get(layer, 1)
            for t, layer in zip(tensors, layers, strict=True)
        )

    def dispatch(self, func: Any, args: Any, kwargs: Any) -> Any:
        if self.stopped:
            return func(*args, **kwargs)
        self.label = func.overloadpacket.__name__
        if self.in_backward and self.label == "add":
            stream = self.node_streams.accumulation_stream(args)
            if stream is not None:  # the engine accumulating gradients on their consumer's stream
                previous, self.stream = self.stream, stream
                try:
                    out = self._dispatch(func, args, kwargs)
                finally:
                    self.stream = previous
                self.node_streams.bind(out, stream)
                return out
        if self.label in ("stack", "cat") and args:
            self._whole_model_bytes = self._gathered_bytes(args[0])
            try:
                return self._dispatch(func, args, kwargs)
            finally:
                self._whole_model_bytes = None
        return self._dispatch(func, args, kwargs)

    def _dispatch(self, func: Any, args: Any, kwargs: Any) -> Any:
        if self._host and self._scope is None:
            import torch

            keys = [
                t.untyped_storage()._cdata
                for t in self._leaves((args, kwargs))
                if isinstance(t, torch.Tensor) and t.layout == torch.strided
            ]
            self._inputs_on_host = bool(keys) and all(k in self._host for k in keys)
            try:
                return super().dispatch(func, args, kwargs)
            finally:
                self._inputs_on_host = False
        return super().dispatch(func, args, kwargs)


# -- the device handle FSDP1 gets -------------------------------------------------------------
class FakeEvent:
    """``torch.cuda.Event``: recorded and waited for at once; a host wait is a sync point."""

    def __init__(self, recorder: WorldRecorder) -> None:
        self._recorder = recorder
        self._at = len(recorder.events)

    def record(self, stream: Any = None) -> None:
        self._at = len(self._recorder.events)

    def synchronize(self) -> None:
        self._recorder.sync(self._at)

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True


class FakeStream:
    """``torch.cuda.Stream``: an index the recorder tags allocations with."""

    def __init__(self, recorder: WorldRecorder, index: int) -> None:
        self._recorder, self.index = recorder, index

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> FakeEvent:
        return event or FakeEvent(self._recorder)

    def synchronize(self) -> None:
        self._recorder.sync()

    def query(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"FakeStream({self.index})"


class FakeDeviceHandle:
    """What FSDP1 calls through ``state._device_handle`` (``torch.cuda`` on a GPU)."""

    def __init__(self, recorder: WorldRecorder) -> None:
        self._recorder = recorder
        self._streams = [FakeStream(recorder, DEFAULT_STREAM)]

    def is_available(self) -> bool:
        return True

    def current_device(self) -> Any:
        import torch

        return torch.device("cpu")  # the fake device (FSDP's device_id)

    def device_count(self) -> int:
        return 1

    def set_device(self, device: Any) -> None:
        pass

    def current_stream(self, device: Any = None) -> FakeStream:
        return self._streams[self._recorder.stream]

    def default_stream(self, device: Any = None) -> FakeStream:
        return self._streams[DEFAULT_STREAM]

    def Stream(self, *args: Any, **kwargs: Any) -> FakeStream:  # noqa: N802 - torch.cuda's name
        stream = FakeStream(self._recorder, len(self._streams))
        self._streams.append(stream)
        return stream

    def Event(self, *args: Any, **kwargs: Any) -> FakeEvent:  # noqa: N802
        return FakeEvent(self._recorder)

    @contextlib.contextmanager
    def stream(self, stream: FakeStream | None) -> Iterator[None]:
        if stream is None:
            yield
            return
        previous, self._recorder.stream = self._recorder.stream, stream.index
        try:
            with self._recorder.node_streams.made_under(stream.index):
                yield
        finally:
            self._recorder.stream = previous

    def synchronize(self, device: Any = None) -> None:
        self._recorder.sync()
