"""What ``vramcalc serve`` answers: memory, the GPUs it fits with their speed, and (``--fit``)
the largest batch or context that fits one GPU. One call, one frozen result; no text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from vramcalc.budget import DEFAULT_HEADROOM, budget_bytes, judge
from vramcalc.catalog import Gpu
from vramcalc.errors import InvalidPlanError, SimulationError, VramcalcError
from vramcalc.estimate import ALLOCATOR_MODELS, default_allocator_model
from vramcalc.memory.overhead import Calibration, load_calibration
from vramcalc.search import largest_fitting
from vramcalc.serve_plan import ServePlan
from vramcalc.serving.serve import (
    ServeMemory,
    ServeModel,
    estimate_serve_memory,
    prepare_serving,
)
from vramcalc.serving.serve_speed import ServeSpeed, estimate_serve_speed
from vramcalc.serving.servereplay import ServeSimulation, simulate_serving
from vramcalc.speed.throughput import load_throughput_calibration

FIT_TARGETS = ("batch", "context")
MAX_BATCH = 4096


@dataclass(frozen=True)
class ServeFit:
    """Whether one GPU holds the plan (``budget.judge``), and its predicted speed."""

    gpu: Gpu
    fits: bool
    headroom_bytes: int  # the budget left beyond the device total (negative: short by)
    speed: ServeSpeed | None
    speed_error: str | None
    budget_bytes: int | None = None  # GPU memory less the headroom

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.gpu.name,
            "memory_bytes": self.gpu.memory_bytes,
            "budget_bytes": self.budget_bytes,
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
    headroom: float = DEFAULT_HEADROOM  # the fraction of each GPU's memory kept free

    def to_dict(self) -> dict[str, Any]:
        data = self.memory.to_dict()
        data["gpus"] = [f.to_dict() for f in self.fits]
        data["fit"] = self.fit.to_dict() if self.fit else None
        data["warnings"] = list(self.warnings)
        data["headroom"] = self.headroom
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
    if compiled_decoding(plan):
        out.append(
            "--cache static on a 16-bit base: transformers compiles decoding on CUDA (CUDA "
            "graphs), which the simulation does not model; on the one such run measured "
            "(Llama-3.2-1B, 16 x 16k) peak reserved was 7.9 % above it "
            "(data/measurements/README.md)"
        )
    return tuple(out)


def compiled_decoding(plan: ServePlan) -> bool:
    """Whether ``generate`` compiles the decoding forward for ``plan`` on a GPU (transformers
    5.17 ``GenerationMixin._valid_auto_compile_criteria``: a compileable cache -- the static
    one -- on CUDA, and no quantizer that cannot be compiled: bitsandbytes' 4- and 8-bit
    quantizers say ``is_compileable`` False). The compiled step runs as CUDA graphs
    (``CompileConfig`` mode ``reduce-overhead``): each capture empties the caching
    allocator's cache and decoding allocates in the graph's private pool, which the
    simulated run (eager decoding, one pool) does not model."""
    return plan.cache == "static" and not plan.is_kbit


def _fits(
    model: ServeModel, memory: ServeMemory, gpus: list[Gpu], headroom: float
) -> tuple[ServeFit, ...]:
    cal = load_throughput_calibration()
    out = []
    for gpu in gpus:
        speed, problem = None, None
        verdict = judge(memory.device_total_bytes, gpu, headroom)
        try:
            speed = estimate_serve_speed(model, memory.plan, gpu, cal)
        except VramcalcError as err:
            problem = str(err)
        out.append(
            ServeFit(gpu, verdict.fits, verdict.margin_bytes, speed, problem, verdict.budget_bytes)
        )
    return tuple(out)


def serve_simulation(
    model: ServeModel, plan: ServePlan, allocator_model: str | None = None
) -> ServeSimulation | None:
    """The plan's serving run simulated, as ``allocator_model`` asks (``simulate``, the
    default of ``estimate.default_allocator_model``, or ``approximate``: None). A run that
    cannot be traced raises ``SimulationError`` naming the way out."""
    allocator_model = allocator_model or default_allocator_model()
    if allocator_model not in ALLOCATOR_MODELS:
        raise InvalidPlanError(
            [f"--allocator-model {allocator_model!r} is not one of {', '.join(ALLOCATOR_MODELS)}"]
        )
    if allocator_model == "approximate":
        return None
    try:
        return simulate_serving(model.spec.config_dict, plan)
    except VramcalcError:
        raise
    except Exception as err:
        raise SimulationError(
            f"--model {model.spec.name}: generate could not be traced on fake tensors "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "--allocator-model approximate gives the rules' estimate instead"
        ) from err


def serve_memory(
    model: ServeModel,
    plan: ServePlan,
    calibration: Calibration | None = None,
    allocator_model: str | None = None,
) -> ServeMemory:
    """The one way from a counted model and a plan to its serving memory."""
    simulation = serve_simulation(model, plan, allocator_model)
    return estimate_serve_memory(model, plan, calibration or load_calibration(), simulation)


def serve_result(
    plan: ServePlan,
    gpus: list[Gpu],
    fit_target: str | None = None,
    headroom: float = DEFAULT_HEADROOM,
    allocator_model: str | None = None,
) -> ServeResult:
    """Memory of ``plan``, its fit and speed on ``gpus``; with ``fit_target`` (one GPU), the
    largest batch or context that fits, and the result for that plan. ``allocator_model``
    as ``serve_simulation`` takes it."""
    model = prepare_serving(plan)
    calibration = load_calibration()
    answer = None
    if fit_target is not None:
        if len(gpus) != 1:
            raise InvalidPlanError([f"--fit {fit_target} needs exactly one --gpu"])
        answer = fit_serve(model, plan, gpus[0], fit_target, headroom, calibration, allocator_model)
        if answer.value is not None:
            plan = _with_value(plan, fit_target, answer.value)
    memory = serve_memory(model, plan, calibration, allocator_model)
    fits = _fits(model, memory, gpus, headroom)
    return ServeResult(memory, fits, answer, serve_warnings(model, plan), headroom)


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
    allocator_model: str | None = None,
) -> FitAnswer:
    """The largest batch (1..4096) or context (new tokens + 1 .. the model's context, else 1M)
    whose plan fits ``gpu`` with ``headroom`` free (``budget.judge``; the one search)."""
    problems = []
    if target not in FIT_TARGETS:
        problems.append(f"--fit {target!r} is not one of {', '.join(FIT_TARGETS)}")
    if problems:
        raise InvalidPlanError(problems)
    cal = calibration or load_calibration()
    low = 1 if target == "batch" else plan.new_tokens + 1
    high = MAX_BATCH if target == "batch" else (model.base.context_length or 1 << 20)
    high = max(high, low)

    def probe(units: int) -> _Probe:
        value = low + units - 1
        total = serve_memory(model, _with_value(plan, target, value), cal, allocator_model)
        return _Probe(
            value, total.device_total_bytes, judge(total.device_total_bytes, gpu, headroom).fits
        )

    best, _ = largest_fitting(probe, high - low + 1)
    budget = budget_bytes(gpu, headroom)
    if best is None:
        return FitAnswer(target, None, gpu.name, headroom, budget, None)
    return FitAnswer(target, best.value, gpu.name, headroom, budget, best.device_total_bytes)


class _Probe(NamedTuple):
    value: int
    device_total_bytes: int
    fits: bool
