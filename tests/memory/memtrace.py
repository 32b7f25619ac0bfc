"""A live-tensor memory tracer: the instrument that derives and tests activation rules.

A development instrument, used only by the tests (``test_memtrace.py`` checks the
instrument itself): it lives here, not in the shipped ``vramcalc`` package.

``MemoryTracer`` is a ``TorchDispatchMode``: every aten op that runs while it
is active (forward, loss, backward, optimizer step; CPU, meta or fake
tensors) reports its outputs, and each *new* storage is followed with a
weak reference to the storage object (storages keep one Python object for
their lifetime, so the weakref callback fires exactly when the memory is
released). The tracer keeps the live bytes, their split by category and the
peak, with each storage's size rounded up like the CUDA caching allocator's
``allocated_bytes`` statistic (multiples of 512, ``round_to``).

Categories: ``parameters`` / ``inputs`` (registered with ``track``),
``gradients`` (``.grad`` tensors, marked by post-accumulate-grad hooks of
``watch_model``), ``optimizer_states`` (marked after ``optimizer.step`` by
``watch_optimizer``), ``saved_activations`` (packed by autograd for backward,
seen through ``torch.autograd.graph.saved_tensors_hooks``), ``weight_casts``
(copies of parameters made by autocast) and ``temporaries`` (everything
else). A storage moves to a stronger category when it becomes one (a
temporary saved for backward becomes ``saved_activations``); the split at
the peak is the split at that instant.

``saved_bytes`` measures what autograd keeps for one callable (a decoder
layer, a module), deduplicated by storage, with the op that created each
storage; ``fake_saved_bytes`` does the same under ``FakeTensorMode`` so a
full-size 7B decoder layer costs no memory.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CUDA_ALLOCATION_GRANULARITY = 512
CATEGORIES = (
    "parameters",
    "inputs",
    "gradients",
    "optimizer_states",
    "saved_activations",
    "weight_casts",
    "temporaries",
)
# A storage only ever moves to a category of higher rank.
_RANK = {
    "temporaries": 0,
    "weight_casts": 1,
    "saved_activations": 2,
    "inputs": 3,
    "optimizer_states": 4,
    "gradients": 5,
    "parameters": 6,
}


def round_bytes(nbytes: int, granularity: int = CUDA_ALLOCATION_GRANULARITY) -> int:
    """``nbytes`` rounded up to ``granularity`` (0 stays 0; granularity <= 1 is exact)."""
    if nbytes <= 0:
        return 0
    if granularity <= 1:
        return nbytes
    return math.ceil(nbytes / granularity) * granularity


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    if t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def _storage_key(st: torch.UntypedStorage) -> int:
    return st._cdata


@dataclass
class _Record:
    nbytes: int
    category: str
    op: str
    phase: str


@dataclass(frozen=True)
class TimelinePoint:
    """Live bytes right after one op (``timeline=True``)."""

    index: int
    op: str
    phase: str
    live_bytes: int


@dataclass(frozen=True)
class TraceReport:
    """What a ``MemoryTracer`` saw; all sizes in bytes after rounding."""

    peak_bytes: int
    peak_by_category: dict[str, int]
    peak_phase: str
    peak_op: str
    peak_by_phase: dict[str, int]
    final_bytes: int
    final_by_category: dict[str, int]
    round_to: int
    timeline: tuple[TimelinePoint, ...] = ()
    # (category, phase made in, op that made it, bytes) of each storage live at the peak
    peak_tensors: tuple[tuple[str, str, str, int], ...] = ()

    def peak_excluding(self, *categories: str) -> int:
        """Peak-instant live bytes without ``categories`` (e.g. ``"parameters"``)."""
        return self.peak_bytes - sum(self.peak_by_category.get(c, 0) for c in categories)


class MemoryTracer(TorchDispatchMode):
    """Follow every storage created while active; see the module docstring.

    >>> with MemoryTracer() as tracer:
    ...     tracer.track(model.parameters(), "parameters")
    ...     loss = model(x).sum()
    ...     loss.backward()
    >>> tracer.report().peak_bytes
    """

    def __init__(
        self,
        round_to: int = CUDA_ALLOCATION_GRANULARITY,
        timeline: bool = False,
        track_saved: bool = True,
        peak_tensors: bool = False,
    ) -> None:
        super().__init__()
        self.record_peak_tensors = peak_tensors
        self._peak_tensors: tuple[tuple[str, str, str, int], ...] = ()
        self.round_to = round_to
        self.record_timeline = timeline
        self.track_saved = track_saved
        self._records: dict[int, _Record] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._live = 0
        self._live_by_category = dict.fromkeys(CATEGORIES, 0)
        self._peak = 0
        self._peak_by_category = dict(self._live_by_category)
        self._peak_phase = ""
        self._peak_op = ""
        self._peak_by_phase: dict[str, int] = {}
        self._phase = "setup"
        self._op = ""
        self._timeline: list[TimelinePoint] = []
        self._ops = 0
        self._hooks: list[Any] = []
        self._saved_ctx: contextlib.AbstractContextManager | None = None

    # -- context -------------------------------------------------------------------------
    def __enter__(self) -> MemoryTracer:
        super().__enter__()
        if self.track_saved:
            self._saved_ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
            self._saved_ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._saved_ctx is not None:
            self._saved_ctx.__exit__(*exc)
            self._saved_ctx = None
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        super().__exit__(*exc)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Label the ops run inside (``forward``, ``loss``, ``backward``, ``optimizer``)."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    # -- registration ------------------------------------------------------------------------
    def track(self, tensors: torch.Tensor | Iterable[torch.Tensor], category: str) -> None:
        """Count existing tensors (parameters, inputs) as live, in ``category``."""
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        for t in tensors:
            self._add(t, category, "track")

    def watch_model(self, model: torch.nn.Module) -> None:
        """Count ``model``'s parameters and mark each ``.grad`` as a gradient when accumulated."""
        self.track((p for p in model.parameters()), "parameters")
        for p in model.parameters():
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._mark_grad))

    def watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Mark every optimizer state tensor as ``optimizer_states`` after each step."""

        def after_step(opt: torch.optim.Optimizer, *_: Any) -> None:
            for state in opt.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        self._add(value, "optimizer_states", "optimizer.step")

        self._hooks.append(optimizer.register_step_post_hook(after_step))

    def _mark_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._add(p.grad, "gradients", "accumulate_grad")

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # only storages already followed change category: an untracked older tensor
        # (a buffer, an input not passed to ``track``) is not new memory
        st = _storage(t)
        if st is not None and _storage_key(st) in self._records:
            self._add(t, "saved_activations", "saved")
        # detach: packing the tensor itself would make a reference cycle through grad_fn
        return t.detach()

    # -- bookkeeping ------------------------------------------------------------------------
    def _add(self, t: torch.Tensor, category: str, op: str) -> None:
        st = _storage(t)
        if st is None:
            return
        key = _storage_key(st)
        record = self._records.get(key)
        if record is not None:
            if _RANK.get(category, 0) > _RANK.get(record.category, 0):
                self._live_by_category[record.category] -= record.nbytes
                record.category = category
                self._live_by_category[category] = (
                    self._live_by_category.get(category, 0) + record.nbytes
                )
            return
        self._new(st, key, category, op)

    def _free_ref(self, key: int, _ref: object) -> None:
        self._free(key)

    def _new(self, st: torch.UntypedStorage, key: int, category: str, op: str) -> None:
        nbytes = round_bytes(st.nbytes(), self.round_to)
        record = _Record(nbytes, category, op, self._phase)
        self._records[key] = record
        self._refs[key] = weakref.ref(st, functools.partial(self._free_ref, key))
        self._live += nbytes
        self._live_by_category[category] = self._live_by_category.get(category, 0) + nbytes
        if self._live > self._peak_by_phase.get(self._phase, 0):
            self._peak_by_phase[self._phase] = self._live
        if self._live > self._peak:
            self._peak = self._live
            self._peak_by_category = dict(self._live_by_category)
            self._peak_phase = self._phase
            self._peak_op = op
            if self.record_peak_tensors:  # costly: every live storage at every new peak
                self._peak_tensors = tuple(
                    (r.category, r.phase, r.op, r.nbytes) for r in self._records.values()
                )

    def _free(self, key: int) -> None:
        record = self._records.pop(key, None)
        self._refs.pop(key, None)
        if record is None:
            return
        self._live -= record.nbytes
        self._live_by_category[record.category] -= record.nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inputs = {
            _storage_key(st)
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and (st := _storage(t)) is not None
        }
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        category = "temporaries"
        if name == "_to_copy" and args and isinstance(args[0], torch.nn.Parameter):
            category = "weight_casts"
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = _storage(t)
            if st is None:
                continue
            key = _storage_key(st)
            if key in inputs or key in self._records:
                continue  # a view or an in-place result: no new memory
            self._new(st, key, category, name)
        self._ops += 1
        if self.record_timeline:
            self._timeline.append(TimelinePoint(self._ops, name, self._phase, self._live))
        return out

    # -- results ---------------------------------------------------------------------------
    @property
    def live_bytes(self) -> int:
        return self._live

    def live_by_category(self) -> dict[str, int]:
        return {k: v for k, v in self._live_by_category.items() if v}

    def reset_peak(self) -> None:
        """Start a new peak from the current live bytes (like ``reset_peak_memory_stats``)."""
        self._peak = self._live
        self._peak_by_category = dict(self._live_by_category)
        self._peak_phase = self._phase
        self._peak_op = ""
        self._peak_by_phase = {}

    def report(self) -> TraceReport:
        return TraceReport(
            peak_bytes=self._peak,
            peak_by_category={k: v for k, v in self._peak_by_category.items() if v},
            peak_phase=self._peak_phase,
            peak_op=self._peak_op,
            peak_by_phase=dict(self._peak_by_phase),
            final_bytes=self._live,
            final_by_category=self.live_by_category(),
            round_to=self.round_to,
            timeline=tuple(self._timeline),
            peak_tensors=self._peak_tensors,
        )


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


# -- saved tensors of one callable --------------------------------------------------------------
@dataclass(frozen=True)
class SavedTensor:
    """One storage autograd keeps for backward."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int  # storage bytes (rounded as asked)
    created_by: str  # aten op that made the storage ("" if it existed before)
    kind: str  # "new", "input" (an argument's storage) or "parameter"
    scope: str = ""  # innermost ``scopes`` module running when the storage was made
    saved_in: str = ""  # innermost ``scopes`` module running when autograd first saved it


