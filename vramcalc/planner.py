"""What ``vramcalc plan`` computes: memory, GPU fit, speed and (optionally) run cost.

One call, one frozen result (no text: ``render.render_plan_result`` writes it)
and ``PlanResult.to_dict`` into the ``--json`` object.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, replace
from typing import Any

from vramcalc.catalog import Gpu, find_gpu, load_gpus
from vramcalc.checks import plan_warnings, recipe_blocker
from vramcalc.errors import VramcalcError
from vramcalc.estimate import MemoryEstimate, Prepared, prepare
from vramcalc.plan import TrainingPlan
from vramcalc.speed.cost import CostTable, RunLength, check_price, cost_table, unpriced_table
from vramcalc.speed.throughput import ThroughputEstimate, Work, estimate_throughput, plan_work


@dataclass(frozen=True)
class GpuFit:
    """Whether one GPU holds the plan, with the headroom left (negative if not)."""

    gpu: Gpu
    fits: bool  # memory holds the plan and the card can run the recipe
    headroom_bytes: int
    throughput: ThroughputEstimate | None
    throughput_error: str | None
    blocker: str | None = None  # why the card cannot run the recipe at all (checks.recipe_blocker)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.gpu.name,
            "memory_bytes": self.gpu.memory_bytes,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "blocked_by": self.blocker,
            "tokens_per_second": self.throughput.tokens_per_second if self.throughput else None,
            "step_seconds": self.throughput.step_seconds if self.throughput else None,
            "mfu": self.throughput.mfu if self.throughput else None,
            "bound": self.throughput.bound if self.throughput else None,
            "speed_measured": self.throughput.measured if self.throughput else None,
            "throughput_error": self.throughput_error,
        }


@dataclass(frozen=True)
class Hint:
    """An option that would change the device total a lot, with both totals."""

    option: str  # e.g. "--gradient-checkpointing"
    activations_share: float  # of the device total, the reason for the hint
    device_total_bytes: int
    device_total_bytes_with_option: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "option": self.option,
            "activations_share": self.activations_share,
            "device_total_bytes": self.device_total_bytes,
            "device_total_bytes_with_option": self.device_total_bytes_with_option,
        }


@dataclass(frozen=True)
class PlanResult:
    memory: MemoryEstimate
    fits: tuple[GpuFit, ...]
    cost: CostTable | None
    hints: tuple[Hint, ...] = ()
    warnings: tuple[str, ...] = ()  # vramcalc.checks.plan_warnings

    def with_assumption(self, old: str, new: str) -> PlanResult:
        """A copy whose memory estimate states ``new`` where it stated ``old``."""
        lines = tuple(new if line == old else line for line in self.memory.assumptions)
        return replace(self, memory=replace(self.memory, assumptions=lines))

    def to_dict(self) -> dict[str, Any]:
        data = self.memory.to_dict()
        data["gpus"] = [fit.to_dict() for fit in self.fits]
        data["throughput"] = [fit.throughput.to_dict() for fit in self.fits if fit.throughput]
        data["cost"] = self.cost.to_dict() if self.cost else None
        data["hints"] = [hint.to_dict() for hint in self.hints]
        data["warnings"] = list(self.warnings)
        return data


def choose_gpus(names: list[str]) -> list[Gpu]:
    """``--gpu`` values (comma-separated allowed), or the whole catalog when none is given."""
    split = [part.strip() for name in names for part in name.split(",") if part.strip()]
    return [find_gpu(n) for n in split] if split else list(load_gpus())


def plan_result(
    plan: TrainingPlan,
    gpus: list[Gpu],
    run: RunLength | None = None,
    price_per_hour_usd: float | None = None,
    given: Set[str] = frozenset(),
) -> PlanResult:
    """Memory of ``plan``, its fit and speed on each of ``gpus``, and the run's cost on those that fit."""
    check_price(price_per_hour_usd)
    prepared = prepare(plan.model, plan)
    inventory = prepared.inventory
    memory = prepared.estimate(plan)
    work: Work | None = None
    try:
        work, untraced = plan_work(prepared.spec.config_dict, inventory, plan), None
    except VramcalcError as err:  # the recipe's step could not be traced: no speed
        untraced = str(err)
    fits = []
    for gpu in gpus:
        throughput, problem = None, recipe_blocker(plan, gpu) or untraced
        if problem is None and work is not None:
            try:
                throughput = estimate_throughput(work, gpu)
            except VramcalcError as err:
                problem = str(err)
        blocker = recipe_blocker(plan, gpu)
        headroom = gpu.memory_bytes - memory.device_total_bytes
        fits.append(
            GpuFit(gpu, headroom >= 0 and not blocker, headroom, throughput, problem, blocker)
        )
    cost = None
    if run is not None:
        fitting = [f.gpu for f in fits if f.fits]
        cost = (
            cost_table(work, fitting, run, price_per_hour_usd)
            if work is not None
            else unpriced_table(plan, fitting, run, untraced or "")
        )
    warnings = plan_warnings(plan, inventory, given)
    return PlanResult(memory, tuple(fits), cost, tuple(_hints(memory, prepared)), warnings)


def _hints(memory: MemoryEstimate, prepared: Prepared) -> list[Hint]:
    """Cheap what-ifs worth telling the user (each is another pure estimate on the same inventory)."""
    plan, total, out = memory.plan, memory.device_total_bytes, []
    share = memory.components["activations"] / total
    if not plan.gradient_checkpointing and share > 0.4:
        other = prepared.estimate(plan.with_(gradient_checkpointing=True))
        out.append(Hint("--gradient-checkpointing", share, total, other.device_total_bytes))
    return out
