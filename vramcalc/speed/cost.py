"""Wall time and money of a whole run, per GPU type.

Optimizer steps, as HF Trainer counts them for packed sequences of
``--seq-len`` tokens::

    sequences            = ceil(dataset_tokens / seq_len)
    micro-batches/epoch  = ceil(sequences / (batch_size x num_gpus))   on each GPU
    steps/epoch          = ceil(micro-batches / grad_accum)
    steps                = ceil(epochs x steps/epoch)                   (or --steps)

``wall_seconds = steps x step_seconds`` (``throughput.py``),
``gpu_hours = wall_seconds / 3600 x num_gpus``,
``cost_usd = gpu_hours x price_per_hour_usd`` where the price is per GPU-hour:
the catalog's (``data/gpus.csv``, with its source and date) or
``--price-per-hour``. The last, partial micro-batch is priced as a full one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vramcalc.catalog import Gpu
from vramcalc.errors import InvalidPlanError, VramcalcError
from vramcalc.limits import MAX_COUNT, count_problem
from vramcalc.speed.throughput import (
    PlanSpeed,
    ThroughputCalibration,
    ThroughputEstimate,
    Work,
    estimate_throughput,
)
from vramcalc.training_plan import TrainingPlan

#: Per-GPU sweep columns, each followed by ``_<GPU name>`` (see ``CostTable.columns``): the
#: speed ones (``SPEED_PREFIXES``), then the run's.
SPEED_PREFIXES = (
    "tokens_per_second",
    "tokens_per_second_all_gpus",
    "step_seconds",
    "mfu",
    "bound",
    "speed_measured",
)
COLUMN_PREFIXES = (*SPEED_PREFIXES, "wall_hours", "gpu_hours", "cost_usd")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@dataclass(frozen=True)
class RunLength:
    """How long a run is: ``--dataset-tokens`` x ``--epochs`` (default 1), or ``--steps``."""

    dataset_tokens: int | None = None
    epochs: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.dataset_tokens is not None and self.steps is not None:
            problems.append(
                "--dataset-tokens and --steps both set the run length; give one of them."
            )
        elif self.dataset_tokens is None and self.steps is None:
            problems.append(
                "give --dataset-tokens (with --epochs, default 1) or --steps to price a run."
            )
        if self.dataset_tokens is not None and not _is_positive_int(self.dataset_tokens):
            problems.append(
                f"--dataset-tokens must be a positive whole number of tokens, got {self.dataset_tokens!r}."
            )
        if self.epochs is not None:
            if not _is_positive_number(self.epochs):
                problems.append(f"--epochs must be a positive number, got {self.epochs!r}.")
            elif self.steps is not None:
                problems.append(
                    "--epochs counts passes over --dataset-tokens; with --steps leave it out."
                )
        if self.steps is not None and not _is_positive_int(self.steps):
            problems.append(f"--steps must be a positive whole number, got {self.steps!r}.")
        for flag, count in (("--dataset-tokens", self.dataset_tokens), ("--steps", self.steps)):
            if too_large := count_problem(flag, count):
                problems.append(too_large)
        if not problems and (self.dataset_tokens or 0) * (self.epochs or 1.0) > MAX_COUNT:
            problems.append(
                f"--dataset-tokens x --epochs = {self.dataset_tokens * (self.epochs or 1.0):.3g} "
                "tokens, past any physical meaning: more than int64 counts."
            )
        if problems:
            raise InvalidPlanError(problems)

    def optimizer_steps(self, plan: TrainingPlan) -> int:
        """Optimizer steps of the run under ``plan`` (module docstring)."""
        if self.steps is not None:
            return self.steps
        assert self.dataset_tokens is not None  # checked in __post_init__
        sequences = -(self.dataset_tokens // -plan.seq_len)
        micro_batches = -(sequences // -(plan.batch_size * plan.num_gpus))
        per_epoch = -(micro_batches // -plan.grad_accum)
        return max(math.ceil((self.epochs or 1.0) * per_epoch), 1)  # Trainer's max_steps

    def describe(self, plan: TrainingPlan) -> str:
        steps = self.optimizer_steps(plan)
        tokens = plan.seq_len * plan.batch_size * plan.grad_accum * plan.num_gpus
        if self.steps is not None:
            return f"{steps:,} optimizer steps of {tokens:,} tokens (--steps)"
        epochs = self.epochs or 1.0
        return (
            f"{self.dataset_tokens:,} tokens x {epochs:g} epoch{'s' if epochs != 1 else ''} = "
            f"{steps:,} optimizer steps of {tokens:,} tokens"
        )


def check_price(price_per_hour_usd: float | None) -> float | None:
    """``--price-per-hour`` validated (USD per GPU-hour), or None."""
    if price_per_hour_usd is not None and not _is_positive_number(price_per_hour_usd):
        raise InvalidPlanError(
            [
                f"--price-per-hour must be a positive number of USD per GPU-hour, got {price_per_hour_usd!r}."
            ]
        )
    return None if price_per_hour_usd is None else float(price_per_hour_usd)


@dataclass(frozen=True)
class CostEstimate:
    """Time and money of a run on one GPU type (``num_gpus`` of them)."""

    throughput: ThroughputEstimate
    steps: int
    wall_seconds: float
    gpu_hours: float
    price_per_hour_usd: float | None  # per GPU-hour; None: no catalog price and no override
    price_source: str
    cost_usd: float | None

    @property
    def gpu_name(self) -> str:
        return self.throughput.gpu.name

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all GPUs."""
        plan = self.throughput.plan
        return plan.seq_len * plan.batch_size * plan.grad_accum * plan.num_gpus

    @property
    def tokens_processed(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def wall_hours(self) -> float:
        return self.wall_seconds / 3600

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu_name,
            "num_gpus": self.throughput.plan.num_gpus,
            "steps": self.steps,
            "tokens_per_step": self.tokens_per_step,
            "tokens_processed": self.tokens_processed,
            "step_seconds": self.throughput.step_seconds,
            "tokens_per_second": self.throughput.tokens_per_second,
            "tokens_per_second_all_gpus": self.throughput.tokens_per_second_all_gpus,
            "mfu": self.throughput.mfu,
            "wall_seconds": self.wall_seconds,
            "wall_hours": self.wall_hours,
            "gpu_hours": self.gpu_hours,
            "price_per_hour_usd": self.price_per_hour_usd,
            "price_source": self.price_source,
            "cost_usd": self.cost_usd,
            "bound": self.throughput.bound,
            "measured": self.throughput.measured,
            "efficiency_measured_on": self.throughput.calibration.measured_on_text,
            "derivation": self.throughput.derivation,
        }


