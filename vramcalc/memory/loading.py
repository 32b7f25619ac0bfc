"""``from_pretrained`` as allocation events: what loading puts on the GPU, in order.

transformers' ``from_pretrained`` with a ``device_map``: ``caching_allocator_warmup``
allocates one tensor of the model's loaded size and frees it (bitsandbytes weights counted
at 0.5 / 1 byte per parameter), so one cached segment takes the weights; parameters then
arrive one by one in checkpoint key order, k-bit weights staged in the load dtype and
quantized on the GPU (4-bit: packed data, fp32 absmax, the code, with double quantization a
uint8 absmax and its second-level constants; int8: an fp16 copy, then int8 data and one
fp32 scale per row). ``memory/slack.load_events`` goes on with a training run's
preparation; ``from_pretrained_events`` is a serving process's load.

Sources: transformers ``modeling_utils.caching_allocator_warmup``,
``integrations/bitsandbytes.py``; bitsandbytes ``functional.quantize_4bit`` /
``int8_vectorwise_quant``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from vramcalc.memory.allocator import ALLOC, EMPTY_CACHE, FREE
from vramcalc.memory.provenance import LOAD_BUFFER, WEIGHTS
from vramcalc.memory.weights import (
    DYNAMIC_MAP_ENTRIES,
    FOUR_BIT_CODE_ENTRIES,
    NESTED_BLOCKSIZE,
    NF4_BLOCKSIZE,
)

ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "uint8": 1, "int8": 1, "int64": 8}
LOAD_ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


class LoadEvents:
    """Allocation events with handles -1, -2, ...; ``labels``, when given, receives what each
    ALLOC holds (``provenance`` names)."""

    def __init__(self, labels: list[str] | None = None) -> None:
        self.events: list[tuple[int, int, int]] = []
        self._next = -1
        self.labels = labels  # per event, when kept: what an ALLOC holds ("" for the rest)

    def alloc(self, nbytes: int, what: str = LOAD_BUFFER) -> int:
        handle = self._next
        self._next -= 1
        self.events.append((ALLOC, handle, nbytes))
        if self.labels is not None:
            self.labels.append(what)
        return handle

    def free(self, handle: int) -> None:
        self.events.append((FREE, handle, 0))
        if self.labels is not None:
            self.labels.append("")

    def empty_cache(self) -> None:
        self.events.append((EMPTY_CACHE, 0, 0))
        if self.labels is not None:
            self.labels.append("")


def checkpoint_key(name: str) -> str:
    """peft's parameter name -> the base model's state-dict key."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


class QuantizedLoad(Protocol):
    """What loading needs of a plan (a ``TrainingPlan`` or a serving plan)."""

    quant: str
    dtype: str
    double_quant: bool


