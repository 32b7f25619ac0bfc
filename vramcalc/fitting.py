"""The largest batch / sequence that fits a GPU (``vramcalc fit``).

Whether one plan fits is ``budget.judge`` (device total within the GPU's memory less the
headroom). ``max_batch_size`` and ``max_seq_len`` answer the inverse question with the one
monotone search (``search.py``) on the estimator: double until the plan no longer fits, then
bisect. The answer fits and the next step (batch + 1, sequence + one multiple) does not;
both estimates are returned so the boundary can be shown and checked.
"""

from __future__ import annotations

from collections.abc import Callable, Set
from dataclasses import dataclass, replace
from typing import Any

from vramcalc.budget import DEFAULT_HEADROOM, budget_bytes, judge
from vramcalc.catalog import Gpu, ModelSpec
from vramcalc.checks import plan_warnings, require_runnable
from vramcalc.configs import FilePlan
from vramcalc.errors import InvalidPlanError
from vramcalc.estimate import MemoryEstimate, default_allocator_model, prepare
from vramcalc.search import largest_fitting
from vramcalc.training_plan import TrainingPlan

MAX_BATCH_SIZE = 1 << 20  # searched no further (a "limit reached" answer)
MAX_SEQ_LEN = 1 << 20  # for configs that state no context length


@dataclass(frozen=True)
class Probe:
    """One estimate the search made: the plan's value of the searched field."""

    value: int
    estimate: MemoryEstimate
    fits: bool

    def to_dict(self) -> dict[str, Any]:
        est = self.estimate
        return {
            "batch_size": est.plan.batch_size,
            "seq_len": est.plan.seq_len,
            "fits": self.fits,
            "device_total_bytes": est.device_total_bytes,
            "peak_reserved_bytes": est.peak_reserved_bytes,
            "peak_allocated_bytes": est.peak_allocated_bytes,
            "peak_phase": est.peak_phase,
        }


@dataclass(frozen=True)
class FitResult:
    """The largest value of ``field`` ("batch_size" or "seq_len") that fits ``gpu``.

    ``best`` is ``None`` when even the smallest value (batch 1, one sequence
    step) does not fit; ``first_too_large`` is the probe one step above
    ``best`` (``None`` when the search stopped at ``limit`` still fitting).
    """

    field: str
    step: int
    limit: int
    gpu: Gpu
    headroom: float
    budget_bytes: int
    best: Probe | None
    first_too_large: Probe | None
    estimates_made: int
    warnings: tuple[str, ...] = ()  # vramcalc.checks.plan_warnings of the plan searched from
    source: FilePlan | None = None  # the config file the plan was read from (--from)

    @property
    def found(self) -> bool:
        return self.best is not None

    @property
    def value(self) -> int | None:
        return self.best.value if self.best else None

    @property
    def limit_reached(self) -> bool:
        return self.best is not None and self.first_too_large is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; byte fields exact, named like ``plan --json``'s."""
        shown = self.best or self.first_too_large
        return {
            "field": self.field,
            "value": self.value,
            "found": self.found,
            "step": self.step,
            "limit": self.limit,
            "limit_reached": self.limit_reached,
            "gpu": self.gpu.name,
            "gpu_memory_bytes": self.gpu.memory_bytes,
            "headroom": self.headroom,
            "budget_bytes": self.budget_bytes,
            "model": shown.estimate.model_name if shown else None,
            "plan": shown.estimate.plan_dict() if shown else None,
            "at_value": self.best.to_dict() if self.best else None,
            "at_next_step": self.first_too_large.to_dict() if self.first_too_large else None,
            "estimates_made": self.estimates_made,
        }


SEARCHED = ("batch_size", "seq_len")


def fit_plan(
    plan: TrainingPlan,
    gpu: Gpu,
    headroom: float = DEFAULT_HEADROOM,
    *,
    search: str = "batch_size",
    seq_multiple: int = 64,
    given: Set[str] = frozenset(),
    source: FilePlan | None = None,
    allocator_model: str | None = None,
) -> FitResult:
    """``vramcalc fit``: the largest ``search`` (``batch_size`` at the plan's sequence length,
    or ``seq_len`` at its batch size) that fits ``gpu``, with the plan's warnings (``given``:
    the options set explicitly) and the config file it came from."""
    if search not in SEARCHED:
        raise InvalidPlanError([f"search {search!r} is not one of {', '.join(SEARCHED)}."])
    inventory = prepare(plan.model, plan).inventory  # an unknown model fails before the GPU
    warnings = plan_warnings(plan, inventory, given, searched=search)
    if search == "seq_len":
        result = max_seq_len(
            plan, gpu, headroom, multiple=seq_multiple, allocator_model=allocator_model
        )
    else:
        result = max_batch_size(plan, gpu, headroom, allocator_model=allocator_model)
    return replace(result, warnings=warnings, source=source)


def max_batch_size(
    plan: TrainingPlan,
    gpu: Gpu,
    headroom: float = DEFAULT_HEADROOM,
    spec: ModelSpec | None = None,
    limit: int = MAX_BATCH_SIZE,
    allocator_model: str | None = None,
) -> FitResult:
    """The largest ``batch_size`` at ``plan.seq_len`` whose estimate fits ``gpu``."""
    return _search(
        plan,
        gpu,
        headroom,
        spec,
        "batch_size",
        step=1,
        limit=limit,
        allocator_model=allocator_model,
    )


def max_seq_len(
    plan: TrainingPlan,
    gpu: Gpu,
    headroom: float = DEFAULT_HEADROOM,
    spec: ModelSpec | None = None,
    multiple: int = 64,
    limit: int | None = None,
    allocator_model: str | None = None,
) -> FitResult:
    """The longest ``seq_len`` (a multiple of ``multiple``) at ``plan.batch_size`` that fits.

    ``limit`` defaults to the model's context length (``max_position_embeddings``).
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple <= 0:
        raise InvalidPlanError([f"--seq-multiple must be a positive integer, got {multiple!r}."])
    prepared = prepare(spec or plan.model, plan)
    limit = limit or prepared.inventory.context_length or MAX_SEQ_LEN
    if limit < multiple:
        raise InvalidPlanError(
            [f"--seq-multiple {multiple} exceeds the model's context length {limit}."]
        )
    return _search(
        plan, gpu, headroom, prepared.spec, "seq_len", step=multiple, limit=limit,
        allocator_model=allocator_model,
    )  # fmt: skip


def _search(
    plan: TrainingPlan,
    gpu: Gpu,
    headroom: float,
    spec: ModelSpec | None,
    field: str,
    step: int,
    limit: int,
    allocator_model: str | None = None,
) -> FitResult:
    require_runnable(plan, gpu)
    prepared = prepare(spec or plan.model, plan)  # batch and sequence share the inventory
    budget = budget_bytes(gpu, headroom)
    model = default_allocator_model()
    made = 0

    def prober(allocator_model: str) -> Callable[[int], Probe]:
        probes: dict[int, Probe] = {}

        def probe(units: int) -> Probe:
            nonlocal made
            if units not in probes:
                candidate = plan.with_(**{field: units * step})
                est = prepared.estimate(candidate, allocator_model)
                verdict = judge(est.device_total_bytes, gpu, headroom)
                probes[units] = Probe(units * step, est, verdict.fits)
                made += 1
            return probes[units]

        return probe

    # every probe is the plan's own estimate (its run simulated: one trace per recipe, then a
    # replay per probe), so the boundary is the one `plan` draws
    best, too_large = largest_fitting(prober(allocator_model or model), limit // step)
    return FitResult(field, step, limit, gpu, headroom, budget, best, too_large, made)
