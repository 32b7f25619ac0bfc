"""bitsandbytes 0.50.2's LLM.int8 weights under peft's merge and DoRA, on fake tensors.

``gpu_paths.ServeInt8Linear`` stands for a ``bitsandbytes.nn.Linear8bitLt`` as
``from_pretrained`` leaves it (``BitsAndBytesConfig(load_in_8bit=True)``): an int8 weight
(out, in) whose fp32 row scales (``SCB``) were allocated while loading
(``memory/loading.from_pretrained_events``); the weight's death frees both (``servereplay``).
``mark`` gives the weight what peft 0.21 reads of an ``Int8Params`` (``SCB``,
``has_fp16_weights``).

peft's own code runs on it. The bitsandbytes pieces peft calls that cannot run on fake
tensors (an ``Int8Params`` is made by ``torch.Tensor._make_subclass`` and quantized by the
CUDA op) run as these stand-ins, while ``eight_bit_paths`` is entered:

* ``dequantized`` for ``dequantize_bnb_weight`` and ``dequantize_module_weight``
  (``functional.int8_vectorwise_dequant``, whose only kernel is the default one:
  ``A * stats.view(-1, 1) * 7.874015718698502e-3``): the product in fp32, then the scaled
  fp32 weight; the product freed;
* ``quantized`` for ``bnb.nn.Int8Params(w.to("cpu"), ...).to(device)``, peft's
  ``Linear8bitLt.merge`` (``Int8Params._quantize``): the host copy back on the device in
  fp16 (``data.contiguous().to(device=device, dtype=torch.float16)``: a cross-device copy
  converts on the host, so the fp16 tensor is the only device allocation), then the CUDA
  ``int8_vectorwise_quant`` op's ``row_stats`` (fp32, one per row) and ``out_row`` (int8);
  no outlier columns (``threshold=0.0``); the fp16 copy freed when ``_quantize`` returns.

The replaced weight dies when ``merge`` returns (its local ``weight``; ``state.SCB`` is
cleared by ``state.reset_grads()``), and with it its data and scales.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from vramcalc.serving.fourbit import peft_bnb_paths

#: what marks a loaded int8 weight's scales: they were laid out while loading, not made here
LOADED_SCB = "loaded with the weight (memory/loading.py)"


def mark(weight: Any) -> None:
    """Give ``weight`` what ``Int8Params`` keeps on itself (quantized, fp16 weights off)."""
    weight.__dict__.update(
        _vramcalc_kbit=True, _vramcalc_int8=True, SCB=LOADED_SCB, CB=None, has_fp16_weights=False
    )


def _is_ours(weight: Any) -> bool:
    return bool(getattr(weight, "_vramcalc_int8", False))


def dequantized(weight: Any) -> Any:
    """``int8_vectorwise_dequant(weight.data, SCB)`` (module docstring)."""
    product = weight.new_empty(tuple(weight.shape), dtype=torch.float32)
    out = product * 7.874015718698502e-3
    del product
    return out


def quantized(data: Any) -> Any:
    """``Int8Params(data).to(device)`` for ``data`` on the host (module docstring): the int8
    weight as a parameter with its new scales."""
    staged = data.contiguous().to(torch.float16)
    rows = staged.numel() // staged.shape[-1]
    row_stats = staged.new_empty((rows,), dtype=torch.float32)
    out_row = staged.new_empty(tuple(staged.shape), dtype=torch.int8)
    del staged
    weight = torch.nn.Parameter(out_row, requires_grad=False)
    weight.__dict__.update(_vramcalc_int8=True, CB=out_row, SCB=row_stats, has_fp16_weights=False)
    return weight


class _Int8Params:
    """``bnb.nn.Int8Params(data, ...)`` as peft's merge makes it: quantized by ``.to``."""

    def __init__(
        self,
        data: Any = None,
        requires_grad: bool = False,
        has_fp16_weights: bool = False,
        CB: Any = None,  # noqa: N803 - bitsandbytes' names
        SCB: Any = None,  # noqa: N803
        **kwargs: Any,
    ) -> None:
        self.data = data

    def to(self, *args: Any, **kwargs: Any) -> Any:
        return quantized(self.data)


@contextlib.contextmanager
def eight_bit_paths() -> Iterator[None]:
    """peft's calls into bitsandbytes on an int8 stand-in weight answered as on the GPU
    (module docstring); any other weight goes to the originals."""
    with peft_bnb_paths("Int8Params", _Int8Params, _is_ours, dequantized):
        yield
