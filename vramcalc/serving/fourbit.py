"""bitsandbytes 0.50.2's 4-bit weights on fake tensors, allocation for allocation.

``gpu_paths.Serve4bitLinear`` stands for a ``bitsandbytes.nn.Linear4bit`` as
``from_pretrained`` leaves it (``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_compute_dtype=--dtype)``): a packed uint8 weight that carries what peft 0.21 reads of
a ``Params4bit`` (``quant_type``, ``compress_statistics``, ``blocksize``, ``quant_state``). Its
data and quantization state were allocated while loading
(``memory/loading.from_pretrained_events``, in the order ``quantize_4bit`` allocates them), so
a loaded weight's ``QuantState`` here holds sizes, not tensors; the weight's death frees them
all (``servereplay``).

peft's own code runs on it. The bitsandbytes pieces peft calls that cannot run on fake
tensors (a ``Params4bit`` is made by ``torch.Tensor._make_subclass``; ``quantize_4bit``
builds its dynamic map on the host) run as these stand-ins, while ``four_bit_paths`` is
entered:

* ``dequantized`` for ``dequantize_bnb_weight`` and ``dequantize_module_weight``
  (``functional.dequantize_4bit``): with double quantization the absmax back in fp32
  (``dequantize_blockwise``: a new fp32 tensor, ``+= offset`` in place), then the weight in
  the state's dtype; the absmax freed;
* ``quantized`` for ``bnb.nn.Params4bit(w.to("cpu"), **kwargs).to(device)``, peft's
  ``Linear4bit.merge`` (``Params4bit._quantize``, ``functional.quantize_4bit``): the host
  copy back on the device; the CUDA ``quantize_4bit`` op's fp32 absmax, then the packed
  weight; ``get_4bit_type``'s 16-entry code, made on the device and divided by its
  ``abs().max()``; with double quantization ``offset = absmax.mean()`` and
  ``quantize_blockwise(absmax - offset, blocksize=256)``: the difference, the op's fp32
  absmax, then its uint8 output, and a copy of the dynamic map (the map itself was made by
  the process's first quantization, while loading); then the difference, the fp32 absmax
  and the device copy freed;
* ``copied`` for ``copy.deepcopy`` of the layer, which DoRA's ``DoraLinearLayer.update_layer``
  does to a layer named ``Linear4bit`` before dequantizing it: ``Params4bit.__deepcopy__``
  deep-copies the state (without the memo), then the packed data; then the bias; then the
  module's own ``quant_state`` attribute, the same state: a second copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from vramcalc.memory.weights import (
    DYNAMIC_MAP_ENTRIES,
    FOUR_BIT_CODE_ENTRIES,
    NESTED_BLOCKSIZE,
    NF4_BLOCKSIZE,
)

FOUR_BIT_QUANTS = ("nf4", "fp4")


@dataclass
class QuantState:
    """A 4-bit weight's ``bitsandbytes.functional.QuantState``: what it says of the weight,
    and its device tensors when they were made on fake tensors (a merge's); a loaded
    weight's were laid out while loading."""

    shape: tuple[int, int]  # (out, in)
    dtype: torch.dtype  # of the weight it was quantized from
    quant_type: str
    nested: bool  # double quantization (compress_statistics)
    blocksize: int = NF4_BLOCKSIZE
    tensors: tuple[Any, ...] = ()

    @property
    def blocks(self) -> int:
        return -(-self.shape[0] * self.shape[1] // self.blocksize)


def mark(weight: Any, state: QuantState, module: Any) -> None:
    """Give ``weight`` what ``Params4bit`` keeps on itself (quantized, with ``state``)."""
    weight.__dict__.update(
        _vramcalc_kbit=True,
        quant_state=state,
        quant_type=state.quant_type,
        compress_statistics=state.nested,
        blocksize=state.blocksize,
        quant_storage=torch.uint8,
        bnb_quantized=True,
        module=module,
    )


def _state_copy(like: Any, state: QuantState) -> tuple[Any, ...]:
    """``copy.deepcopy`` of a ``QuantState`` on the device: its tensors in attribute order
    (``absmax``, ``code``, ``offset``, ``state2.absmax``, ``state2.code``)."""
    if not state.nested:
        return (
            like.new_empty((state.blocks,), dtype=torch.float32),
            like.new_empty((FOUR_BIT_CODE_ENTRIES,), dtype=torch.float32),
        )
    return (
        like.new_empty((state.blocks,), dtype=torch.uint8),
        like.new_empty((FOUR_BIT_CODE_ENTRIES,), dtype=torch.float32),
        like.new_empty((), dtype=torch.float32),
        like.new_empty((-(-state.blocks // NESTED_BLOCKSIZE),), dtype=torch.float32),
        like.new_empty((DYNAMIC_MAP_ENTRIES,), dtype=torch.float32),
    )


def dequantized(weight: Any) -> Any:
    """``functional.dequantize_4bit(weight.data, weight.quant_state)`` (module docstring)."""
    state = weight.quant_state
    absmax = weight.new_empty((state.blocks,), dtype=torch.float32) if state.nested else None
    out = weight.new_empty(state.shape, dtype=state.dtype)
    del absmax
    return out


def quantized(data: Any, blocksize: int, nested: bool, quant_type: str, module: Any) -> Any:
    """``Params4bit(data, ...).to(device)`` for ``data`` on the host (module docstring): the
    packed weight as a parameter with its new state."""
    w = data.contiguous().clone()  # self.data.contiguous().to(device)
    n = w.numel()
    blocks = -(-n // blocksize)
    absmax = w.new_empty((blocks,), dtype=torch.float32)
    packed = w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    code = w.new_empty((FOUR_BIT_CODE_ENTRIES,), dtype=torch.float32)
    code.div_(code.abs().max())  # get_4bit_type
    if nested:
        offset = absmax.mean()
        centred = absmax - offset
        nested_absmax = centred.new_empty((-(-blocks // NESTED_BLOCKSIZE),))
        quantized_absmax = torch.empty_like(centred, dtype=torch.uint8)
        nested_code = centred.new_empty((DYNAMIC_MAP_ENTRIES,))  # code.to(device, copy=True)
        del centred, absmax
        tensors: tuple[Any, ...] = (quantized_absmax, code, offset, nested_absmax, nested_code)
    else:
        tensors = (absmax, code)
    shape = (int(w.shape[0]), int(w.shape[1]))
    state = QuantState(shape, w.dtype, quant_type, nested, blocksize, tensors)
    del w
    weight = torch.nn.Parameter(packed, requires_grad=False)
    mark(weight, state, module)
    if module is not None:
        module.quant_state = state
    return weight


def copied(module: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy`` of a ``Serve4bitLinear`` (module docstring)."""
    new = type(module).__new__(type(module))
    memo[id(module)] = new
    new.__dict__.update(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        new.__dict__[key] = dict(module.__dict__[key])
    weight = module.weight
    state = weight.quant_state
    first = QuantState(
        state.shape, state.dtype, state.quant_type, state.nested, state.blocksize,
        _state_copy(weight, state),
    )  # fmt: skip
    copy = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
    mark(copy, first, module)  # Params4bit.__setstate__ keeps the original module
    new._parameters["weight"] = copy
    if module.bias is not None:
        new._parameters["bias"] = torch.nn.Parameter(
            module.bias.detach().clone(), requires_grad=module.bias.requires_grad
        )
    new.quant_state = QuantState(
        state.shape, state.dtype, state.quant_type, state.nested, state.blocksize,
        _state_copy(weight, state),
    )  # fmt: skip
    return new


class _Params4bit:
    """``bnb.nn.Params4bit(data, **kwargs)`` as peft's merge makes it: quantized by ``.to``."""

    def __init__(
        self,
        data: Any = None,
        requires_grad: bool = False,
        quant_state: Any = None,
        blocksize: int | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: Any = torch.uint8,
        module: Any = None,
        bnb_quantized: bool = False,
        **kwargs: Any,
    ) -> None:
        self.data, self.module = data, module
        self.blocksize = blocksize or NF4_BLOCKSIZE
        self.nested, self.quant_type = compress_statistics, quant_type

    def to(self, *args: Any, **kwargs: Any) -> Any:
        return quantized(self.data, self.blocksize, self.nested, self.quant_type, self.module)


def _is_ours(weight: Any) -> bool:
    return isinstance(getattr(weight, "quant_state", None), QuantState)


@contextlib.contextmanager
def four_bit_paths() -> Iterator[None]:
    """peft's calls into bitsandbytes on a 4-bit stand-in weight answered as on the GPU
    (module docstring); any other weight goes to the originals."""
    with peft_bnb_paths("Params4bit", _Params4bit, _is_ours, dequantized):
        yield


@contextlib.contextmanager
def peft_bnb_paths(params_name: str, params: type, is_ours: Any, dequantize: Any) -> Iterator[None]:
    """While entered, ``bitsandbytes.nn.<params_name>`` is ``params``, and peft's
    ``dequantize_bnb_weight`` / ``dequantize_module_weight`` (where each module of peft 0.21
    that calls them looks them up) answer ``dequantize(weight)`` for a weight ``is_ours``
    accepts; any other weight goes to the originals."""
    import bitsandbytes.nn
    import peft.tuners.lora.bnb as lora_bnb
    import peft.tuners.lora.dora as dora
    import peft.tuners.lora.layer as layer
    import peft.tuners.lora.variants as variants
    import peft.utils.integrations as integrations

    bnb_weight, module_weight = (
        integrations.dequantize_bnb_weight,
        integrations.dequantize_module_weight,
    )

    def dequantize_bnb_weight(weight, state=None):  # type: ignore[no-untyped-def]
        return dequantize(weight) if is_ours(weight) else bnb_weight(weight, state=state)

    def dequantize_module_weight(module):  # type: ignore[no-untyped-def]
        weight = getattr(module, "weight", None)
        return dequantize(weight) if is_ours(weight) else module_weight(module)

    saved = [
        (bitsandbytes.nn, params_name, params),
        (lora_bnb, "dequantize_bnb_weight", dequantize_bnb_weight),
        (integrations, "dequantize_bnb_weight", dequantize_bnb_weight),
        *((m, "dequantize_module_weight", dequantize_module_weight)
          for m in (integrations, dora, layer, variants)),
    ]  # fmt: skip
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in saved]
    for owner, name, replacement in saved:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)
