"""The work of one training step, op by op: counted on the recipe's real model code.

Speed is priced op by op (``throughput.py``), so the ops are counted, not guessed.
``trace_profile`` traces the recipe's step on fake tensors (``optrace.py``: the real
transformers + peft model with two decoder layers, what HF Trainer runs for one micro-batch
and one optimizer step; ``oprecorder.py``: every op's FLOPs, bytes, kernel, Python caller,
layer and phase; ``kbit_ops.py``: what runs differently on a GPU, from the sources) and
keeps it as an ``OpProfile``:

* ``Op``: one kind of op at one place of the step, its FLOPs and bytes as coefficients of
  (1, T, T·S, c, T·c) for T = batch·seq tokens and c int8 outlier columns (the step is traced
  at one prime sequence length, so the powers of that prime in each tensor tell them apart);
* ``Run``: ops in program order, done once or once per decoder layer after the first (the
  second traced layer), identical ops between two syncs merged;
* the parameter tensors per layer and, for bitsandbytes optimizers, every trainable tensor.

Profiles do not depend on batch or sequence length: ``op_profile`` traces each recipe once
and caches it in memory and on disk (``vramcalc.cache``, folder ``opprofile``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from vramcalc import progress
from vramcalc.cache import cache_dir
from vramcalc.errors import VramcalcError
from vramcalc.inventory import library_versions
from vramcalc.trace.fakemodel import frozen_heap
from vramcalc.trace.oprecorder import (
    OpEvent,
    Vector,
)
from vramcalc.trace.optrace import (  # the tracer imports torch only when it runs
    TRACE_PRIMES,
    TRACED_LAYERS,
    BnbOptimizerParam,
    ProfileError,
    trace_events,
)
from vramcalc.training_plan import TrainingPlan

PROFILE_VERSION = 9
PHASES = ("forward", "recompute", "backward", "optimizer")


def int8_outlier_columns(in_features: int, p: float, tokens: int) -> float:
    """Expected input columns of ``tokens`` rows with at least one |x| >= 6 (``c``)."""
    if p <= 0.0 or tokens <= 0:
        return 0.0
    return in_features * -math.expm1(tokens * math.log1p(-p))


@dataclass(frozen=True)
class Op:
    """One kind of op at one place of the step, ``count`` times there."""

    name: str
    kind: str  # MATMUL, MATMUL_FP32, INT8_MATMUL, ATTENTION, MEMORY (bandwidth-bound), LAUNCH
    phase: str  # forward, recompute, backward, optimizer
    count: int
    flops: Vector  # per op, coefficients of (1, T, T·S, c, T·c)
    bytes: Vector  # read + written, same features
    host: float = 1.0  # host dispatches (0: the layer share of an op over every parameter)
    python: float = 1.0  # Python-level calls it starts (0: dispatched by C++, or by the same call)
    outlier_p: float = 0.0  # int8: chance that one input element is an |x| >= 6 outlier
    outlier_in: int = 0  # int8: input columns; c = in·(1 - (1 - p)^T)
    sync: bool = False  # the host waits for the GPU after this op
    # coefficients per unit of LoRA rank r and of r^2, the same features (empty: none);
    # ``at_rank`` folds them into ``flops`` / ``bytes``
    rank_flops: tuple[Vector, ...] = ()
    rank_bytes: tuple[Vector, ...] = ()

    def at_rank(self, rank: int) -> Op:
        """This op at LoRA rank ``rank`` (its rank terms folded into flops and bytes)."""
        if not self.rank_flops and not self.rank_bytes:
            return self

        def fold(base: Vector, terms: tuple[Vector, ...]) -> Vector:
            out = list(base)
            for power, term in enumerate(terms, 1):
                for i, value in enumerate(term):
                    out[i] += value * rank**power
            return tuple(out)

        return replace(
            self,
            flops=fold(self.flops, self.rank_flops),
            bytes=fold(self.bytes, self.rank_bytes),
            rank_flops=(),
            rank_bytes=(),
        )


@dataclass(frozen=True)
class Run:
    """Ops in program order; ``repeat`` "layers": once per decoder layer after the first."""

    repeat: str  # "once" or "layers"
    ops: tuple[Op, ...]


@dataclass(frozen=True)
class OpProfile:
    """One micro-batch and one optimizer step of a recipe, as ops."""

    micro_batch: tuple[Run, ...]
    optimizer: tuple[Run, ...]
    bnb_params: tuple[BnbOptimizerParam, ...]  # empty unless a bitsandbytes optimizer
    params_total: tuple[int, int, int]  # parameter tensors: outside layers, first, each other
    params_trainable: tuple[int, int, int]
    trace_seq: int = TRACE_PRIMES[0]

    def at_rank(self, rank: int, optimizer: str) -> OpProfile:
        """The profile at LoRA rank ``rank`` (a profile traced at a prime rank holds every
        rank's FLOPs and bytes as coefficients of r and r^2)."""

        def runs(items: tuple[Run, ...]) -> tuple[Run, ...]:
            return tuple(Run(r.repeat, tuple(op.at_rank(rank) for op in r.ops)) for r in items)

        return replace(
            self,
            micro_batch=runs(self.micro_batch),
            optimizer=runs(self.optimizer),
            bnb_params=tuple(p.at_rank(rank, optimizer) for p in self.bnb_params),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OpProfile:
        def runs(raw: list[dict[str, Any]]) -> tuple[Run, ...]:
            return tuple(
                Run(
                    r["repeat"],
                    tuple(
                        Op(
                            **{
                                **o,
                                "flops": tuple(o["flops"]),
                                "bytes": tuple(o["bytes"]),
                                "rank_flops": tuple(tuple(v) for v in o.get("rank_flops", ())),
                                "rank_bytes": tuple(tuple(v) for v in o.get("rank_bytes", ())),
                            }
                        )
                        for o in r["ops"]
                    ),
                )
                for r in raw
            )

        def triple(raw: list[int]) -> tuple[int, int, int]:
            return int(raw[0]), int(raw[1]), int(raw[2])

        return cls(
            runs(data["micro_batch"]),
            runs(data["optimizer"]),
            tuple(BnbOptimizerParam(**p) for p in data["bnb_params"]),
            triple(data["params_total"]),
            triple(data["params_trainable"]),
            int(data["trace_seq"]),
        )

    def tensor_count(self, num_layers: int, trainable: bool) -> int:
        """Parameter tensors of the model with ``num_layers`` decoder layers."""
        outside, first, other = self.params_trainable if trainable else self.params_total
        return outside + (first if num_layers else 0) + max(num_layers - 1, 0) * other


# -- events -> runs ------------------------------------------------------------------------------
def _ops(events: list[OpEvent]) -> list[tuple[int, Op]]:
    def terms(vectors: tuple[Vector, ...]) -> tuple[Vector, ...]:
        return vectors if any(any(v) for v in vectors) else ()

    return [
        (
            e.layer,
            Op(
                e.name,
                e.kind,
                e.phase,
                1,
                e.flops,
                e.bytes,
                e.host,
                e.python,
                e.outlier[0],
                e.outlier[1],
                e.sync,
                terms(e.rank_flops),
                terms(e.rank_bytes),
            ),
        )
        for e in events
    ]


def _runs(ops: list[tuple[int, Op]]) -> tuple[Run, ...]:
    """Consecutive ops of the second traced layer form a run repeated per layer; the rest runs
    once. Within a run, identical ops between two syncs are merged (their order there does not
    change the time)."""
    runs: list[Run] = []
    stretch: dict[Op, int] = {}
    current: list[Op] = []
    repeat: str | None = None

    def close_stretch() -> None:
        current.extend(replace(op, count=n) for op, n in stretch.items())
        stretch.clear()

    for layer, op in ops:
        kind = "layers" if layer == 1 else "once"
        if kind != repeat:
            close_stretch()
            if current and repeat is not None:
                runs.append(Run(repeat, tuple(current)))
            current, repeat = [], kind
        stretch[op] = stretch.get(op, 0) + 1
        if op.sync:
            close_stretch()
    close_stretch()
    if current and repeat is not None:
        runs.append(Run(repeat, tuple(current)))
    return tuple(runs)


@frozen_heap()
def trace_profile(
    config_dict: dict[str, Any], plan: TrainingPlan, rank_prime: int = 0
) -> OpProfile:
    """Trace the recipe of ``plan`` (its sizes do not matter) into an ``OpProfile``; with
    ``rank_prime`` (the plan's rank, a prime) one that answers every rank (``at_rank``)."""
    try:
        micro_batch, optimizer, (bnb, counts, layers, prime) = trace_events(
            config_dict, plan, rank_prime
        )
    except VramcalcError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the model code: no profile
        raise ProfileError(
            f"the training step of this recipe could not be traced ({type(err).__name__}: {err})"
        ) from err
    if layers != TRACED_LAYERS:
        raise ProfileError(f"traced {layers} decoder layers, expected {TRACED_LAYERS}")
    # the optimizer step has no syncs: group its ops by layer, order does not matter
    optimizer_ops = sorted(_ops(optimizer), key=lambda item: item[0] == 1)
    return OpProfile(
        _runs(_ops(micro_batch)), _runs(optimizer_ops), bnb, counts[0], counts[1], prime
    )


def profile_key(config_dict: dict[str, Any], plan: TrainingPlan) -> str:
    """Everything that changes a profile: the config, the recipe (not its sizes, nor the rank
    where a prime rank traces them all), versions."""
    recipe = _recipe(plan, traced_rank(config_dict, plan)).to_dict()
    recipe.pop("model", None)
    payload = {
        "v": PROFILE_VERSION,
        "config": config_dict,
        "recipe": recipe,
        "libs": library_versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :32
    ]


# the LoRA rank profiles are traced at: primes, the first that divides no number of the config
# (and none of TRACE_PRIMES); every other rank is read from its powers (OpProfile.at_rank)
TRACE_RANKS = (223, 211, 199, 197, 193, 191, 181)


def traced_rank(config_dict: dict[str, Any], plan: TrainingPlan) -> int:
    """The rank ``plan``'s recipe is profiled at (0: no adapters, or no prime fits)."""
    if not plan.uses_adapters:
        return 0
    numbers = _config_numbers(config_dict)
    for q in TRACE_RANKS:
        if q >= plan.target_rank and all(n % q for n in numbers):
            return q
    return 0


def _config_numbers(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [abs(value)] if value else []
    if isinstance(value, dict):
        return [n for v in value.values() for n in _config_numbers(v)]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _config_numbers(v)]
    return []


def _recipe(plan: TrainingPlan, rank: int = 0) -> TrainingPlan:
    """The plan with what does not change the ops per micro-batch set to one value (and the
    adapters' rank to ``rank``, the traced prime, when given)."""
    changes: dict[str, Any] = {}
    if rank and plan.method == "adalora":
        changes["init_rank"] = rank
    elif rank:
        changes["rank"] = rank
        changes["alpha"] = None
    return plan.with_(
        seq_len=TRACE_PRIMES[0],
        batch_size=1,
        grad_accum=1,
        num_gpus=1,
        strategy="ddp",
        cpu_offload=False,
        allocator="default",
        **changes,
    )


@functools.lru_cache(maxsize=256)
def _cached(key: str, config_json: str, recipe: TrainingPlan, rank: int) -> OpProfile:
    path = cache_dir("opprofile") / f"{key}.json"
    if path.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return OpProfile.from_json(json.loads(path.read_text()))
    progress.note(
        "tracing the op profile of "
        + progress.describe(recipe.model, recipe.method, recipe.quant)
        + " for its speed (once per recipe)"
    )
    profile = trace_profile(json.loads(config_json), recipe, rank)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(profile.to_json()))
        tmp.replace(path)
    return profile


def profile_cached(config_dict: dict[str, Any], plan: TrainingPlan) -> bool:
    """Whether ``plan``'s recipe has its profile on disk (no trace needed, no torch import)."""
    return (cache_dir("opprofile") / f"{profile_key(config_dict, plan)}.json").is_file()


def op_profile(config_dict: dict[str, Any], plan: TrainingPlan) -> OpProfile:
    """The ``OpProfile`` of ``plan``'s recipe at its rank: traced once per recipe (any rank),
    then cached in memory and on disk (``vramcalc.cache``, same key rules as the inventory)."""
    config_json = json.dumps(config_dict, sort_keys=True)
    rank = traced_rank(config_dict, plan)
    profile = _cached(profile_key(config_dict, plan), config_json, _recipe(plan, rank), rank)
    return profile.at_rank(plan.adapter_rank, plan.optimizer) if rank else profile