def estimate_cost(
    throughput: ThroughputEstimate, run: RunLength, price_per_hour_usd: float | None = None
) -> CostEstimate:
    """Wall time, GPU-hours and dollars of ``run`` at ``throughput``'s step time."""
    override = check_price(price_per_hour_usd)
    gpu = throughput.gpu
    steps = run.optimizer_steps(throughput.plan)
    wall = steps * throughput.step_seconds
    gpu_hours = wall / 3600 * throughput.plan.num_gpus
    if override is not None:
        price, source = override, "--price-per-hour"
    elif gpu.price_per_hour_usd:
        price, source = gpu.price_per_hour_usd, f"{gpu.price_source} ({gpu.price_date})"
    else:
        price, source = None, f"no price for {gpu.name} in data/gpus.csv; pass --price-per-hour"
    cost = gpu_hours * price if price is not None else None
    return CostEstimate(throughput, steps, wall, gpu_hours, price, source, cost)


@dataclass(frozen=True)
class CostTable:
    """One run priced on several GPU types; GPUs that cannot be priced are listed with why."""

    plan: TrainingPlan
    run: RunLength
    rows: tuple[CostEstimate, ...]
    skipped: tuple[tuple[str, str], ...]  # (GPU name, reason)

    def columns(self) -> dict[str, Any]:
        """Flat ``<prefix>_<GPU>`` cells for sweep exports (``COLUMN_PREFIXES``); None if unpriced."""
        out: dict[str, Any] = {"optimizer_steps": self.run.optimizer_steps(self.plan)}
        for row in self.rows:
            values = (
                *speed_cells(row.throughput),
                row.wall_hours,
                row.gpu_hours,
                row.cost_usd,
            )
            out.update(
                {f"{p}_{row.gpu_name}": v for p, v in zip(COLUMN_PREFIXES, values, strict=True)}
            )
        for name, _ in self.skipped:
            out.update(dict.fromkeys((f"{p}_{name}" for p in COLUMN_PREFIXES), None))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": {
                "dataset_tokens": self.run.dataset_tokens,
                "epochs": self.run.epochs,
                "steps": self.run.steps,
                "optimizer_steps": self.run.optimizer_steps(self.plan),
                "description": self.run.describe(self.plan),
            },
            "gpus": [row.to_dict() for row in self.rows],
            "skipped": [{"gpu": name, "reason": reason} for name, reason in self.skipped],
        }


