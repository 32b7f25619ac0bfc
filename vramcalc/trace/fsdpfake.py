"""Run torch's own FSDP1 (``FullyShardedDataParallel``) on CPU fake tensors as it runs on a GPU.

FSDP1 refuses a CPU module only in two checks, and otherwise runs its real code
(flat parameters, sharding, the all-gather / reduce-scatter buffers, prefetch,
resharding, gradient accumulation, CPU offload) on any device it gets a handle
for. ``fsdp1_on_fake_device`` patches, for the duration of a trace, exactly the
places where a CPU run would do something else than the CUDA run:

* the device handle (``_FSDPDeviceHandle.from_device``): ``FakeDeviceHandle``,
  whose streams tag allocations (``memory/worldrecorder.py``);
* ``_check_module_states_for_sync_module_states`` (refuses CPU states with
  ``sync_module_states``; the real run has them on the GPU by then);
* ``_move_states_to_device``: on a GPU, a CPU-loaded unit is copied to the device
  (``param.data = param.to(device)``); on CPU that is a no-op, so host storages
  get a device copy instead;
* storage resizes (``UntypedStorage.resize_``): FSDP's allocation / free of the
  unsharded flat parameter, told to the recorder;
* ``_no_dispatch_record_stream`` (a no-op off CUDA): told to the recorder, which
  marks blocks used on a stream other than their own;
* ``data_ptr`` of fake storages (0 for all of them): FSDP compares data pointers
  to know whether a flat parameter already points at its shard
  (``_catch_all_reshard``, ``_same_storage``); a fake storage gets a pointer unique
  to it (0 once freed, as CUDA's);
* CPU offload, where FSDP1 tells host from device by ``tensor.device``: ``pin_memory``
  (host copies), ``init_flat_param_attributes`` (pinned shard and gradient on the host,
  low-precision shard and all-gather buffers on the device), the shard moved to the host
  at the handle's init
  (``_init_param_handle_from_params``, ``FlatParamHandle.flat_param_to``), the H2D
  copy of the shard in ``pre_unshard`` (a device copy here, when the recorder has the
  shard on the host) and inside ``_use_low_precision_shard``, and
  ``prepare_gradient_for_backward`` (a CPU gradient is not kept as the sharded
  gradient to accumulate into).

Sources: torch 2.13 ``torch/distributed/fsdp/_init_utils.py``, ``_flat_param.py``,
``_runtime_utils.py``, ``torch/distributed/utils.py`` (the measurements ran torch
2.11; FSDP1 is in maintenance and these functions are the same there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from vramcalc.trace.worldrecorder import FakeDeviceHandle, WorldRecorder

_POINTER_STRIDE = 1 << 40  # fake data pointers: storage key * stride + byte offset


@contextlib.contextmanager
def patched(target: Any, name: str, value: Any) -> Iterator[None]:
    original = target.__dict__[name] if isinstance(target, type) else getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, original)


def storage_pointer(storage: Any) -> int:
    """A fake storage's data pointer: unique to it, 0 once freed (as CUDA's)."""
    return storage._cdata * _POINTER_STRIDE if storage.nbytes() else 0


def tensor_pointer(tensor: Any) -> int:
    """A fake tensor's data pointer: its storage's, plus its offset in bytes."""
    storage = tensor.untyped_storage()
    if not storage.nbytes():
        return 0
    return storage_pointer(storage) + tensor.storage_offset() * tensor.element_size()


def patch_all(stack: contextlib.ExitStack, patches: Any) -> None:
    """Each ``(target, name, value)`` of ``patches`` set on ``stack``, undone when it closes
    (a name a class does not define itself is deleted again)."""
    for target, name, value in patches:
        if isinstance(target, type) and name not in target.__dict__:
            setattr(target, name, value)
            stack.callback(delattr, target, name)
        else:
            stack.enter_context(patched(target, name, value))


@contextlib.contextmanager
def fsdp1_on_fake_device(recorder: WorldRecorder) -> Iterator[FakeDeviceHandle]:
    """Patch FSDP1 and torch for a fake-device trace (module docstring); yields the handle."""
    import torch
    import torch.distributed.fsdp._flat_param as flat_param_module
    import torch.distributed.fsdp._init_utils as init_utils
    import torch.distributed.fsdp._runtime_utils as runtime_utils
    import torch.nn.parallel.distributed as ddp_module
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.distributed.fsdp._common_utils import _FSDPDeviceHandle
    from torch.distributed.fsdp._flat_param import FlatParamHandle

    handle = FakeDeviceHandle(recorder)
    resize = torch.UntypedStorage.resize_

    def resize_(storage: Any, size: int) -> Any:
        before = storage.nbytes()
        out = resize(storage, size)
        if storage.nbytes() != before:
            recorder.resized(storage, int(storage.nbytes()))
        return out

    def move_states_to_device(params: list, buffers: list, device: Any) -> None:
        with torch.no_grad(), recorder.scope("device"):
            for tensor in (*params, *buffers):
                if recorder.is_host(tensor):
                    tensor.data = tensor.detach().clone()

    def pin_memory(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        with recorder.scope("host"):
            return tensor.detach().clone()

    def flat_param_to(self: Any, *args: Any, **kwargs: Any) -> None:
        flat_param = self.flat_param
        if kwargs.get("non_blocking"):  # pre_unshard: the offloaded shard copied to the GPU
            with recorder.scope("device"):
                flat_param.data = flat_param.detach().clone()
        else:  # the handle's init: the sharded flat parameter goes to the CPU
            recorder.to_host(flat_param)
        if self._use_orig_params:
            if self.is_sharded(flat_param):
                self._use_sharded_views()
            else:
                self._use_unsharded_views(as_params=True)

    def use_low_precision_shard(self: Any) -> None:
        self._check_low_precision_shard()
        flat_param = self.flat_param
        flat_param_module._alloc_storage(flat_param._mp_shard, flat_param._local_shard.size())
        source = flat_param._local_shard
        if self._offload_params:  # ``_local_shard.to(self.device)``: an H2D copy first
            with recorder.scope("device"):
                source = source.detach().clone()
        flat_param._mp_shard.copy_(source)
        del source
        flat_param.data = flat_param._mp_shard

    def pre_unshard(self: Any) -> bool:
        # FlatParamHandle.pre_unshard with "flat_param.device != self.device" (CPU offload:
        # the shard is on the host) told by the recorder, not by the device type
        from torch.distributed.fsdp._flat_param import HandleTrainingState

        if (
            self._training_state == HandleTrainingState.SUMMON_FULL_PARAMS
            and self._skipped_use_sharded_views
        ):
            self._use_sharded_views()
        ret = False
        if self._use_orig_params and not self._skip_writeback_check:
            ret = self._writeback_orig_params()
        if self.uses_sharded_strategy and not self._offload_params and not self.needs_unshard():
            pass
        elif self._uses_param_mixed_precision and not self._force_full_precision:
            self._use_low_precision_shard()
            ret = True
        elif self._offload_params and recorder.is_host(self.flat_param):
            self.flat_param_to(self.device, non_blocking=True)
            ret = True
        return ret

    def init_flat_param_attributes(self: Any) -> None:
        # FlatParamHandle.init_flat_param_attributes with each new tensor on its side: with
        # CPU offload the pinned shard and gradient on the host, the low-precision shard and
        # the all-gather destinations on the device (all made from the CPU shard here)
        flat_param = self.flat_param
        if flat_param.dtype != self._orig_param_dtype:
            if not self._low_prec_param_dtype_specified:
                self._fwd_bwd_param_dtype = flat_param.dtype
            if (
                not self._low_prec_reduce_dtype_specified
                and not self._low_prec_param_dtype_specified
            ):
                self._reduce_dtype = flat_param.dtype
            self._orig_param_dtype = flat_param.dtype
        flat_param._local_shard = flat_param.data
        if self._offload_params:
            with recorder.scope("host"):
                flat_param._local_shard = flat_param._local_shard.detach().clone()  # pin_memory
                flat_param._cpu_grad = torch.zeros_like(flat_param._local_shard)
        with recorder.scope("device"):
            if self._uses_param_mixed_precision:
                flat_param._mp_shard = torch.empty_like(
                    flat_param._local_shard, dtype=self._fwd_bwd_param_dtype
                )
                flat_param_module._free_storage(flat_param._mp_shard)
            if self.uses_sharded_strategy:
                unsharded_dtype = (
                    self._fwd_bwd_param_dtype
                    if self._uses_param_mixed_precision
                    else flat_param.dtype
                )
                numel = flat_param.numel() * self.world_size
                flat_param._full_param_padded = torch.empty(numel, dtype=unsharded_dtype)
                flat_param._padded_unsharded_size = flat_param._full_param_padded.size()
                flat_param_module._free_storage(flat_param._full_param_padded)
                if self._uses_param_mixed_precision:
                    flat_param._full_prec_full_param_padded = torch.empty(
                        numel, dtype=flat_param.dtype
                    )
                    flat_param_module._free_storage(flat_param._full_prec_full_param_padded)

    def prepare_gradient_for_backward(self: Any) -> None:
        # FlatParamHandle.prepare_gradient_for_backward with "the gradient is on the CPU"
        # (``grad.device != flat_param.device``, ``!= self.device``) told by the recorder:
        # on a GPU the CPU gradient of an offloaded handle is not kept as ``_saved_grad_shard``
        flat_param = self.flat_param
        grad = flat_param.grad
        if grad is None:
            return
        offloaded = recorder.is_host(grad)
        if grad.size() != flat_param._unpadded_unsharded_size or offloaded != recorder.is_host(
            flat_param
        ):
            if grad.size() == flat_param._local_shard.size():  # previous iteration synced
                if not offloaded:
                    flat_param._saved_grad_shard = grad.data
                    sharded_grad = flat_param._saved_grad_shard
                else:
                    sharded_grad = flat_param._cpu_grad
                local_dtype = flat_param._local_shard.dtype
                if self._keep_low_precision_grads and sharded_grad.dtype != local_dtype:
                    sharded_grad.data = sharded_grad.to(local_dtype)
            flat_param.grad = None

    init_handle = init_utils._init_param_handle_from_params

    def init_param_handle_from_params(state: Any, params: list, module: Any) -> None:
        # ends with "if offload_params and flat_param.device != cpu: flat_param_to(cpu)"
        init_handle(state, params, module)
        if state._handle is not None and state.cpu_offload.offload_params:
            state._handle.flat_param_to(torch.device("cpu"))

    def from_device(cls: Any, device: Any) -> FakeDeviceHandle:
        return handle

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int8):
        # FlatParamHandle's itemsize lookup makes a host scalar the first time (lru_cache):
        # made here, before the recorder runs, so that no trace depends on what ran before
        flat_param_module._get_dtype_size(dtype)
    with contextlib.ExitStack() as stack:
        patch_all(
            stack,
            (
                (_FSDPDeviceHandle, "from_device", classmethod(from_device)),
                (init_utils, "_check_module_states_for_sync_module_states", lambda states: None),
                (init_utils, "_move_states_to_device", move_states_to_device),
                # DDP's check that every rank has the same shapes reads values (one small tensor)
                (ddp_module, "_verify_param_shape_across_processes", lambda group, params: None),
                (torch.UntypedStorage, "resize_", resize_),
                (torch.UntypedStorage, "data_ptr", storage_pointer),
                (FakeTensor, "data_ptr", tensor_pointer),
                (FakeTensor, "pin_memory", pin_memory),
                (FlatParamHandle, "flat_param_to", flat_param_to),
                (FlatParamHandle, "_use_low_precision_shard", use_low_precision_shard),
                (FlatParamHandle, "pre_unshard", pre_unshard),
                (FlatParamHandle, "init_flat_param_attributes", init_flat_param_attributes),
                (FlatParamHandle, "prepare_gradient_for_backward", prepare_gradient_for_backward),
                (flat_param_module, "_no_dispatch_record_stream", recorder.record_stream),
                (runtime_utils, "_no_dispatch_record_stream", recorder.record_stream),
                (init_utils, "_init_param_handle_from_params", init_param_handle_from_params),
            ),
        )
        yield handle
