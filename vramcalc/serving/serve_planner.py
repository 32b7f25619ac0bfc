"""What ``vramcalc serve`` answers: memory, the GPUs it fits with their speed, and (``--fit``)
the largest batch or context that fits one GPU. One call, one frozen result; no text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vramcalc.catalog import Gpu
from vramcalc.errors import InvalidPlanError, VramcalcError
from vramcalc.memory.overhead import Calibration, load_calibration
from vramcalc.serve_plan import ServePlan
from vramcalc.serving.serve import ServeMemory, ServeModel, estimate_serve_memory, prepare_serving
from vramcalc.serving.serve_speed import ServeSpeed, estimate_serve_speed
from vramcalc.speed.throughput import load_throughput_calibration

FIT_TARGETS = ("batch", "context")
MAX_BATCH = 4096


@dataclass(frozen=True)
class ServeFit:
    """Whether one GPU holds the plan, its headroom, and its predicted speed."""

    gpu: Gpu
    fits: bool
    headroom_bytes: int
    speed: ServeSpeed | None
    speed_error: str | None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.gpu.name,
            "memory_bytes": self.gpu.memory_bytes,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "speed_error": self.speed_error,
        }
        data["speed"] = self.speed.to_dict() if self.speed else None
        return data


@dataclass(frozen=True)
class FitAnswer:
    """``--fit``: the largest value of ``target`` whose plan fits ``gpu`` with ``headroom``."""

    target: str  # batch or context
    value: int | None  # None: not even 1 (batch) / the shortest context fits
    gpu: str
    headroom: float
    budget_bytes: int
    device_total_bytes: int | None  # of the answer

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "value": self.value,
            "gpu": self.gpu,
            "headroom": self.headroom,
            "budget_bytes": self.budget_bytes,
            "device_total_bytes": self.device_total_bytes,
        }


@dataclass(frozen=True)
class ServeResult:
    memory: ServeMemory
    fits: tuple[ServeFit, ...]
    fit: FitAnswer | None = None
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = self.memory.to_dict()
        data["gpus"] = [f.to_dict() for f in self.fits]
        data["fit"] = self.fit.to_dict() if self.fit else None
        data["warnings"] = list(self.warnings)
        return data


def serve_warnings(model: ServeModel, plan: ServePlan) -> tuple[str, ...]:
    out = []
    context = model.base.context_length
    if context and plan.context > context:
        out.append(
            f"--context {plan.context:,} is beyond the model's {context:,}-token context "
            "(max_position_embeddings)"
        )
    bases = {a.base_model for a in plan.adapters if a.base_model}
    names = {plan.model.lower(), model.spec.name.lower()}
    if model.spec.catalog_entry:
        names |= {a.lower() for a in model.spec.catalog_entry.aliases}
    for base in sorted(bases):
        if base.lower() not in names:
            out.append(
                f"--adapter-dir: an adapter was trained on {base!r}, not on {model.spec.name!r}"
            )
    if plan.mode == "merged" and len(plan.adapters) > 1:
        out.append(
            f"--mode merged with {len(plan.adapters)} adapters holds {len(plan.adapters)} "
            "merged copies of the base; --mode multi keeps one base"
        )
    return tuple(out)


def _fits(
    model: ServeModel, memory: ServeMemory, gpus: list[Gpu], with_speed: bool
) -> tuple[ServeFit, ...]:
    cal = load_throughput_calibration()
    out = []
    for gpu in gpus:
        speed, problem = None, None
        headroom = gpu.memory_bytes - memory.device_total_bytes
        if with_speed:
            try:
                speed = estimate_serve_speed(model, memory.plan, gpu, cal)
            except VramcalcError as err:
                problem = str(err)
        out.append(ServeFit(gpu, headroom >= 0, headroom, speed, problem))
    return tuple(out)


def serve_result(
    plan: ServePlan,
    gpus: list[Gpu],
    fit_target: str | None = None,
    headroom: float = 0.05,
) -> ServeResult:
    """Memory of ``plan``, its fit and speed on ``gpus``; with ``fit_target`` (one GPU), the
    largest batch or context that fits, and the result for that plan."""
    model = prepare_serving(plan)
    calibration = load_calibration()
    answer = None
    if fit_target is not None:
        if len(gpus) != 1:
            raise InvalidPlanError([f"--fit {fit_target} needs exactly one --gpu"])
        answer = fit_serve(model, plan, gpus[0], fit_target, headroom, calibration)
        if answer.value is not None:
            plan = _with_value(plan, fit_target, answer.value)
    memory = estimate_serve_memory(model, plan, calibration)
    fits = _fits(model, memory, gpus, with_speed=True)
    return ServeResult(memory, fits, answer, serve_warnings(model, plan))


def _with_value(plan: ServePlan, target: str, value: int) -> ServePlan:
    if target == "batch":
        return plan.with_(batch=value)
    return plan.with_(prompt_tokens=value - plan.new_tokens)


def fit_serve(
    model: ServeModel,
    plan: ServePlan,
    gpu: Gpu,
    target: str,
    headroom: float,
    calibration: Calibration | None = None,
) -> FitAnswer:
    """Binary search of the largest batch (1..4096) or context (new tokens + 1 .. the model's
    context, else 1M) whose ``device_total_bytes`` stays within ``(1 - headroom)`` of ``gpu``."""
    problems = []
    if target not in FIT_TARGETS:
        problems.append(f"--fit {target!r} is not one of {', '.join(FIT_TARGETS)}")
    if not 0 <= headroom < 1:
        problems.append(f"--headroom must be in [0, 1), got {headroom!r}")
    if problems:
        raise InvalidPlanError(problems)
    cal = calibration or load_calibration()
    budget = int(gpu.memory_bytes * (1 - headroom))

    def total(value: int) -> int:
        plan_at = _with_value(plan, target, value)
        return estimate_serve_memory(model, plan_at, cal).device_total_bytes

    low = 1 if target == "batch" else plan.new_tokens + 1
    high = MAX_BATCH if target == "batch" else (model.base.context_length or 1 << 20)
    high = max(high, low)
    if total(low) > budget:
        return FitAnswer(target, None, gpu.name, headroom, budget, None)
    while low < high:  # invariant: low fits
        mid = (low + high + 1) // 2
        if total(mid) <= budget:
            low = mid
        else:
            high = mid - 1
    return FitAnswer(target, low, gpu.name, headroom, budget, total(low))