@dataclass(frozen=True)
class SavedReport:
    """What autograd saved while running one callable, deduplicated by storage."""

    tensors: tuple[SavedTensor, ...] = field(repr=False)
    round_to: int

    @property
    def new_bytes(self) -> int:
        """Saved storages created inside the callable (its own activations)."""
        return sum(t.nbytes for t in self.tensors if t.kind == "new")

    @property
    def input_bytes(self) -> int:
        """Saved storages that are the callable's tensor arguments."""
        return sum(t.nbytes for t in self.tensors if t.kind == "input")

    @property
    def parameter_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.kind == "parameter")

    def bytes_by_scope(self, kind: str = "new") -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            if t.kind == kind:
                out[t.scope] = out.get(t.scope, 0) + t.nbytes
        return out

    def in_scope(self, scope: str) -> SavedReport:
        """Storages *made* in ``scope``."""
        return SavedReport(tuple(t for t in self.tensors if t.scope == scope), self.round_to)

    def saved_during(self, scope: str) -> SavedReport:
        """Storages first saved while ``scope`` ran (a layer's input counts for the layer)."""
        return SavedReport(tuple(t for t in self.tensors if t.saved_in == scope), self.round_to)

    def bytes_by_dtype(self, kind: str = "new") -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            if t.kind == kind:
                out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
        return out

    def table(self) -> str:
        """One line per saved storage, for reading a rule off a real layer."""
        return "\n".join(
            f"{t.saved_in:8s} {t.scope:8s} {t.kind:9s} {t.created_by:28s} {t.dtype:8s} "
            f"{str(list(t.shape)):24s} {t.nbytes}"
            for t in self.tensors
        )