def cost_table(
    work: Work,
    gpus: Iterable[Gpu],
    run: RunLength,
    price_per_hour_usd: float | None = None,
    calibration: ThroughputCalibration | None = None,
) -> CostTable:
    """``run`` priced on every GPU of ``gpus`` (an override price applies to every row)."""
    check_price(price_per_hour_usd)
    rows, skipped = [], []
    for gpu in gpus:
        try:
            throughput = estimate_throughput(work, gpu, calibration)
        except VramcalcError as err:
            skipped.append((gpu.name, str(err)))
            continue
        rows.append(estimate_cost(throughput, run, price_per_hour_usd))
    return CostTable(work.plan, run, tuple(rows), tuple(skipped))


def unpriced_table(
    plan: TrainingPlan, gpus: Iterable[Gpu], run: RunLength, reason: str
) -> CostTable:
    """A run that cannot be priced on any GPU (its speed cannot be predicted), with why."""
    return CostTable(plan, run, (), tuple((gpu.name, reason) for gpu in gpus))


def speed_cells(e: ThroughputEstimate | None) -> tuple[Any, ...]:
    """The ``SPEED_PREFIXES`` cells of one GPU (None where its speed cannot be predicted)."""
    if e is None:
        return (None,) * len(SPEED_PREFIXES)
    return (
        e.tokens_per_second,
        e.tokens_per_second_all_gpus,
        e.step_seconds,
        e.mfu,
        e.bound,
        e.measured,
    )


def run_cost(
    speed: PlanSpeed,
    gpus: Iterable[Gpu],
    run: RunLength,
    price_per_hour_usd: float | None = None,
) -> CostTable:
    """``run`` priced on each of ``gpus`` (those the plan fits), or listed unpriced with why
    when the plan's speed cannot be predicted."""
    if speed.work is None:
        return unpriced_table(speed.plan, gpus, run, speed.problem or "")
    return cost_table(speed.work, gpus, run, price_per_hour_usd)


def throughput_columns(
    speed: PlanSpeed, gpus: Iterable[Gpu], calibration: ThroughputCalibration | None = None
) -> dict[str, Any]:
    """Sweep cells without a run length: ``<prefix>_<GPU>`` for every ``SPEED_PREFIXES``
    (None where the GPU cannot be priced, or the plan's step cannot be traced)."""
    out: dict[str, Any] = {}
    for gpu in gpus:
        estimate, _ = speed.on(gpu, calibration)
        out.update(
            {
                f"{p}_{gpu.name}": v
                for p, v in zip(SPEED_PREFIXES, speed_cells(estimate), strict=True)
            }
        )
    return out
