"""One trace of a recipe answers every batch size, sequence length and rank.

A plan's run is replayed through the allocator model from the events of its
training steps (``memory/steptrace.py``). Tracing them costs a second or more
of fake-tensor dispatch, and only the sizes change with the micro-batch and the
LoRA rank: the ops, their order and which tensor each free releases do not. So
the recipe (model, method, quantization, targets, checkpointing, attention,
optimizer, ...) is traced **once**, at a trace point whose batch ``B``,
sequence length ``S``, rank ``r`` (and, for INT8, outlier columns ``c``) are
distinct primes that divide no number of the model's config. Every allocation
is recorded with its tensor's shape, and each dimension is read back as a
product of powers of those primes times a constant, e.g.
``B*S*5120``: a dimension's value tells which of ``B``, ``S``, ``r``, ``c`` it
holds. Two other forms occur and are read too:

* ``S + d`` for a small shift ``d`` (the loss pads the labels to ``S + 1``);
  the trace point's ``S`` is chosen so that ``S + d`` has a prime factor (5 or more)
  no config number has, for ``d = -1, +1``;
* a length rounded up to a multiple (FlashAttention-2's backward workspaces):
  the GPU emulation marks such dimensions (``emulation.rounded_dims``).

A ``RecipeTrace`` keeps each allocation's size as such an expression, and
``instantiate`` evaluates them for a plan: the same events, in the same order,
with the plan's bytes. Code paths that depend on sizes are kept apart by a
*regime* (which side of each length threshold of the config -- sliding window,
chunked attention, the rope's original context -- the sequence length lies on;
INT8 with or without outlier columns); the trace point is taken inside the
plan's regime, and a plan whose regime has no room for one (a sequence length
on a threshold) is traced directly. Gradient accumulation is traced with 1, 2
or 3 micro-batches; more repeat the third (``repeat.repeat_micro``).

``tests/test_recipe.py`` checks that instantiated traces equal direct traces of
the same plans event for event.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vramcalc.errors import VramcalcError
from vramcalc.memory.allocator import ALLOC
from vramcalc.trace.events import StepTrace
from vramcalc.trace.repeat import steps_to_trace
from vramcalc.training_plan import TrainingPlan

#: bump when the trace, the decoding or the stored format changes
RECIPE_VERSION = 7  # 4: a marker where each backward pass starts; 5: AdaLoRA traced 3 steps;
# 6: the cuBLAS workspace allocated after its first matmul's output; 7: MatMul8bitLt frees its
# int32 result after its conversion to A's dtype


MAX_TRACED_MICRO_BATCHES = 3  # more repeat the third (repeat.repeat_micro)
MAX_SHIFT = 1  # S + d with |d| <= MAX_SHIFT is read as a shifted sequence length
VARIABLES = ("B", "S", "r", "c")
# where each variable's trace value starts: well above the small counts a trace also holds
# (tensors per optimizer group, ...), so that no count is mistaken for a multiple of one
LOWEST = {"S": 200, "B": 211, "r": 223, "c": 227}


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % q for q in range(2, int(n**0.5) + 1))


def _primes_from(lo: int):  # type: ignore[no-untyped-def]
    n = max(lo, 2)
    while True:
        if _is_prime(n):
            yield n
        n += 1


# (variable, shift, exponent, multiple): ((value + shift) rounded up to multiple) ** exponent
Factor = tuple[str, int, int, int]
# coefficient and factors: the bytes of an allocation as a function of the variables
Size = tuple[int, tuple[Factor, ...]]


class RecipeTraceError(VramcalcError):
    """A recipe whose sizes cannot be read as functions of batch, sequence and rank."""


@dataclass(frozen=True)
class TracePoint:
    """The sizes a recipe is traced with."""

    batch: int
    seq: int
    rank: int
    outliers: int  # INT8 outlier columns per MLP output projection (0: not INT8)

    def values(self) -> dict[str, int]:
        return {"B": self.batch, "S": self.seq, "r": self.rank, "c": self.outliers}


# -- sizes as expressions -------------------------------------------------------------------
def evaluate(size: Size, values: dict[str, int]) -> int:
    coefficient, factors = size
    out = coefficient
    for var, shift, exponent, multiple in factors:
        v = values[var] + shift
        if multiple > 1:
            v = -(-v // multiple) * multiple
        out *= v**exponent
    return out


def _config_numbers(value: Any) -> set[int]:
    """Every positive integer in a config (nested dicts and lists included)."""
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {abs(value)} if value else set()
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**62:
        return {abs(int(value))} if value else set()
    if isinstance(value, dict):
        return set().union(*(_config_numbers(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(_config_numbers(v) for v in value)) if value else set()
    return set()


def _clean(p: int, numbers: set[int]) -> bool:
    return all(n % p for n in numbers)


def _marker(n: int, numbers: set[int], taken: set[int]) -> bool:
    """Whether ``n`` has a prime factor >= 5 that no config number has (so a constant of the
    model, a product of config numbers and powers of two, is never a multiple of ``n``)."""
    m, q = n, 2
    factors = set()
    while q * q <= m:
        while m % q == 0:
            factors.add(q)
            m //= q
        q += 1
    if m > 1:
        factors.add(m)
    return any(f >= 5 and f not in taken and _clean(f, numbers) for f in factors)


def length_thresholds(config_dict: dict[str, Any]) -> tuple[int, ...]:
    """Sequence lengths at which the model's code takes another path: sliding windows and
    chunked attention (transformers' masks), and the switch of a dynamic or long rope
    (``modeling_rope_utils.dynamic_rope_update``). The position limit is none: rope is
    computed from the positions, whatever their number."""
    found: set[int] = set()

    def take(value: Any) -> None:
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            found.add(value)

    for key in ("sliding_window", "attention_chunk_size"):
        take(config_dict.get(key))
    rope = config_dict.get("rope_scaling") or config_dict.get("rope_parameters") or {}
    if isinstance(rope, dict) and str(rope.get("rope_type") or rope.get("type")) in (
        "dynamic",
        "longrope",
    ):
        take(rope.get("original_max_position_embeddings"))
        take(config_dict.get("original_max_position_embeddings"))
        take(config_dict.get("max_position_embeddings"))
    for sub in ("text_config",):
        if isinstance(config_dict.get(sub), dict):
            found.update(length_thresholds(config_dict[sub]))
    return tuple(sorted(found))


def regime(config_dict: dict[str, Any], plan: TrainingPlan) -> tuple[Any, ...]:
    """Which code paths the plan's sizes take: the side of each length threshold of the
    config its sequence length lies on (below: ``<``); a batch or rank of 1 (a size-1
    dimension makes some views contiguous, and ``.contiguous()`` then copies nothing: the
    loss's shifted labels at batch 1)."""
    sides = tuple(plan.seq_len < t for t in length_thresholds(config_dict))
    return sides, plan.batch_size == 1, plan.uses_adapters and plan.adapter_rank == 1


def regime_words(config_dict: dict[str, Any], plan: TrainingPlan) -> str:
    """How often a recipe is traced, for the progress note: once, or once for each regime
    its plans fall in ("once per recipe" is not the whole truth for a batch of 1)."""
    sides, batch_one, rank_one = regime(config_dict, plan)
    apart = [
        f"sequences {'under' if below else 'of'} {t:,}{'' if below else '+'} tokens"
        for below, t in zip(sides, length_thresholds(config_dict), strict=True)
    ]
    apart += ["batch size 1"] * batch_one + ["rank 1"] * rank_one
    return "once per recipe" + (f"; {', '.join(apart)} traced apart" if apart else "")


def trace_point(config_dict: dict[str, Any], plan: TrainingPlan) -> TracePoint | None:
    """Primes for B, S, r (and c) inside the plan's regime, or None when the regime leaves no
    room (the plan is then traced as it is)."""
    numbers = _config_numbers(config_dict) | {1, 2, 4, 8, 16, 32, 64, 128, 256}
    thresholds = length_thresholds(config_dict)
    if plan.seq_len <= MAX_SHIFT + 1 or any(abs(plan.seq_len - t) <= MAX_SHIFT for t in thresholds):
        return None  # on a threshold (or S + d near 0): traced as it is
    sides, batch_one, rank_one = regime(config_dict, plan)
    low = max([t for t, below in zip(thresholds, sides, strict=True) if not below], default=1)
    high = min([t for t, below in zip(thresholds, sides, strict=True) if below], default=2**31)
    taken: set[int] = set()

    def pick(lo: int, hi: int, extra: Any = None) -> int | None:
        for p in _primes_from(lo):
            if p >= hi:
                return None
            if p in taken or not _clean(p, numbers):
                continue
            if extra is not None and not extra(p):
                continue
            taken.add(p)
            return p
        return None

    # S first, in [low + MAX_SHIFT, high - MAX_SHIFT), each S + d marked
    def shifts_marked(p: int) -> bool:
        return all(
            _marker(p + d, numbers, taken | {p}) for d in range(-MAX_SHIFT, MAX_SHIFT + 1) if d
        )

    seq = pick(max(low + MAX_SHIFT + 1, LOWEST["S"]), high - MAX_SHIFT, shifts_marked)
    if seq is None:
        seq = pick(low + MAX_SHIFT + 1, high - MAX_SHIFT, shifts_marked)
    if seq is None:
        return None
    batch = 1 if batch_one else pick(LOWEST["B"], 2**31)
    rank = (
        1
        if rank_one
        else pick(max(plan.target_rank if plan.method == "adalora" else 1, LOWEST["r"]), 2**31)
    )
    columns = pick(LOWEST["c"], 2**31) if plan.quant == "int8" else 0
    if batch is None or rank is None or columns is None:
        return None
    return TracePoint(batch, seq, rank, columns)


def _decode_dim(value: int, point: TracePoint, multiple: int) -> Size | None:
    """One dimension at the trace point as coefficient x factors (None: not readable)."""
    if value == 0:
        return (0, ())
    if multiple > 1:  # a length rounded up: the traced S rounded, nothing else
        rounded = -(-point.seq // multiple) * multiple
        return (1, (("S", 0, 1, multiple),)) if value == rounded else None
    factors: list[Factor] = []
    for var, p in (("B", point.batch), ("r", point.rank), ("c", point.outliers), ("S", point.seq)):
        if p <= 1:
            continue
        exponent = 0
        while value % p == 0:
            value //= p
            exponent += 1
        if exponent:
            factors.append((var, 0, exponent, 1))
    for d in range(1, MAX_SHIFT + 1):
        for shift in (d, -d):
            q = point.seq + shift
            exponent = 0
            while value % q == 0:
                value //= q
                exponent += 1
            if exponent:
                factors.append(("S", shift, exponent, 1))
    return value, tuple(factors)


def decode_size(
    shape: tuple[int, tuple[int, ...], tuple[tuple[int, int], ...]] | None,
    nbytes: int,
    point: TracePoint,
) -> Size:
    """An allocation's bytes as an expression: from its tensor's shape where recorded, else
    from the bytes (a product read the same way)."""
    coefficient, factors = 1, []
    if shape is not None:
        itemsize, dims, rounded = shape
        multiples = dict(rounded)
        coefficient = itemsize
        for index, dim in enumerate(dims):
            decoded = _decode_dim(dim, point, multiples.get(index, 1))
            if decoded is None:
                break
            coefficient *= decoded[0]
            factors.extend(decoded[1])
        else:
            size = _merge(coefficient, factors)
            if evaluate(size, point.values()) == nbytes:
                return size
    decoded = _decode_dim(nbytes, point, 1)
    if decoded is None or evaluate(decoded, point.values()) != nbytes:
        raise RecipeTraceError(f"an allocation of {nbytes} bytes cannot be read as a size")
    return decoded


def _merge(coefficient: int, factors: list[Factor]) -> Size:
    """Factors with the same base multiplied together (one exponent each)."""
    merged: dict[tuple[str, int, int], int] = {}
    for var, shift, exponent, multiple in factors:
        merged[(var, shift, multiple)] = merged.get((var, shift, multiple), 0) + exponent
    if coefficient == 0:
        return (0, ())
    return coefficient, tuple(sorted((v, s, e, m) for (v, s, m), e in merged.items()))


# -- the recipe's trace ---------------------------------------------------------------------
Param = tuple[str, tuple[Size, ...], str, bool, bool]  # name, dims, dtype, trainable, k-bit


@dataclass(frozen=True)
class RecipeTrace:
    """A recipe's traced steps with every size an expression of B, S, r and c."""

    point: TracePoint
    micro_batches: int  # traced micro-batches per step (1, 2 or 3)
    sizes: tuple[Size, ...]  # the distinct sizes
    events: tuple[tuple[int, int, int], ...]  # (ALLOC|FREE, handle, index into sizes)
    tags: tuple[int, ...]
    markers: tuple[tuple[str, int], ...]
    params: tuple[Param, ...]
    param_layers: tuple[int, ...]
    num_layers: int  # decoder layers traced
    model_layers: int  # decoder layers of the model (the trace is unrolled to them)
    trace_seconds: float
    # INT8: (act, sigma, gated, in_features) of the MLP output projections (memory/int8.py)
    outlier_rule: tuple[str, float, bool, int] | None = None
    # bitsandbytes optimizer states: (event position, trainable tensor index, embedding) where
    # the states of each tensor are allocated; the rule (optimizer.bnb_state_tensors) gives
    # how many are on the device and their sizes at the plan's tensor sizes
    bnb_slots: tuple[tuple[int, int, bool], ...] = ()
    optimizer: str = ""
    # allocations of one element per trainable tensor, and the traced model's count of them
    # (``StepTrace.per_tensor``): constant here, sized by ``unroll.expand``
    per_tensor: tuple[int, ...] = ()
    traced_tensors: int = 0

    def outliers(self, plan: TrainingPlan) -> int:
        """The plan's INT8 outlier columns (0: none, or not INT8)."""
        if self.outlier_rule is None or not self.point.outliers:
            return 0
        from vramcalc.trace.int8 import OutlierRule

        return OutlierRule(*self.outlier_rule).columns(plan.batch_size * plan.seq_len)

    def answers(self, plan: TrainingPlan) -> bool:
        """Whether ``plan``'s sizes take the traced code paths: INT8 with no outlier column
        at all skips the outlier tensors (traced with some)."""
        return not (self.point.outliers and self.outlier_rule and self.outliers(plan) == 0)

    def instantiate(self, plan: TrainingPlan) -> StepTrace:
        """The traced steps with ``plan``'s sizes (its micro-batches repeated as needed)."""
        from vramcalc.trace.repeat import repeat_micro

        if not self.answers(plan):
            raise RecipeTraceError("INT8 with no outlier column: trace the plan itself")
        values = {
            "B": plan.batch_size,
            "S": plan.seq_len,
            "r": plan.adapter_rank,
            "c": self.outliers(plan),
        }
        nbytes = [evaluate(size, values) for size in self.sizes]
        params = tuple(
            (name, tuple(evaluate(d, values) for d in dims), dtype, trainable, kbit)
            for name, dims, dtype, trainable, kbit in self.params
        )
        tags, markers = self.tags, self.markers
        events = tuple((op, handle, nbytes[index]) for op, handle, index in self.events)
        if self.bnb_slots:
            events, tags, markers = self._with_bnb_states(params, events)
        if plan.grad_accum > self.micro_batches:
            events, tags, markers = repeat_micro(
                events, tags, markers, plan.grad_accum - self.micro_batches
            )
        return StepTrace(
            events,
            tags,
            markers,
            params,
            self.param_layers,
            self.num_layers,
            per_tensor=self.per_tensor,
            traced_tensors=self.traced_tensors,
        )

    def _with_bnb_states(
        self, params: tuple[Any, ...], events: tuple[tuple[int, int, int], ...]
    ) -> tuple[tuple[tuple[int, int, int], ...], tuple[int, ...], tuple[tuple[str, int], ...]]:
        """Events (tags, markers) with each tensor's bitsandbytes states allocated at its slot
        as the rule gives them for the plan's tensor sizes (how many are on the device --
        paged states are not -- depends on the size; they are never freed)."""
        import math

        from vramcalc.memory.optimizer import bnb_state_tensors

        numels = [math.prod(shape) for _, shape, _, trainable, _ in params if trainable]
        # a state belongs to its tensor's decoder layer (what unrolling repeats per layer)
        layers = [
            layer
            for (_, _, _, trainable, _), layer in zip(params, self.param_layers, strict=True)
            if trainable
        ]
        top = max((handle for _, handle, _ in self.events), default=0)
        out: list[tuple[int, int, int]] = []
        tags: list[int] = []
        inserted_before: list[int] = []  # per position: states inserted up to it
        slots = list(self.bnb_slots)
        s = 0
        for position in range(len(events) + 1):
            while s < len(slots) and slots[s][0] == position:
                _, tensor, embedding = slots[s]
                tag = layers[tensor] if self.param_layers else -1
                for size, on_device in bnb_state_tensors(self.optimizer, numels[tensor], embedding):
                    if on_device:
                        top += 1
                        out.append((ALLOC, top, size))
                        tags.append(tag)
                s += 1
            inserted_before.append(len(out) - position)
            if position < len(events):
                out.append(events[position])
                tags.append(self.tags[position] if position < len(self.tags) else -1)
        markers = tuple((label, at + inserted_before[at]) for label, at in self.markers)
        return tuple(out), tuple(tags), markers

    def to_json(self) -> dict[str, Any]:
        return {
            "v": RECIPE_VERSION,
            "point": [self.point.batch, self.point.seq, self.point.rank, self.point.outliers],
            "micro_batches": self.micro_batches,
            "sizes": [[c, [list(f) for f in fs]] for c, fs in self.sizes],
            "events": [x for event in self.events for x in event],
            "tags": list(self.tags),
            "markers": [list(m) for m in self.markers],
            "params": [
                [name, [[c, [list(f) for f in fs]] for c, fs in dims], dtype, trainable, kbit]
                for name, dims, dtype, trainable, kbit in self.params
            ],
            "param_layers": list(self.param_layers),
            "num_layers": self.num_layers,
            "model_layers": self.model_layers,
            "trace_seconds": self.trace_seconds,
            "outlier_rule": list(self.outlier_rule) if self.outlier_rule else None,
            "bnb_slots": [list(g) for g in self.bnb_slots],
            "optimizer": self.optimizer,
            "per_tensor": list(self.per_tensor),
            "traced_tensors": self.traced_tensors,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RecipeTrace:
        if raw.get("v") != RECIPE_VERSION:
            raise ValueError("another version")

        def size(item: list[Any]) -> Size:
            return int(item[0]), tuple((str(v), int(s), int(e), int(m)) for v, s, e, m in item[1])

        flat = raw["events"]
        return cls(
            TracePoint(*(int(x) for x in raw["point"])),
            int(raw["micro_batches"]),
            tuple(size(s) for s in raw["sizes"]),
            tuple(
                (int(flat[i]), int(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)
            ),
            tuple(int(t) for t in raw["tags"]),
            tuple((str(label), int(at)) for label, at in raw["markers"]),
            tuple(
                (str(n), tuple(size(d) for d in dims), str(dt), bool(t), bool(k))
                for n, dims, dt, t, k in raw["params"]
            ),
            tuple(int(x) for x in raw["param_layers"]),
            int(raw["num_layers"]),
            int(raw["model_layers"]),
            float(raw["trace_seconds"]),
            _rule(raw.get("outlier_rule")),
            tuple((int(a), int(t), bool(e)) for a, t, e in raw.get("bnb_slots") or ()),
            str(raw.get("optimizer") or ""),
            tuple(int(h) for h in raw.get("per_tensor") or ()),
            int(raw.get("traced_tensors") or 0),
        )


def _rule(raw: Any) -> tuple[str, float, bool, int] | None:
    if not raw:
        return None
    act, sigma, gated, in_features = raw
    return str(act), float(sigma), bool(gated), int(in_features)


def traced_layers(config_dict: dict[str, Any]) -> tuple[int, int]:
    """(layers traced, layers of the model): at most ``unroll.TRACED_LAYERS``."""
    from vramcalc.trace.steptrace import config_layers
    from vramcalc.trace.unroll import TRACED_LAYERS

    total = config_layers(config_dict)
    return min(total, TRACED_LAYERS), total


def trace_recipe(config_dict: dict[str, Any], plan: TrainingPlan, point: TracePoint) -> RecipeTrace:
    """Trace the recipe of ``plan`` at ``point`` (torch; a second or more of CPU)."""
    import time

    from vramcalc import progress
    from vramcalc.trace.steptrace import trace_at

    progress.note(
        "tracing the training step of "
        + progress.describe(plan.model, plan.method, plan.quant)
        + f" on fake tensors ({regime_words(config_dict, plan)})"
    )
    started = time.perf_counter()
    micro = min(plan.grad_accum, MAX_TRACED_MICRO_BATCHES)
    layers, total = traced_layers(config_dict)
    traced = _at_point(plan, point).with_(grad_accum=micro)
    trace = trace_at(
        config_dict, traced, steps_to_trace(plan), layers, outlier_columns=point.outliers
    )
    index: dict[Size, int] = {}
    sizes: list[Size] = []
    by_handle: dict[int, int] = {}
    events: list[tuple[int, int, int]] = []
    tags: list[int] = []
    per_tensor = set(trace.per_tensor)
    kept_before = [0] * (len(trace.events) + 1)  # event position -> position among the kept
    for k, ((op, handle, nbytes), shape) in enumerate(zip(trace.events, trace.shapes, strict=True)):
        kept_before[k] = len(events)
        if op == ALLOC and shape is not None and shape[0] == "bnb":
            continue  # a bitsandbytes state: the rule makes them again at the slot
        if op == ALLOC and handle in per_tensor:  # constant at every size of the recipe
            by_handle[handle] = _constant(index, sizes, nbytes)
            events.append((op, handle, by_handle[handle]))
        elif op == ALLOC:
            size = decode_size(shape, nbytes, point)
            if size not in index:
                index[size] = len(sizes)
                sizes.append(size)
            by_handle[handle] = index[size]
            events.append((op, handle, index[size]))
        else:
            events.append((op, handle, by_handle.get(handle, _constant(index, sizes, nbytes))))
        tags.append(trace.tags[k] if trace.tags else -1)
    kept_before[len(trace.events)] = len(events)
    markers = tuple((label, kept_before[at]) for label, at in trace.markers)
    slots = tuple((kept_before[at], tensor, embedding) for at, tensor, embedding in trace.bnb_slots)
    params = tuple(
        (name, tuple(_param_dim(d, point) for d in shape), dtype, trainable, kbit)
        for name, shape, dtype, trainable, kbit in trace.params
    )
    return RecipeTrace(
        point,
        micro,
        tuple(sizes),
        tuple(events),
        tuple(tags),
        markers,
        params,
        trace.param_layers,
        trace.num_layers,
        total,
        time.perf_counter() - started,
        tuple(trace.outlier_rule) if trace.outlier_rule else None,  # type: ignore[arg-type]
        slots,
        plan.optimizer,
        trace.per_tensor,
        trace.traced_tensors,
    )


def _constant(index: dict[Size, int], sizes: list[Size], nbytes: int) -> int:
    size: Size = (nbytes, ())
    if size not in index:
        index[size] = len(sizes)
        sizes.append(size)
    return index[size]


def _param_dim(value: int, point: TracePoint) -> Size:
    if value == point.rank:
        return (1, (("r", 0, 1, 1),))
    if value and value % point.rank == 0:
        return (value // point.rank, (("r", 0, 1, 1),))
    return (value, ())


def _at_point(plan: TrainingPlan, point: TracePoint) -> TrainingPlan:
    changes: dict[str, Any] = {"batch_size": point.batch, "seq_len": point.seq}
    if plan.method == "adalora":
        changes["init_rank"] = point.rank
    elif plan.uses_adapters:
        changes["rank"] = point.rank
    return plan.with_(**changes)


# -- cached ----------------------------------------------------------------------------------
# what a recipe does not depend on: the variables, the world, the allocator (replayed apart)
# (alpha only scales values: peft multiplies by alpha / r whatever it is)
_NOT_RECIPE = ("batch_size", "seq_len", "rank", "alpha", "init_rank", "grad_accum", "num_gpus",
               "strategy", "cpu_offload", "allocator", "model")  # fmt: skip


def recipe_key(config_dict: dict[str, Any], plan: TrainingPlan, point: TracePoint) -> str:
    from dataclasses import fields

    from vramcalc.inventory import library_versions

    recipe = {f.name: getattr(plan, f.name) for f in fields(plan) if f.name not in _NOT_RECIPE}
    payload = {
        "v": RECIPE_VERSION,
        "config": config_dict,
        "recipe": recipe,
        "micro_batches": min(plan.grad_accum, MAX_TRACED_MICRO_BATCHES),
        "point": [point.batch, point.seq, point.rank, point.outliers],
        "libs": library_versions(),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


_MEMO: OrderedDict[str, RecipeTrace] = OrderedDict()
_MEMO_MAX = 8


def _folder() -> Path:
    from vramcalc.cache import cache_dir

    return cache_dir("recipes")


def plan_steps(
    config_dict: dict[str, Any], plan: TrainingPlan, steps: int, labelled: bool = False
) -> StepTrace:
    """``steps`` optimizer steps of ``plan``, every layer: from its recipe's trace (traced
    once per recipe) where the plan's regime has one, else traced for the plan itself.
    ``labelled``: with every event's layer tag and the phase markers (``unroll.expand``)."""
    from vramcalc.trace import unroll
    from vramcalc.trace.steptrace import trace_steps

    trace = recipe_trace(config_dict, plan)
    if trace is not None and trace.answers(plan):
        try:
            return unroll.expand(
                trace.instantiate(plan), steps, trace.model_layers, labelled=labelled
            )
        except unroll.UnrollError:
            pass
    return trace_steps(config_dict, plan, steps=steps, labelled=labelled)


def recipe_trace(
    config_dict: dict[str, Any], plan: TrainingPlan, use_cache: bool = True
) -> RecipeTrace | None:
    """The recipe trace that answers ``plan`` (traced once, then cached in memory and on disk),
    or None when the plan's regime has no trace point."""
    point = trace_point(config_dict, plan)
    if point is None:
        return None
    key = recipe_key(config_dict, plan, point)
    if use_cache and key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    path = _folder() / f"{key}.json"
    trace = None
    if use_cache and path.is_file():
        try:
            trace = RecipeTrace.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            trace = None
    if trace is None:
        trace = trace_recipe(config_dict, plan, point)
        if use_cache:
            _store(path, trace)
    if use_cache:
        _MEMO[key] = trace
        if len(_MEMO) > _MEMO_MAX:
            _MEMO.popitem(last=False)
    return trace


def _store(path: Path, trace: RecipeTrace) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(trace.to_json(), separators=(",", ":")))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs time
