"""What ``vramcalc plan`` computes: memory, GPU fit, speed and (optionally) run cost.

One call, one frozen result; ``render.render_plan_result`` turns it into text
and ``PlanResult.to_dict`` into the ``--json`` object.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from typing import Any

from vramcalc.catalog import Gpu, find_gpu, load_gpus
from vramcalc.checks import plan_warnings
from vramcalc.cost import CostTable, RunLength, check_price, cost_table
from vramcalc.errors import VramcalcError
from vramcalc.estimate import MemoryEstimate, Prepared, prepare
from vramcalc.plan import TrainingPlan
from vramcalc.throughput import ThroughputEstimate, estimate_throughput


@dataclass(frozen=True)
class GpuFit:
    """Whether one GPU holds the plan, with the headroom left (negative if not)."""

    gpu: Gpu
    fits: bool
    headroom_bytes: int
    throughput: ThroughputEstimate | None
    throughput_error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.gpu.name,
            "memory_bytes": self.gpu.memory_bytes,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "tokens_per_second": self.throughput.tokens_per_second if self.throughput else None,
            "step_seconds": self.throughput.step_seconds if self.throughput else None,
            "mfu": self.throughput.mfu if self.throughput else None,
            "throughput_error": self.throughput_error,
        }


@dataclass(frozen=True)
class PlanResult:
    memory: MemoryEstimate
    fits: tuple[GpuFit, ...]
    cost: CostTable | None
    hints: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # vramcalc.checks.plan_warnings

    def to_dict(self) -> dict[str, Any]:
        data = self.memory.to_dict()
        data["gpus"] = [fit.to_dict() for fit in self.fits]
        data["throughput"] = [fit.throughput.to_dict() for fit in self.fits if fit.throughput]
        data["cost"] = self.cost.to_dict() if self.cost else None
        data["hints"] = list(self.hints)
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
    fits = []
    for gpu in gpus:
        throughput, problem = None, None
        try:
            throughput = estimate_throughput(inventory, plan, gpu)
        except VramcalcError as err:
            problem = str(err)
        headroom = gpu.memory_bytes - memory.device_total_bytes
        fits.append(GpuFit(gpu, headroom >= 0, headroom, throughput, problem))
    cost = None
    if run is not None:
        fitting = [f.gpu for f in fits if f.fits]
        cost = cost_table(inventory, plan, fitting, run, price_per_hour_usd)
    warnings = plan_warnings(plan, inventory, given)
    return PlanResult(memory, tuple(fits), cost, tuple(_hints(memory, prepared)), warnings)


def _hints(memory: MemoryEstimate, prepared: Prepared) -> list[str]:
    """Cheap what-ifs worth telling the user (each is another pure estimate on the same inventory)."""
    from vramcalc.render import gib

    plan, out = memory.plan, []
    if (
        not plan.gradient_checkpointing
        and memory.components["activations"] > 0.4 * memory.device_total_bytes
    ):
        other = prepared.estimate(plan.with_(gradient_checkpointing=True))
        out.append(
            f"activations are {100 * memory.components['activations'] / memory.device_total_bytes:.0f} % of the "
            f"total; --gradient-checkpointing brings the device total from {gib(memory.device_total_bytes)} "
            f"to {gib(other.device_total_bytes)} (one more forward per step)"
        )
    return out