def _quantized_tensors(
    shape: tuple[int, ...], plan: QuantizedLoad, ev: LoadEvents
) -> tuple[int, ...]:
    """Allocate what bitsandbytes keeps for one quantized weight (staging freed); returns
    the handles it keeps. A training run's layout (``slack.load_events``), kept as its
    simulations have it: 4-bit without the temporaries and in another order than
    bitsandbytes allocates (``_quantized_4bit``, a serving process's)."""
    n = 1
    for d in shape:
        n *= d
    staging = ev.alloc(n * LOAD_ITEMSIZE[plan.dtype])
    if plan.quant == "int8":
        fp16 = ev.alloc(2 * n)
        kept = (
            ev.alloc(n, WEIGHTS),  # CB, int8
            ev.alloc(4 * shape[0], WEIGHTS),  # SCB, fp32 per output row
        )
        ev.free(fp16)
    else:
        blocks = -(-n // NF4_BLOCKSIZE)
        packed = ev.alloc((n + 1) // 2, WEIGHTS)
        absmax = ev.alloc(4 * blocks, WEIGHTS)  # fp32 absmax
        code = ev.alloc(16 * 4, WEIGHTS)  # the 4-bit code
        kept = (packed, absmax, code)
        if plan.double_quant:
            kept = (
                packed,
                code,
                ev.alloc(blocks, WEIGHTS),  # absmax quantized to uint8
                ev.alloc(4 * -(-blocks // NESTED_BLOCKSIZE), WEIGHTS),  # second-level absmax
                ev.alloc(4 * DYNAMIC_MAP_ENTRIES, WEIGHTS),  # dynamic map copy
                ev.alloc(4, WEIGHTS),  # offset
            )
            ev.free(absmax)
    ev.free(staging)
    return kept


def _quantized_4bit(
    shape: tuple[int, ...], plan: QuantizedLoad, ev: LoadEvents, first: bool
) -> tuple[int, ...]:
    """One 4-bit weight quantized on the GPU in the order bitsandbytes 0.50.2 allocates
    (``Params4bit._quantize`` -> ``functional.quantize_4bit``: the CUDA op's fp32 absmax,
    then the packed weight; ``get_4bit_type``'s code, made on the device and divided by its
    ``abs().max()``; with double quantization ``offset = absmax.mean()`` and
    ``quantize_blockwise(absmax - offset, 256)``: the difference, the fp32 absmax, then the
    uint8 output and a copy of the dynamic map, which the ``first`` quantization of the
    process makes on the device, then the difference and the fp32 absmax freed); the
    staging in the load dtype freed; returns the handles the weight keeps (its data and
    ``QuantState``), as ``serving/fourbit.py`` makes them in a merge."""
    n = numel(shape)
    blocks = -(-n // NF4_BLOCKSIZE)
    staging = ev.alloc(n * LOAD_ITEMSIZE[plan.dtype])
    absmax = ev.alloc(4 * blocks, WEIGHTS if not plan.double_quant else LOAD_BUFFER)
    packed = ev.alloc((n + 1) // 2, WEIGHTS)
    code = ev.alloc(4 * FOUR_BIT_CODE_ENTRIES, WEIGHTS)
    magnitude = ev.alloc(4 * FOUR_BIT_CODE_ENTRIES)  # data.div_(data.abs().max())
    largest = ev.alloc(4)
    ev.free(magnitude)
    ev.free(largest)
    kept: tuple[int, ...] = (packed, absmax, code)
    if plan.double_quant:
        offset = ev.alloc(4, WEIGHTS)
        centred = ev.alloc(4 * blocks)
        if first:
            ev.alloc(4 * DYNAMIC_MAP_ENTRIES, WEIGHTS)  # name2qmap["dynamic"], for good
        nested_absmax = ev.alloc(4 * -(-blocks // NESTED_BLOCKSIZE), WEIGHTS)
        quantized_absmax = ev.alloc(blocks, WEIGHTS)
        nested_code = ev.alloc(4 * DYNAMIC_MAP_ENTRIES, WEIGHTS)
        ev.free(centred)
        ev.free(absmax)
        kept = (packed, quantized_absmax, code, offset, nested_absmax, nested_code)
    ev.free(staging)
    return kept


def from_pretrained_events(
    params: Iterable[tuple[str, tuple[int, ...], str, bool, bool]],
    plan: QuantizedLoad,
    labels: list[str] | None = None,
    first_in_process: bool = True,
) -> tuple[list[tuple[int, int, int]], dict[str, tuple[int, ...]]]:
    """Events of ``from_pretrained`` alone (the warm-up segment, then each parameter in
    checkpoint key order, k-bit weights quantized on the GPU; 4-bit ones by
    ``_quantized_4bit``, bitsandbytes' own order), as a serving process loads its base;
    and the handles each parameter keeps, by name (a k-bit weight: its data and
    quantization state). ``first_in_process``: bitsandbytes makes its dynamic map here
    (a process's first load of a double-quantized 4-bit model)."""
    ev = LoadEvents(labels)
    made = [not first_in_process]

    def quantize(shape: tuple[int, ...], plan: QuantizedLoad, ev: LoadEvents) -> tuple[int, ...]:
        if plan.quant == "int8":
            return _quantized_tensors(shape, plan, ev)
        kept = _quantized_4bit(shape, plan, ev, first=not made[0])
        made[0] = made[0] or plan.double_quant
        return kept

    loaded = from_pretrained_layout(ev, list(params), plan, quantize)
    return ev.events, loaded


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def from_pretrained_layout(
    ev: LoadEvents,
    base: list[tuple[str, tuple[int, ...], str, bool, bool]],
    plan: QuantizedLoad,
    quantize: Callable[[tuple[int, ...], QuantizedLoad, LoadEvents], tuple[int, ...]] = (
        _quantized_tensors
    ),
) -> dict[str, tuple[int, ...]]:
    """``caching_allocator_warmup``'s segment, then every parameter in checkpoint key order
    (k-bit weights by ``quantize``); returns the handles each keeps."""
    load_size = LOAD_ITEMSIZE[plan.dtype]
    warmup = 0
    for _, shape, _, _, kbit in base:
        per = (1 if plan.quant == "int8" else 0.5) if kbit else load_size
        warmup += int(numel(shape) * per)
    ev.free(ev.alloc(warmup // 2 * 2))  # torch.empty(byte_count // 2, dtype=float16)
    loaded: dict[str, tuple[int, ...]] = {}
    for name, shape, _, _, kbit in sorted(base, key=lambda p: checkpoint_key(p[0])):
        if kbit:
            loaded[name] = quantize(shape, plan, ev)
        else:
            loaded[name] = (ev.alloc(numel(shape) * load_size, WEIGHTS),)
    return loaded
