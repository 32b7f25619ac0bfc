"""bitsandbytes' k-bit layers as a multi-GPU rank holds them: the parameter bitsandbytes makes.

``trace/emulation.py``'s ``Emulated4bit`` / ``Emulated8bit`` keep a full-shape bf16 weight,
which the single-GPU trace never copies (its load layout sizes the quantized storage). FSDP
and ZeRO-3 flatten, partition and gather the parameter itself, so here it has the shape and
dtype bitsandbytes gives it.

4-bit: ``quantize_4bit(A, quant_storage=...)`` packs two 4-bit
values per byte into ``((numel + 1) // (2 * itemsize), 1)`` elements of the storage
dtype (``bnb_4bit_quant_storage``: the plan's dtype under FSDP and ZeRO-3, uint8
otherwise). ``Packed4bit`` computes as ``MatMul4Bit`` does (bitsandbytes 0.50.2
``autograd/_functions.py``): forward dequantizes the weight into a new
``(out, in)`` tensor for ``F.linear``; backward dequantizes it again for the input
gradient; it keeps only the packed weight, as a view (``B = B.view(-1, 1)``,
``ctx.tensors = (None, B)``, lines 321 and 358). The view holds the storage the weight had
in forward: FSDP frees an unsharded flat parameter by resizing that storage (no matter),
but ZeRO-3 releases a gathered weight by swapping ``param.data`` for an empty tensor, so
under ZeRO-3 every 4-bit weight gathered in forward stays allocated until its backward.
The quantization state (absmax, codes) is not a parameter: it stays on every GPU,
unsharded (``memory/worldload.py`` allocates it).

int8 (``Int8Linear``): ``Int8Params`` is an int8 ``(out, in)`` parameter, and
``Int8Params._quantize`` makes its data and its ``CB`` attribute the same tensor
(``nn/modules.py`` 742-746; ``worldload.py`` sets ``CB`` at the load). An attribute is
not what ZeRO-3 partitions: ``deepspeed.initialize`` gives the parameter an int8 partition
and an empty ``data``, while ``CB`` keeps the whole weight as loaded. ``Linear8bitLt.forward``
(1180-1194) moves ``weight.CB`` to ``state.CB`` on its first call (``init_8bit_state``),
multiplies with ``state.CB`` and ``state.SCB`` (``MatMul8bitLt``: the gathered weight is not
read), and then sets ``weight.data = state.CB``: the weight ZeRO-3 gathered for the forward
is dropped at once, and a parameter ZeRO-3 keeps gathered costs nothing more. So under ZeRO-3
rank 0 holds every int8 weight whole (``state.CB``) besides its partition, and a gathered
int8 weight lives only through its own forward. Seen on an H100
(``data/measurements/probe_zeroint8_2026-12-07``, README). Elsewhere (DDP, ZeRO-1/2) nothing
swaps the parameter's data, and ``CB`` is the parameter's own storage.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vramcalc.trace.emulation import Emulated4bit, Emulated8bit


class _DequantizeMatMul(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, packed: torch.Tensor, shape: tuple[int, int]
    ) -> torch.Tensor:
        # bnb: ``B = B.view(-1, 1)``, ``ctx.tensors = (None, B)``: a view of the weight's
        # storage as it is now (a ZeRO-3 release swaps ``param.data``; the view keeps it)
        ctx.packed, ctx.shape = packed.view(-1, 1), shape
        weight = packed.new_empty(shape, dtype=torch.bfloat16)  # dequantize_4bit
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight = ctx.packed.new_empty(ctx.shape, dtype=torch.bfloat16).to(grad.dtype)
        return grad @ weight, None, None


class Packed4bit(Emulated4bit):
    """``Linear4bit`` whose ``weight`` is the packed storage (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        out = _DequantizeMatMul.apply(x.to(torch.bfloat16), self.weight, shape)
        if self.bias is not None:
            out = out + self.bias.to(torch.bfloat16)
        return out.to(x.dtype)


def packed_rows(numel: int, storage_dtype: torch.dtype) -> int:
    """Elements of the packed weight (bitsandbytes ``quantize_4bit``)."""
    itemsize = torch.empty((), dtype=storage_dtype).element_size()
    return (numel + 1) // (2 * itemsize)


def pack_4bit(model: Any, storage_dtype: torch.dtype) -> None:
    """Give every ``Emulated4bit`` of the meta model its packed weight (in place)."""
    for module in model.modules():
        if type(module) is not Emulated4bit:
            continue
        numel = module.in_features * module.out_features
        weight = torch.nn.Parameter(
            torch.empty((packed_rows(numel, storage_dtype), 1), dtype=storage_dtype, device="meta"),
            requires_grad=False,
        )
        weight._vramcalc_kbit = True  # type: ignore[attr-defined]
        module.weight = weight
        module.__class__ = Packed4bit


class Int8Linear(Emulated8bit):
    """``Linear8bitLt`` whose ``weight`` is an int8 ``Int8Params`` with its ``CB`` (module
    docstring); ``state_cb`` is ``Linear8bitLt.state.CB``."""

    state_cb: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if getattr(weight, "CB", None) is not None:  # init_8bit_state
            self.state_cb, weight.CB = weight.CB, None  # type: ignore[attr-defined]
        out = super().forward(x)  # MatMul8bitLt: reads the weight's shape only (state.CB's)
        if self.state_cb is not None:
            weight.data = self.state_cb  # the gathered weight, if any, is dropped
        return out


def int8_params(model: Any) -> None:
    """Give every ``Emulated8bit`` of the meta model an int8 ``(out, in)`` weight (in place);
    its ``CB`` is set where it is loaded (``worldload.py``)."""
    for module in model.modules():
        if type(module) is not Emulated8bit:
            continue
        weight = torch.nn.Parameter(
            torch.empty((module.out_features, module.in_features), dtype=torch.int8, device="meta"),
            requires_grad=False,
        )
        weight._vramcalc_kbit = True  # type: ignore[attr-defined]
        module.weight = weight
        module.__class__ = Int8Linear
