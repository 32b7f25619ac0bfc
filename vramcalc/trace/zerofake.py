"""Run DeepSpeed's own ZeRO (``DeepSpeedEngine``, ZeRO-1/2/3) on CPU fake tensors as it runs
on a GPU.

On a machine without CUDA, DeepSpeed picks its ``CPU_Accelerator``, which says it is a
*synchronized* device: ZeRO then skips its side streams (ZeRO-1/2's ``reduction_stream``,
ZeRO-3's all-gather and reduce-and-partition streams), its ``record_stream`` calls and the
host waits that go with them. ``zero_on_fake_device`` puts in ``FakeCudaAccelerator`` for
the duration of a trace (``deepspeed.accelerator``'s global accelerator, restored after):
the CPU accelerator (device name ``cpu``: tensors stay CPU fake tensors) with the answers of
DeepSpeed's ``CUDA_Accelerator`` where they differ and matter to memory:

* not a synchronized device (``is_synchronized_device``, ``resolves_data_dependency``,
  ``handles_memory_backpressure``);
* streams and events: the recorder's (``FakeDeviceHandle``), so that allocations carry the
  stream they were made on and ``synchronize`` / ``event.synchronize`` are host waits;
* ``empty_cache``: the caching allocator's, an event of the trace (DeepSpeed calls it while
  it builds its flat buffers);
* ``available_memory``: enough (ZeRO-1/2 flatten on the GPU when the flat buffer fits);
* pinned memory is host memory (``pin_memory``, ``is_pinned``, ``on_accelerator``);
* under ZeRO-Offload (``WorldRecorder.split_devices``) the GPU's names: ``device_name`` /
  ``current_device_name`` / ``device`` answer ``cpu:0`` (CUDA's ``cuda:i``) and
  ``current_device`` 0, so that what DeepSpeed makes "on the accelerator" is on ``cpu:0``
  and its explicit ``"cpu"`` (offloaded partitions) is the host; elsewhere the CPU
  accelerator's ``cpu``, every tensor on one device;
* no shared-memory collectives of CPU processes (``ShareMemCommBuilder``: none).

Beside the accelerator, where a CPU fake-tensor run differs from the CUDA one:

* ``Tensor.record_stream`` (refused by CPU tensors) tells the recorder;
* fake storages get data pointers unique to them (``fsdpfake.storage_pointer``);
* ``.item()`` / ``bool()`` / ``float()`` / ``int()`` of a fake tensor (ZeRO's overflow
  check, the gradient norm): a device-to-host copy, so a host wait; the values read are no
  overflow and norms of 0 (which no allocation depends on);
* ``Module.to(device)`` of the engine's model, whose weights are on the device already: a
  no-op, as on the GPU (``Module._apply`` would swap fake parameters);
* ZeRO-3's checks that all ranks hold the same ids (``assert_ints_same_as_other_ranks``, a
  broadcast of values): no-ops;
* the launcher's environment of rank 0 (``LOCAL_RANK``, ...), DeepSpeed's communication
  backend on torch's fake group (``deepspeed.comm.init_distributed``, as accelerate sets it
  up before loading), and DeepSpeed's process-group globals made fresh for each trace.

Sources: DeepSpeed 0.19.8 ``accelerator/cuda_accelerator.py``, ``cpu_accelerator.py``,
``accelerator/real_accelerator.py``, ``comm/torch.py``, ``runtime/zero/stage_1_and_2.py``,
``stage3.py``, ``partition_parameters.py``, ``partitioned_param_coordinator.py``, ``utils.py``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from vramcalc.trace.fsdpfake import patch_all, storage_pointer, tensor_pointer
from vramcalc.trace.worldrecorder import FakeDeviceHandle, FakeEvent, WorldRecorder


def has_deepspeed() -> bool:
    """Whether deepspeed is importable (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def import_deepspeed() -> Any:
    """``import deepspeed``, quietly: on a machine without a GPU its accelerator detection
    warns on stdout at import (which would land in ``--json`` output); the accelerator is
    left undetected (``get_accelerator`` detects it when asked)."""
    import sys

    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    import unittest.mock  # 20 ms: not on a warm plan's path (this module is imported by it)

    with unittest.mock.patch.dict(os.environ, {"DS_ACCELERATOR": "cpu"}):
        import deepspeed
        import deepspeed.accelerator.real_accelerator as real_accelerator

    real_accelerator.ds_accelerator = None
    return deepspeed


class LaggingEvent(FakeEvent):
    """A ``torch.cuda.Event`` of a GPU behind the host: ``query()`` says not done yet (a
    host wait, ``synchronize``, is what tells it done). ZeRO-3's parameter coordinator
    drops the fetch events that ``query()`` done and synchronizes on the oldest once more
    than two are pending (``partitioned_param_coordinator.py`` 400-411): its host waits,
    which bound how far the GPU can lag."""

    def query(self) -> bool:
        return False


def fake_cuda_accelerator(recorder: WorldRecorder, handle: FakeDeviceHandle) -> Any:
    """A ``DeepSpeedAccelerator``: the CPU one, answering as CUDA's where memory differs."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    class FakeCudaAccelerator(CPU_Accelerator):  # type: ignore[misc]
        def is_synchronized_device(self) -> bool:
            return False

        def use_host_timers(self) -> bool:
            return False

        def resolves_data_dependency(self) -> bool:
            return False

        def handles_memory_backpressure(self) -> bool:
            return False

        # -- streams and events: the recorder's ---------------------------------------------
        def Stream(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 - DeepSpeed's name
            return handle.Stream()

        def stream(self, stream: Any) -> Any:
            return handle.stream(stream)

        def current_stream(self, device_index: Any = None) -> Any:
            return handle.current_stream()

        def default_stream(self, device_index: Any = None) -> Any:
            return handle.default_stream()

        def Event(self, **kwargs: Any) -> Any:  # noqa: N802
            return LaggingEvent(recorder)

        def synchronize(self, device_index: Any = None) -> None:
            recorder.sync()

        def empty_cache(self) -> None:
            recorder.empty_cache()

        # -- memory statistics: none (the recorder is the memory) ---------------------------
        def available_memory(self, device_index: Any = None) -> int:
            return 1 << 60  # ZeRO flattens on the GPU when its flat buffer fits: it does

        def memory_allocated(self, device_index: Any = None) -> int:
            return 0

        max_memory_allocated = memory_reserved = max_memory_reserved = memory_allocated
        memory_cached = max_memory_cached = memory_allocated

        def reset_peak_memory_stats(self, device_index: Any = None) -> None:
            pass

        reset_max_memory_allocated = reset_max_memory_cached = reset_peak_memory_stats

        def create_op_builder(self, class_name: str) -> Any:
            # no shared-memory collectives of CPU processes (the world is the fake group's)
            if class_name == "ShareMemCommBuilder":
                return None
            return super().create_op_builder(class_name)

        # -- the fake GPU: ``cpu:0`` where the trace tells host from device by device
        # (``WorldRecorder.split_devices``, ZeRO-Offload), as CUDA's names are ``cuda:i``;
        # DeepSpeed's explicit ``"cpu"`` (offloaded partitions, pinned buffers) is the host
        def device_name(self, device_index: Any = None) -> str:
            if not recorder.split_devices:
                return str(super().device_name(device_index))
            return f"cpu:{0 if device_index is None else device_index}"

        def current_device_name(self) -> str:
            return self.device_name(0) if recorder.split_devices else "cpu"

        def device(self, device_index: Any = None) -> Any:
            import torch

            if not recorder.split_devices:
                return super().device(device_index)
            return torch.device(self.device_name(device_index))

        def current_device(self) -> Any:
            return 0 if recorder.split_devices else super().current_device()

        def is_bf16_supported(self) -> bool:
            return True

        def is_fp16_supported(self) -> bool:
            return True

        # -- pinned memory is host memory -----------------------------------------------------
        def pin_memory(self, tensor: Any, align_bytes: int = 1) -> Any:
            with recorder.scope("host"):
                pinned = tensor.detach().clone()
            recorder.on_host([pinned])
            return pinned

        def is_pinned(self, tensor: Any) -> bool:
            return recorder.is_host(tensor)

        def on_accelerator(self, tensor: Any) -> bool:
            return not recorder.is_host(tensor)

    return FakeCudaAccelerator()


@contextlib.contextmanager
def zero_on_fake_device(recorder: WorldRecorder, world_size: int) -> Iterator[Any]:
    """DeepSpeed's accelerator and torch patched for a fake-device trace (module docstring);
    yields the accelerator."""
    import logging

    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    import_deepspeed()
    import deepspeed.accelerator.real_accelerator as real_accelerator

    handle = FakeDeviceHandle(recorder)
    accelerator = fake_cuda_accelerator(recorder, handle)

    def record_stream(tensor: Any, stream: Any) -> None:
        recorder.record_stream(tensor, stream)

    def item(tensor: Any) -> Any:
        # a D2H copy: the host waits for the GPU; the values are no overflow, norms of 0
        recorder.sync()
        if tensor.dtype == torch.bool:
            return False
        return 0.0 if tensor.is_floating_point() else 0

    module_to = torch.nn.Module.to

    def to(module: Any, *args: Any, **kwargs: Any) -> Any:
        # ``engine.module.to(device)`` with the weights already on the GPU: a no-op there
        # (``Module._apply`` would swap fake tensors, and refuses the recorder's weakrefs)
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is None and memory_format is None and device is not None and device.type == "cpu":
            return module
        return module_to(module, *args, **kwargs)

    import unittest.mock

    previous = real_accelerator.ds_accelerator
    real_accelerator.ds_accelerator = accelerator
    fresh = _fresh_deepspeed_groups()
    # what a launcher sets for rank 0 (DeepSpeedEngine asserts LOCAL_RANK)
    world = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": str(world_size)}
    world["LOCAL_WORLD_SIZE"] = world["WORLD_SIZE"]
    logger = logging.getLogger("DeepSpeed")  # its INFO lines go to stdout
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(unittest.mock.patch.dict(os.environ, world))
            patches = (
                (torch.UntypedStorage, "data_ptr", storage_pointer),
                (FakeTensor, "data_ptr", tensor_pointer),
                (torch.Tensor, "record_stream", record_stream),
                (torch.nn.Module, "to", to),
                (FakeTensor, "item", item),
                (FakeTensor, "__bool__", lambda tensor: bool(item(tensor))),
                (FakeTensor, "__float__", lambda tensor: float(item(tensor))),
                (FakeTensor, "__int__", lambda tensor: int(item(tensor))),
            )
            patch_all(stack, patches)
            patch_all(stack, _rank_checks())
            # DeepSpeed's communication backend on torch's (fake) group, as accelerate sets it
            # up before the model is loaded (ZeRO-3's zero.Init reads the world size)
            import deepspeed.comm

            deepspeed.comm.init_distributed(auto_mpi_discovery=False, verbose=False)
            yield accelerator
    finally:
        real_accelerator.ds_accelerator = previous
        fresh()
        logger.setLevel(level)


def _rank_checks() -> list[tuple[Any, str, Any]]:
    """ZeRO-3's checks that every rank holds the same ids (``assert_ints_same_as_other_ranks``:
    a broadcast of values, which fake tensors do not have), as no-ops, where they are bound."""
    import deepspeed.runtime.zero.partition_parameters as partition_parameters
    import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator
    import deepspeed.runtime.zero.stage3 as stage3
    import deepspeed.runtime.zero.utils as zero_utils

    modules = (zero_utils, partition_parameters, coordinator, stage3)
    return [
        (module, "assert_ints_same_as_other_ranks", lambda ints: None)
        for module in modules
        if hasattr(module, "assert_ints_same_as_other_ranks")
    ]


def _fresh_deepspeed_groups() -> Any:
    """Forget DeepSpeed's process groups and communication backend (module globals made for
    the world of an earlier trace, whose fake group is gone); returns what puts them back."""
    import deepspeed.comm.comm as comm
    import deepspeed.utils.groups as groups

    saved = {(comm, "cdb"): comm.cdb}
    for name, value in vars(groups).items():
        if (name.startswith("_") and name.isupper() and isinstance(value, dict | None)) or name in (
            "mpu",
            "mesh_device",
        ):
            saved[(groups, name)] = value
    for (module, name), value in saved.items():
        setattr(module, name, {} if isinstance(value, dict) else None)

    def restore() -> None:
        for (module, name), value in saved.items():
            setattr(module, name, value)

    return restore
