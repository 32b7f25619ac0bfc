"""The dispatch-mode recorder behind ``opprofile``: every op of a traced step, with its FLOPs,
bytes, kernel launch, Python caller, decoder layer and phase.

Bytes: every tensor argument is read (except what a write-only op overwrites), mutated
arguments and new outputs are written; views and allocations launch no kernel. Each tensor's
elements are ``k·p^e`` for the traced prime sequence length ``p`` (``e`` = 0 weights, 1 per
token, 2 per S x S pair), which makes every amount a coefficient of (1, T, T·S). An op counts
a Python-level call when a Python frame other than torch's dispatch machinery issued it and
the previous op came from another call site; ops the C++ autograd engine runs count none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vramcalc.trace.fastviews import make_call

# kinds: what prices an op on the GPU (throughput.py)
MATMUL, MATMUL_FP32, INT8_MATMUL = "matmul", "matmul_fp32", "int8_matmul"
ATTENTION, MEMORY, LAUNCH = "attention", "memory", "launch"
# an op's FLOPs and bytes are linear in: 1, T, T·S, c, T·c (c: int8 outlier columns)
N_FEATURES = 5
Vector = tuple[float, ...]

# aten ops that only allocate or describe memory: a host dispatch, no kernel, no bytes
_NO_KERNEL = frozenset(
    {
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "lift_fresh",
        "_local_scalar_dense",
        "set_",
        "resize_",
        "_unsafe_view",
        "detach",
        "alias",
        "is_same_size",
    }
)
_MATMULS = frozenset({"mm", "addmm", "bmm", "baddbmm", "_grouped_mm"})
# in-place ops that overwrite their first argument without reading it
_WRITE_ONLY = frozenset({"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_"})


@dataclass
class OpEvent:
    """One op of a traced step as the recorder saw it (``opprofile`` merges them into runs)."""

    name: str
    kind: str
    phase: str
    layer: int  # -1 outside the decoder layers
    flops: Vector  # (1, T, T·S, c, T·c)
    bytes: Vector
    host: float = 1.0
    sync: bool = False
    outlier: tuple[float, int] = (0.0, 0)  # int8: (p, input columns)
    python: float = 1.0
    # per unit of LoRA rank r and of r^2 (adapter matmuls, states; AdaLoRA's A A^T): the same
    # features, so that one trace answers every rank (opprofile.OpProfile.at_rank)
    rank_flops: tuple[Vector, Vector] = ((0.0,) * 5, (0.0,) * 5)
    rank_bytes: tuple[Vector, Vector] = ((0.0,) * 5, (0.0,) * 5)


def _leaves(tree: Any) -> list[Any]:
    import torch
    from torch.utils._pytree import tree_leaves

    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _power(n: int, p: int) -> int:
    """How many factors ``p`` divide ``n`` (0, 1 or 2 and more)."""
    e = 0
    while n and n % p == 0 and e < 2:
        n //= p
        e += 1
    return e


def _vector(amounts: list[tuple[int, float]], p: int) -> Vector:
    """Amounts keyed by the element count they scale with -> coefficients of (1, T, T·S),
    exact (integers divided by the power of ``p`` they carry)."""
    return _vectors(amounts, p, 0)[0]


def _vectors(
    amounts: list[tuple[int, float]], p: int, q: int
) -> tuple[Vector, tuple[Vector, Vector]]:
    """Amounts keyed by their element counts -> coefficients of (1, T, T·S) for r^0, and for
    r^1 and r^2, where the traced rank ``q`` (a prime, 0: no rank) carries r."""
    sums = [[0, 0, 0], [0, 0, 0], [0, 0, 0]]
    for elements, amount in amounts:
        sums[_power(elements, q) if q else 0][_power(elements, p)] += int(amount)
    vectors = [
        tuple(float(total // (p**e * (q or 1) ** f)) for e, total in enumerate(row)) + (0.0, 0.0)
        for f, row in enumerate(sums)
    ]
    return vectors[0], (vectors[1], vectors[2])


def _matmul_shape(name: str, args: tuple[Any, ...]) -> tuple[int, int, int, int]:
    """(batch, m, k, n) of an aten matmul."""
    if name in ("mm", "addmm"):
        a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
        return 1, a.shape[0], a.shape[1], b.shape[1]
    if name in ("bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
        return a.shape[0], a.shape[1], a.shape[2], b.shape[2]
    return 0, 0, 0, 0


def _traffic(
    func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> list[tuple[Any, int]]:
    """(tensor, bytes) an op moves: every tensor argument is read (except what a write-only op
    overwrites); mutated arguments and new outputs are written."""
    mutated: list[Any] = []
    for i, arg in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if arg.alias_info is not None and arg.alias_info.is_write and value is not None:
            mutated.extend(_leaves(value))
    mutated_ids = {id(t) for t in mutated}
    inputs = _leaves((args, kwargs))
    input_ids = {id(t) for t in inputs}
    moved = [
        (t, t.numel() * t.element_size())
        for t in inputs
        if not (name in _WRITE_ONLY and id(t) in mutated_ids)
    ]
    moved += [(t, t.numel() * t.element_size()) for t in mutated]
    moved += [(t, t.numel() * t.element_size()) for t in _leaves(out) if id(t) not in input_ids]
    return moved


# frames between a Python caller and the recorder: torch's dispatch machinery
_INTERNAL = (
    "/torch/_ops.py",
    "/torch/utils/_python_dispatch.py",
    "/torch/_subclasses/",
    "/torch/utils/_stats.py",
    "/torch/_compile.py",
    "/torch/_dynamo/",
    "/torch/_prims_common/",
)
_ENGINE = "/torch/autograd/graph.py"  # _engine_run_backward: ops the C++ autograd engine runs


def _caller() -> tuple[Any, int] | None:
    """The Python call site that dispatched the current op, or None when the C++ autograd
    engine did (a backward formula): (frame, instruction)."""
    import sys

    frame = sys._getframe(3)  # past Recorder.dispatch and the mode's __torch_dispatch__
    while frame is not None and any(part in frame.f_code.co_filename for part in _INTERNAL):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None or _ENGINE in frame.f_code.co_filename:
        return None
    return frame, frame.f_lasti


class Recorder:
    """Where the step is (phase, decoder layer) and every op seen there."""

    def __init__(self, prime: int, rank_prime: int = 0) -> None:
        self.prime = prime
        self.rank_prime = rank_prime  # the traced LoRA rank (a prime), 0 without adapters
        self.events: list[OpEvent] = []
        self.phase = "forward"
        self.layer = -1
        self.paused = 0
        # optimizer phase: decoder layer of each parameter / gradient / state tensor (by id),
        # so that one op over the lists of all of them is split by layer
        self.layer_of: dict[int, int] = {}
        # the frame (held, so that its id is not reused), instruction and op of the last op
        self._last_caller: tuple[Any, int, str] | None = None
        self._call: Any = None  # trace/fastviews.py's, once ``mode`` is made

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def emit(
        self,
        name: str,
        kind: str,
        flops: Vector = (0.0, 0.0, 0.0),
        nbytes: Vector = (0.0, 0.0, 0.0),
        sync: bool = False,
        outlier: tuple[float, int] = (0.0, 0),
        c_flops: tuple[float, float] = (0.0, 0.0),
        c_bytes: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        """An op stated from the sources (``kbit_ops.py``): FLOPs and bytes as coefficients of
        (1, T, T·S), and of (c, T·c) for int8 outlier columns."""
        self._last_caller = None
        if not self.paused:
            pad = (0.0, 0.0, 0.0)
            event = OpEvent(
                name,
                kind,
                self.phase,
                self.layer,
                (*flops, *pad[len(flops) :], *c_flops),
                (*nbytes, *pad[len(nbytes) :], *c_bytes),
                sync=sync,
                outlier=outlier,
            )
            self.events.append(event)

    def dispatch(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = self._call(func, args, kwargs)
        if self.paused or func.namespace == "prim":  # prim: tensor.device and such, metadata
            return out
        name = func.overloadpacket.__name__
        zero = (0.0,) * N_FEATURES
        caller, last = _caller(), self._last_caller
        # one Python-level call dispatches several ops (F.linear: t, mm); the same op again
        # from the same instruction is a loop making another call
        same_call = (
            caller is not None
            and last is not None
            and caller[0] is last[0]
            and caller[1] == last[1]
            and name != last[2]
        )
        python = 1.0 if caller is not None and not same_call else 0.0
        self._last_caller = (caller[0], caller[1], name) if caller is not None else None
        if getattr(func, "is_view", False) or name in _NO_KERNEL or name.startswith("_record_"):
            self.events.append(
                OpEvent(name, LAUNCH, self.phase, self.layer, zero, zero, python=python)
            )
            return out
        moved = _traffic(func, name, args, kwargs, out)
        kind, flops, rank_flops = MEMORY, zero, (zero, zero)
        if name in _MATMULS:
            batch, m, k, n = _matmul_shape(name, args)
            flops, rank_flops = _vectors(
                [(batch * m * k * n, 2.0 * batch * m * k * n)], self.prime, self.rank_prime
            )
            operand = args[1] if name in ("addmm", "baddbmm") else args[0]
            kind = MATMUL_FP32 if operand.element_size() == 4 else MATMUL
        if not self.layer_of:
            nbytes, rank_bytes = _vectors(
                [(t.numel(), b) for t, b in moved], self.prime, self.rank_prime
            )
            self.events.append(
                OpEvent(
                    name,
                    kind,
                    self.phase,
                    self.layer,
                    flops,
                    nbytes,
                    python=python,
                    rank_flops=rank_flops,
                    rank_bytes=rank_bytes,
                )  # fmt: skip
            )
            return out
        # an op over lists of every parameter: its bytes belong to each tensor's layer, and it
        # is one dispatch (counted outside the layers) however many layers there are
        by_layer: dict[int, list[tuple[int, float]]] = {-1: []}
        for tensor, b in moved:
            by_layer.setdefault(self.layer_of.get(id(tensor), -1), []).append((tensor.numel(), b))
        for layer, amounts in sorted(by_layer.items()):
            outside = layer == -1
            nbytes, rank_bytes = _vectors(amounts, self.prime, self.rank_prime)
            self.events.append(
                OpEvent(
                    name,
                    kind,
                    self.phase,
                    layer,
                    flops if outside else zero,
                    nbytes,
                    1.0 if outside else 0.0,
                    python=python if outside else 0.0,
                    rank_flops=rank_flops if outside else (zero, zero),
                    rank_bytes=rank_bytes,
                )
            )
        return out

    def mode(self) -> Any:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self
        self._call = make_call(torch)

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                return recorder.dispatch(func, args, kwargs or {})

        return _Mode()
