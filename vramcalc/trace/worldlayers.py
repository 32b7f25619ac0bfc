"""bitsandbytes 4-bit layers as a multi-GPU rank holds them: the packed weight is the parameter.

``memory/emulation.py``'s ``Emulated4bit`` keeps a full-shape weight, which the
single-GPU trace never copies (its load layout sizes the packed storage). FSDP
flattens, shards and all-gathers the parameter itself, so here it has the shape
bitsandbytes gives it: ``quantize_4bit(A, quant_storage=...)`` packs two 4-bit
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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vramcalc.trace.emulation import Emulated4bit


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