class _Creators(TorchDispatchMode):
    """Remember which op (and scope) created each storage (keyed by storage, kept alive)."""

    def __init__(self) -> None:
        super().__init__()
        self.created: dict[int, tuple[str, str]] = {}
        self.keep: list[torch.UntypedStorage] = []
        self.scope: list[str] = [""]

    @contextlib.contextmanager
    def scoped(self, scopes: dict[str, torch.nn.Module]) -> Iterator[None]:
        def enter(name: str) -> None:
            self.scope.append(name)

        def leave() -> None:
            self.scope.pop()

        handles = []
        for name, module in scopes.items():
            handles.append(module.register_forward_pre_hook(lambda *_, name=name: enter(name)))
            handles.append(module.register_forward_hook(lambda *_: leave()))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (st := _storage(t)) is not None:
                self.created.setdefault(_storage_key(st), (name, self.scope[-1]))
                self.keep.append(st)
        return out


def saved_bytes(
    fn: Callable[..., Any],
    *args: Any,
    round_to: int = 1,
    parameters: Iterable[torch.Tensor] = (),
    scopes: dict[str, torch.nn.Module] | None = None,
    **kwargs: Any,
) -> tuple[SavedReport, Any]:
    """Run ``fn(*args, **kwargs)`` and report what autograd saved for backward.

    Storages are deduplicated (``x * y`` saving ``x`` twice counts it once);
    a saved storage is ``"parameter"`` if it belongs to ``parameters`` (or is
    an ``nn.Parameter``), ``"input"`` if it is the storage of a tensor in
    ``args``/``kwargs``, else ``"new"``. With ``scopes`` (name -> submodule)
    each storage is tagged with the innermost scope that made it, so one
    model forward splits into embedding / layer.0 / layer.1 / head. Returns ``(report, fn's output)``;
    keep the output alive only as long as you need it.
    """
    param_keys = {_storage_key(st) for p in parameters if (st := _storage(p)) is not None}
    input_keys = {
        _storage_key(st)
        for t in tree_leaves((args, kwargs))
        if isinstance(t, torch.Tensor) and (st := _storage(t)) is not None
    }
    seen: dict[int, SavedTensor] = {}
    creators = _Creators()

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = _storage(t)
        if st is not None:
            key = _storage_key(st)
            if key not in seen:
                if isinstance(t, torch.nn.Parameter) or key in param_keys:
                    kind = "parameter"
                elif key in input_keys:
                    kind = "input"
                else:
                    kind = "new"
                op, scope = creators.created.get(key, ("", ""))
                seen[key] = SavedTensor(
                    tuple(t.shape),
                    str(t.dtype).removeprefix("torch."),
                    round_bytes(st.nbytes(), round_to),
                    op,
                    kind,
                    scope,
                    creators.scope[-1],
                )
        return t.detach()

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, _unpack),
        creators,
        creators.scoped(scopes or {}),
    ):
        out = fn(*args, **kwargs)
    return SavedReport(tuple(seen.values()), round_to), out


def fake_saved_bytes(
    build: Callable[[], torch.nn.Module],
    make_inputs: Callable[[], tuple[tuple[Any, ...], dict[str, Any]]],
    round_to: int = 1,
) -> SavedReport:
    """``saved_bytes`` of ``build()(*args, **kwargs)`` with every tensor fake (no memory).

    ``build`` and ``make_inputs`` run inside ``FakeTensorMode``, so a
    full-size decoder layer (7B: ~200 M parameters) is measured without
    allocating it.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        module = build()
        args, kwargs = make_inputs()
        report, _ = saved_bytes(
            module, *args, round_to=round_to, parameters=list(module.parameters()), **kwargs
        )
    return report
