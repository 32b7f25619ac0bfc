"""The event format of a traced run: what every tracer produces and every consumer reads.

A run is a sequence of ``(op, handle, nbytes)`` events (``ALLOC``, ``FREE``, ``EMPTY_CACHE``
of ``memory/allocator.py``) with, per event, the decoder layer it belongs to and, between
events, labelled markers (steps, micro-batches, the optimizer step). The step tracer
(``steptrace.py``) records it; ``unroll.py`` expands it; ``recipe.py`` keeps it with sizes
as expressions; ``memory/slack.py`` and ``memory/snapshot.py`` replay it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vramcalc.errors import VramcalcError

#: an allocation's tensor: itemsize, shape, and (dim, multiple) for dims rounded up to a
#: multiple; or ("bnb", trainable tensor index, embedding) for a bitsandbytes optimizer state
Shape = tuple[Any, ...]


@dataclass(frozen=True)
class StepTrace:
    """What a run of ``steps`` optimizer steps allocates, in order."""

    events: tuple[tuple[int, int, int], ...]  # (ALLOC|FREE, handle, nbytes)
    tags: tuple[int, ...]  # per event: the decoder layer it belongs to, -1 for none
    markers: tuple[tuple[str, int], ...]  # (label, number of events before it)
    # per parameter tensor: (name, shape, dtype, trainable, k-bit quantized)
    params: tuple[tuple[str, tuple[int, ...], str, bool, bool], ...]
    param_layers: tuple[int, ...]  # per parameter: its decoder layer, -1 for none
    num_layers: int  # decoder layers of the traced model
    # per event: (itemsize, shape) of the tensor an ALLOC made, when its storage is exactly
    # that tensor; None for frees and other allocations (``trace/recipe.py`` reads sizes
    # as functions of batch, sequence and rank from them)
    shapes: tuple[Shape | None, ...] = ()
    # INT8: what the MLP output projections' outlier columns depend on (memory/int8.py)
    outlier_rule: Any = None
    # bitsandbytes optimizers: (position in events, trainable tensor index, embedding) where
    # each tensor's states are allocated (its ALLOC events carry shape ("bnb", ...))
    bnb_slots: tuple[tuple[int, int, bool], ...] = ()
    # allocations of one element per trainable tensor (gradient clipping's stack of the
    # per-tensor norms): their handles, and how many trainable tensors the traced model has
    # (``unroll.expand`` gives them the element count of the model it unrolls to)
    per_tensor: tuple[int, ...] = ()
    traced_tensors: int = 0


class UnrollError(VramcalcError):
    """A trace cannot be expanded: its layers are not alike, or its steps or micro-batches do
    not repeat (``unroll.py``, ``repeat.py``)."""


@dataclass(frozen=True)
class WorldTrace:
    """What rank 0 of an N-GPU world allocates over loading, the wrap and its optimizer steps,
    in order (``worldtrace.trace_world``)."""

    events: tuple[tuple[int, int, int], ...]  # (ALLOC|FREE|EMPTY_CACHE, handle, nbytes)
    streams: tuple[int, ...]  # per event: the stream its block belongs to
    markers: tuple[tuple[str, int], ...]  # (label, number of events before it)
    # host waits on the GPU: (events before the wait, events before the point awaited)
    sync_points: tuple[tuple[int, int], ...]
    num_layers: int
    wrapper: str
    labels: tuple[str, ...] = ()  # per event: what allocated it (aten op, "resize", "load")
    cross_stream: frozenset[int] = frozenset()  # handles record_stream'ed on another stream
    tags: tuple[int, ...] = ()  # per event: its decoder layer (-1: none), when traced to unroll
