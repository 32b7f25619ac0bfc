"""The abstract autograd behind the activation rules.

Symbolic tensors (``T``) carry only ``numel``, dtype, ``requires_grad`` and an
identity; ``Graph`` applies CUDA autocast and the save rules of
``tools/autograd/derivatives.yaml`` op by op and records which storages
autograd keeps, each rounded like the CUDA caching allocator. The decoder
layers written with it live in ``memory/layers.py``; the estimate that uses
them in ``memory/activations.py``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "i64": 8, "i32": 4, "bool": 1}
# CUDA caching allocator granularity (tests/memory/memtrace.py CUDA_ALLOCATION_GRANULARITY)
ROUND_TO = 512


# -- the abstract autograd ------------------------------------------------------------------
class T(NamedTuple):
    """A symbolic tensor: one storage of ``numel`` elements (a named tuple: a layer makes
    dozens, a sweep row hundreds; a frozen dataclass costs three times as much to make)."""

    key: int
    numel: int  # elements of this (possibly view) tensor
    dtype: str
    rg: bool  # requires grad
    param: bool = False
    storage_numel: int = 0  # elements of the storage when this is a view of a larger one

    @property
    def nbytes(self) -> int:
        """Bytes of the storage (what saving a view keeps alive)."""
        return max(self.numel, self.storage_numel) * ITEMSIZE[self.dtype]


def promote(a: str, b: str) -> str:
    if a == b:
        return a
    return "fp32" if "fp32" in (a, b) else a


class Graph:
    """Records the storages autograd saves while an abstract layer runs."""

    def __init__(self, low: str, round_to: int = ROUND_TO) -> None:
        self.low = low
        self.round_to = round_to
        self.saved: dict[int, T] = {}
        self.weight_casts: dict[int, T] = {}
        self.transient = 0  # largest single short-lived forward buffer seen
        self._next = 0

    def new(self, numel: int, dtype: str, rg: bool, param: bool = False) -> T:
        self._next += 1
        return T(self._next, numel, dtype, rg, param)

    def param(self, numel: int, dtype: str, rg: bool) -> T:
        return self.new(numel, dtype, rg, param=True)

    def view(self, t: T, numel: int) -> T:
        """A slice of ``t`` (chunk of a fused projection): same storage, fewer elements."""
        return T(t.key, numel, t.dtype, t.rg, t.param, max(t.numel, t.storage_numel))

    def save(self, *ts: T) -> None:
        for t in ts:
            if not t.param:
                self.saved.setdefault(t.key, t)

    def bytes(self, ts: Any = None) -> int:
        ts = self.saved.values() if ts is None else ts
        return sum(round_up(t.nbytes, self.round_to) for t in ts)

    def note_transient(self, nbytes: int) -> None:
        self.transient = max(self.transient, nbytes)

    # elementwise and casts
    def to(self, x: T, dtype: str) -> T:
        return x if x.dtype == dtype else self.new(x.numel, dtype, x.rg)

    def autocast(self, x: T) -> T:
        """CUDA autocast input cast to the low dtype (fp32 leaf weights cached per forward)."""
        if x.dtype == self.low:
            return x
        if x.param and x.rg:
            cast = self.weight_casts.get(x.key)
            if cast is None:
                cast = self.weight_casts[x.key] = self.new(x.numel, self.low, True)
            return cast
        return self.new(x.numel, self.low, x.rg)

    def mul(self, a: T, b: T, numel: int | None = None) -> T:
        if a.rg:
            self.save(b)
        if b.rg:
            self.save(a)
        return self.new(numel or max(a.numel, b.numel), promote(a.dtype, b.dtype), a.rg or b.rg)

    def scale(self, a: T) -> T:  # times a Python number: saves nothing
        return self.new(a.numel, a.dtype, a.rg)

    def add(self, a: T, b: T) -> T:
        return self.new(max(a.numel, b.numel), promote(a.dtype, b.dtype), a.rg or b.rg)

    def act(self, x: T, kind: str, numel: int | None = None) -> T:
        """silu/gelu keep their input; relu (and tanh) keep their output."""
        out = self.new(numel or x.numel, x.dtype, x.rg)
        if x.rg:
            self.save(out if kind == "relu" else x)
        return out

    def dropout(self, x: T, p: float) -> T:
        if p <= 0:
            return x
        mask = self.new(x.numel, "bool", False)
        out = self.new(x.numel, x.dtype, x.rg)
        if x.rg:
            self.save(mask)
        return out

    # matmuls
    def linear(self, x: T, w: T, out_numel: int) -> T:
        xc, wc = self.autocast(x), self.autocast(w)
        if w.rg:
            self.save(xc)
        if x.rg:
            self.save(wc)
        return self.new(out_numel, self.low, x.rg or w.rg)

    def matmul(self, a: T, b: T, out_numel: int) -> T:
        ac, bc = self.autocast(a), self.autocast(b)
        if b.rg:
            self.save(ac)
        if a.rg:
            self.save(bc)
        return self.new(out_numel, self.low, a.rg or b.rg)


def round_up(nbytes: int, granularity: int) -> int:
    if nbytes <= 0 or granularity <= 1:
        return max(nbytes, 0)
    return math.ceil(nbytes / granularity) * granularity
