"""What fits on a GPU: the headroom rule, and the largest batch / sequence that fits.

A plan *fits* a GPU when its estimated device total leaves the headroom free::

    device_total_bytes <= floor(gpu.memory_bytes * (1 - headroom))

``max_batch_size`` and ``max_seq_len`` answer the inverse question with a
monotone search on the estimator (memory never shrinks when the batch or the
sequence grows): double until the plan no longer fits, then bisect. The
answer fits and the next step (batch + 1, sequence + one multiple) does not;
both estimates are returned so the boundary can be shown and checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vramcalc.catalog import Gpu, ModelSpec
from vramcalc.checks import recipe_blocker
from vramcalc.errors import InvalidPlanError
from vramcalc.estimate import MemoryEstimate, default_allocator_model, prepare
from vramcalc.plan import TrainingPlan

DEFAULT_HEADROOM = 0.05
MAX_BATCH_SIZE = 1 << 20  # searched no further (a "limit reached" answer)
MAX_SEQ_LEN = 1 << 20  # for configs that state no context length


def parse_headroom(value: str | float) -> float:
    """``"5%"`` or ``0.05`` → 0.05; anything outside [0, 1) is an ``InvalidPlanError``."""
    text = str(value).strip()
    try:
        fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        fraction = math.nan
    if not 0.0 <= fraction < 1.0:  # also rejects nan
        hint = f" (did you mean {text}%?)" if 1.0 <= fraction < 100.0 else ""
        raise InvalidPlanError(
            [
                f"--headroom must be a fraction in [0, 1) or a percentage such as 5%, got {text!r}{hint}."
            ]
        )
    return fraction


def budget_bytes(gpu: Gpu, headroom: float) -> int:
    """The most device memory a plan may use on ``gpu`` leaving ``headroom`` free."""
    return math.floor(gpu.memory_bytes * (1.0 - headroom))


def fits(estimate: MemoryEstimate, gpu: Gpu, headroom: float = 0.0) -> bool:
    """Whether ``estimate`` fits ``gpu`` with ``headroom`` (a fraction) left free."""
    return estimate.device_total_bytes <= budget_bytes(gpu, headroom)


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
            "plan": shown.estimate.plan.to_dict() if shown else None,
            "at_value": self.best.to_dict() if self.best else None,
            "at_next_step": self.first_too_large.to_dict() if self.first_too_large else None,
            "estimates_made": self.estimates_made,
        }


def max_batch_size(
    plan: TrainingPlan,
    gpu: Gpu,
    headroom: float = DEFAULT_HEADROOM,
    spec: ModelSpec | None = None,
    limit: int = MAX_BATCH_SIZE,
) -> FitResult:
    """The largest ``batch_size`` at ``plan.seq_len`` whose estimate fits ``gpu``."""
    return _search(plan, gpu, headroom, spec, "batch_size", step=1, limit=limit)


def max_seq_len(
    plan: TrainingPlan,
    gpu: Gpu,
    headroom: float = DEFAULT_HEADROOM,
    spec: ModelSpec | None = None,
    multiple: int = 64,
    limit: int | None = None,
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
    return _search(plan, gpu, headroom, prepared.spec, "seq_len", step=multiple, limit=limit)


def _search(
    plan: TrainingPlan,
    gpu: Gpu,
    headroom: float,
    spec: ModelSpec | None,
    field: str,
    step: int,
    limit: int,
) -> FitResult:
    blocker = recipe_blocker(plan, gpu)
    if blocker:
        raise InvalidPlanError([f"--gpu {gpu.name}: {blocker.removeprefix('no bf16: ')}."])
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
                probes[units] = Probe(units * step, est, est.device_total_bytes <= budget)
                made += 1
            return probes[units]

        return probe

    # the search runs on the calibrated slack (no step trace per probe); where the
    # allocator is simulated, the boundary is then found again with simulations,
    # starting from there (a few probes: the two models differ by a few per cent)
    best, too_large = largest_fitting(prober("approximate"), limit // step)
    if model != "approximate" and plan.num_gpus == 1:
        hint = best.value // step if best else 1
        best, too_large = largest_fitting_near(prober(model), limit // step, hint)
    return FitResult(field, step, limit, gpu, headroom, budget, best, too_large, made)


def largest_fitting_near(
    probe: Callable[[int], Probe], max_units: int, hint: int
) -> tuple[Probe | None, Probe | None]:
    """``largest_fitting`` starting from a guess ``hint``: gallop away from it, then bisect."""
    hint = min(max(hint, 1), max_units)
    if probe(hint).fits:
        low, distance = hint, 1
        while True:  # up until it does not fit
            if low >= max_units:
                return probe(low), None
            candidate = min(low + distance, max_units)
            if not probe(candidate).fits:
                high = candidate
                break
            low, distance = candidate, 2 * distance
    else:
        high, distance = hint, 1
        while True:  # down until it fits
            candidate = max(high - distance, 1)
            if probe(candidate).fits:
                low = candidate
                break
            if candidate == 1:
                return None, probe(1)
            high, distance = candidate, 2 * distance
    while high - low > 1:
        middle = (low + high) // 2
        if probe(middle).fits:
            low = middle
        else:
            high = middle
    return probe(low), probe(high)


def largest_fitting(
    probe: Callable[[int], Probe], max_units: int
) -> tuple[Probe | None, Probe | None]:
    """Largest ``k`` in ``1..max_units`` with ``probe(k).fits``, for a monotone ``fits``.

    Returns the probes at ``k`` and ``k + 1`` (the latter ``None`` when ``k`` is
    ``max_units``); ``(None, probe(1))`` when nothing fits. O(log k) probes.
    """
    first = probe(1)
    if not first.fits:
        return None, first
    low, high = 1, None
    while high is None:  # double until it does not fit, or the limit
        if low >= max_units:
            return probe(low), None
        candidate = min(2 * low, max_units)
        if probe(candidate).fits:
            low = candidate
        else:
            high = candidate
    while high - low > 1:  # bisect: probe(low) fits, probe(high) does not
        middle = (low + high) // 2
        if probe(middle).fits:
            low = middle
        else:
            high = middle
    return probe(low), probe(high)
