"""What ``vramcalc plan`` computes: memory, GPU fit, speed and (optionally) run cost.

One call, one frozen result (no text: ``render.render_plan_result`` writes it)
and ``PlanResult.to_dict`` into the ``--json`` object.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass, replace
from typing import Any

from vramcalc.budget import DEFAULT_HEADROOM, judge
from vramcalc.catalog import Gpu, find_gpu, load_gpus
from vramcalc.checks import plan_warnings
from vramcalc.configs import FilePlan
from vramcalc.estimate import MemoryEstimate, Prepared, prepare
from vramcalc.speed.cost import CostTable, RunLength, check_price, run_cost
from vramcalc.speed.throughput import ThroughputEstimate, plan_speed
from vramcalc.training_plan import TrainingPlan


@dataclass(frozen=True)
class GpuFit:
    """Whether one GPU holds the plan (``budget.judge``), and its speed there."""

    gpu: Gpu
    fits: bool  # the device total is within the budget and the card can run the recipe
    headroom_bytes: int  # the budget left beyond the device total (negative: short by)
    throughput: ThroughputEstimate | None
    throughput_error: str | None
    blocker: str | None = None  # why the card cannot run the recipe at all (checks.recipe_blocker)
    budget_bytes: int | None = None  # GPU memory less the headroom (None: the whole memory)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.gpu.name,
            "memory_bytes": self.gpu.memory_bytes,
            "budget_bytes": self.budget_bytes,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "blocked_by": self.blocker,
            "tokens_per_second": self.throughput.tokens_per_second if self.throughput else None,
            "tokens_per_second_all_gpus": (
                self.throughput.tokens_per_second_all_gpus if self.throughput else None
            ),
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
    headroom: float = DEFAULT_HEADROOM  # the fraction of each GPU's memory kept free
    source: FilePlan | None = None  # the config file the plan was read from (--from)

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
        data["headroom"] = self.headroom
        data["from_file"] = self.source.to_dict() if self.source else None
        return data


def choose_gpus(names: Iterable[str | Gpu] | None) -> list[Gpu]:
    """``--gpu`` values (names, aliases or ``Gpu``; comma-separated names allowed), or the
    whole catalog when none is given."""
    chosen: list[Gpu] = []
    for name in names or ():
        if isinstance(name, Gpu):
            chosen.append(name)
        else:
            chosen += [find_gpu(part.strip()) for part in name.split(",") if part.strip()]
    return chosen or list(load_gpus())


def plan_result(
    plan: TrainingPlan,
    gpus: list[Gpu],
    run: RunLength | None = None,
    price_per_hour_usd: float | None = None,
    given: Set[str] = frozenset(),
    headroom: float = DEFAULT_HEADROOM,
    source: FilePlan | None = None,
    allocator_model: str | None = None,
) -> PlanResult:
    """Memory of ``plan``, its fit (``budget.judge``) and speed on each of ``gpus``, and the
    run's cost on those that fit. ``source``: the config file the plan was read from (its
    checkpointing note replaces the plan's own)."""
    check_price(price_per_hour_usd)
    prepared = prepare(plan.model, plan)
    inventory = prepared.inventory
    memory = prepared.estimate(plan, allocator_model)
    speed = plan_speed(prepared.spec.config_dict, inventory, plan)
    fits = []
    for gpu in gpus:
        verdict = judge(memory.device_total_bytes, gpu, headroom, plan)
        throughput, problem = (None, verdict.blocker) if verdict.blocker else speed.on(gpu)
        fits.append(
            GpuFit(
                gpu,
                verdict.fits,
                verdict.margin_bytes,
                throughput,
                problem,
                verdict.blocker,
                verdict.budget_bytes,
            )
        )
    cost = None
    if run is not None:
        cost = run_cost(speed, [f.gpu for f in fits if f.fits], run, price_per_hour_usd)
    warnings = plan_warnings(plan, inventory, given)
    result = PlanResult(
        memory, tuple(fits), cost, tuple(_hints(memory, prepared)), warnings, headroom, source
    )
    note = source.checkpointing_note(plan) if source else None
    return result.with_assumption(plan.checkpointing_note, note) if note else result


def _hints(memory: MemoryEstimate, prepared: Prepared) -> list[Hint]:
    """Cheap what-ifs worth telling the user (each is another pure estimate on the same inventory)."""
    plan, total, out = memory.plan, memory.device_total_bytes, []
    share = memory.components["activations"] / total
    if not plan.gradient_checkpointing and share > 0.4:
        other = prepared.estimate(plan.with_(gradient_checkpointing=True))
        out.append(Hint("--gradient-checkpointing", share, total, other.device_total_bytes))
    return out
