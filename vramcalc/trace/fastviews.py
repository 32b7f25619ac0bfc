"""View ops and indexing of fake tensors, with FakeTensorMode's own answers in less CPU time.

A trace runs every op through ``FakeTensorMode``, which answers a view op (``detach``,
``view``, ``slice``, ``transpose`` ...) by building a cache key from every argument's
metadata and making the output from the cache entry: about 60-70 us an op on a 2-core machine
(torch 2.13). A view makes no storage, and a trace dispatches tens of thousands of them: a
ZeRO-3 step's ``param.data`` (a ``detach``) on every gather and release, the linears'
``t`` and ``view``. ``make_call(torch)`` gives ``call(func, args, kwargs)``: for the view ops
of ``VIEWS``, on one fake tensor of a mode with no shape environment, no constant and no real
tensor behind it, it does what ``FakeTensorMode._dispatch_impl`` ends with for an op with a
meta kernel: the meta kernel under ``in_kernel_invocation_manager``, its outputs wrapped as
fake tensors on the input's device (``FakeTensorConverter.from_meta_and_device``). The output
shares the input's storage, with the shape, strides and offset the op gives, as every other
path of FakeTensorMode's gives it (the special implementations of ``view``, ``slice`` and
``select`` in ``fake_impls.py`` differ only for symbolic sizes): 20-25 us.

Indexing with a list (peft's mixed-batch forward of a served model: ``x[indices]`` and
``result[indices] += out`` for each adapter's sub-batch, in every targeted linear) lifts the
list into an index tensor; FakeTensorMode keeps the value of a one-element one (a constant)
and answers any op given a constant without its cache, through ``meta_index_Tensor`` run op by
op: about 750 us for ``x[[i]]`` against 80 us cached. What an integer index selects does not
change the output's shape, strides or device (a boolean mask's does: its values are kept), so
``index`` and ``index_put(_)`` are given a fake twin of such an index without the value
(``torch.empty_strided``, same shape and strides) and take the cached path. The README's first
serving example: 26.6 to 19.6 CPU-s, the same answer.

New empty tensors (``empty``, ``empty_strided``, ``new_empty``: a ZeRO-3 step's gather
buffers and releases, about 5,000 a Llama-3.2-1B trace) are made as FakeTensor's own
``constructors`` makes them (``fake_impls.py``): the op on the meta device in the mode's
kernel invocation, wrapped on the device asked for (``new_empty``: its tensor's, in its
dtype), 20 us instead of 40-60 us.

Every other call, and every call where torch lacks the pieces used here, is
``func(*args, **kwargs)``, as before. ``tests/trace/test_fastviews.py`` checks the outputs'
metadata and storage against FakeTensorMode's for each op, and that step, world and serving
traces are the same event for event with and without this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: aten view ops (one tensor in, views of it out) answered by their meta kernel
VIEWS = (
    "detach.default",
    "alias.default",
    "view.default",
    "view.dtype",
    "_unsafe_view.default",
    "_reshape_alias.default",
    "slice.Tensor",
    "select.int",
    "t.default",
    "transpose.int",
    "permute.default",
    "expand.default",
    "unsqueeze.default",
    "squeeze.default",
    "squeeze.dim",
    "squeeze.dims",
    "as_strided.default",
    "diagonal.default",
    "split.Tensor",
    "split_with_sizes.default",
    "unbind.int",
)

#: set to False to run every op through FakeTensorMode (the tests compare both)
ENABLED = [True]
#: how many ops the meta kernel answered here, in this process
ANSWERED = [0]


def make_call(torch: Any) -> Callable[[Any, Any, Any], Any]:
    """``call(func, args, kwargs)``: ``func(*args, **kwargs)``, view ops and indexing as the
    module says."""
    try:
        from torch._subclasses.fake_tensor import FakeTensor

        disable = torch._C._DisableTorchDispatch
        preserve = torch._C._PreserveDispatchKeyGuard
        meta_in_tls = torch._C._set_meta_in_tls_dispatch_include
        fake_key, current = torch._C._TorchDispatchModeKey.FAKE, torch._C._get_dispatch_mode
    except (ImportError, AttributeError):  # another torch: every op as FakeTensorMode does it
        return lambda func, args, kwargs: func(*args, **kwargs)
    aten = torch.ops.aten
    views = set()
    for name in VIEWS:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload, None)
        if op is not None:
            views.add(op)
    strided = torch.strided
    tensor = torch.Tensor
    enabled, answered = ENABLED, ANSWERED
    indexing = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default}
    integral = (torch.int64, torch.int32)

    def unlifted(index: Any) -> Any:
        """An integer index FakeTensorMode lifted from a list with its value kept (one
        element): a fake tensor of the same shape without it, else ``index`` itself."""
        if type(index) is not FakeTensor or index.constant is None or index.dtype not in integral:
            return index
        answered[0] += 1
        return torch.empty_strided(
            index.shape, index.stride(), dtype=index.dtype, device=index.device
        )

    empties = {aten.empty.memory_format, aten.empty_strided.default}
    new_empty = aten.new_empty.default
    empty = aten.empty.memory_format
    meta, cpu = torch.device("meta"), torch.device("cpu")
    plain: tuple[type, ...] = (int, float, bool, str, type(None), torch.dtype, torch.device)
    plain += (torch.layout, torch.memory_format)
    sizes = (list, tuple, torch.Size)

    def answerable(mode: Any) -> bool:
        """A mode whose answers are the meta kernel's: no shape environment, no real tensors
        behind its fakes, not inside a kernel already."""
        return (
            mode is not None
            and mode.shape_env is None
            and not getattr(mode, "propagate_real_tensors", False)
            and not mode.in_kernel_invocation
        )

    def in_kernel(mode: Any, func: Any, args: Any, kwargs: Any) -> Any:
        """``func`` under ``in_kernel_invocation_manager`` (fake_tensor.py), inline: the op
        sees meta tensors."""
        with disable():
            mode.in_kernel_invocation = True
            with preserve():
                meta_in_tls(True)
                try:
                    out = func(*args, **kwargs)
                finally:
                    mode.in_kernel_invocation = False
        answered[0] += 1
        return out

    def made(mode: Any, func: Any, args: Any, kwargs: Any, device: Any) -> Any:
        """FakeTensor's ``constructors`` (fake_impls.py): the op on the meta device in the
        mode's kernel invocation, wrapped as a fake tensor on ``device``."""
        if (
            not answerable(mode)
            or not all(type(v) in plain for v in kwargs.values())
            or not all(type(a) in sizes and all(type(d) is int for d in a) for a in args)
        ):
            return None
        return FakeTensor(mode, in_kernel(mode, func, args, {**kwargs, "device": meta}), device)

    def call(func: Any, args: Any, kwargs: Any) -> Any:
        if not enabled[0]:
            return func(*args, **kwargs)
        if func in indexing and len(args) > 1 and type(args[1]) in (list, tuple):
            indices = [unlifted(i) for i in args[1]]
            return func(args[0], indices, *args[2:], **kwargs)
        if func in empties:
            device = kwargs.get("device") or cpu
            out = made(current(fake_key), func, args, kwargs, device)
            return func(*args, **kwargs) if out is None else out
        if func is new_empty and type(args[0]) is FakeTensor:
            source, rest = args[0], {k: v for k, v in kwargs.items() if v is not None}
            rest.setdefault("dtype", source.dtype)
            device = rest.pop("device", None) or source.fake_device
            out = made(source.fake_mode, empty, args[1:], rest, device)
            return func(*args, **kwargs) if out is None else out
        if func not in views or kwargs:
            return func(*args, **kwargs)
        source = args[0]
        if type(source) is not FakeTensor or source.layout is not strided:
            return func(*args, **kwargs)
        mode = source.fake_mode
        if (
            source.constant is not None
            or not answerable(mode)
            or any(isinstance(a, tensor) for a in args[1:])
        ):
            return func(*args, **kwargs)
        out = in_kernel(mode, func, args, {})
        converter, device = mode.fake_tensor_converter, source.fake_device
        if isinstance(out, tensor):
            return converter.from_meta_and_device(mode, out, device)
        return type(out)(converter.from_meta_and_device(mode, t, device) for t in out)

    return call
