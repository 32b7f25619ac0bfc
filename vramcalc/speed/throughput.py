"""Step time, tokens/s and MFU of a plan on a GPU, priced op by op.

The work of a step is counted from the recipe's real code (``opprofile.py``) and
laid out as stretches of ops between host-device syncs (``stepwork.py``). Each
kernel is priced on the GPU as a roofline plus a launch term, each op on the host
as dispatch work::

    kernel GPU seconds = max(FLOPs / (peak x e), bytes / (bandwidth x e_bw)) + t_kernel
        peak: the GPU's dense tensor peak in the compute dtype for matmuls (its fp32
        peak for fp32 matmuls, twice the 16-bit peak for int8), e = compute_efficiency;
        FlashAttention kernels use attention_efficiency; other kernels are bandwidth-bound
    host seconds = h_python x Python-level torch calls + h_dispatch x dispatched ops

Kernels run asynchronously, so a stretch takes the longer of its host and GPU
seconds; syncs add them up stretch by stretch. A bitsandbytes optimizer steps
each tensor with a launch and a sync (``h_bnb_tensor`` + its bytes at bandwidth),
and every step has a fixed host part (``step_overhead_seconds``: Trainer's loop,
data loading, callbacks, ``zero_grad``)::

    step = step_overhead + sum over stretches of max(host, GPU) + bitsandbytes tensors

The step is *bound* by what it waits on most: ``host`` (stretches whose host time
is longer, the fixed part), ``compute`` or ``memory`` (the matmul/attention and the
bandwidth/launch parts of the GPU-bound stretches); the three add up to the step.

The constants live in ``data/calibration.json`` (``throughput_*``), fitted on the
calibration split of the H200 measurements (``throughput_fit.py``). For another GPU
the efficiencies are kept as fractions of that GPU's own peak TFLOP/s and bandwidth
(``data/gpus.csv``); the host constants (the CPU side) and the kernel launch term are
carried over unchanged, and the output says that no measurement backs that GPU.

A multi-GPU plan's step adds what its collectives leave exposed (``communication.py``: the
bytes of each, their time on the GPU's link from ``data/gpus.csv``, hidden behind one
micro-batch's forward and backward as priced here). No multi-GPU measurement backs it yet:
such estimates are never ``measured``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from vramcalc.calibration import CALIBRATION_JSON, calibration_json
from vramcalc.catalog import Gpu, find_gpu
from vramcalc.errors import CatalogError, InvalidPlanError, VramcalcError
from vramcalc.inventory import ModelInventory
from vramcalc.speed.communication import (
    CommunicationTime,
    CommunicationVolume,
    communication_time,
    communication_volume,
)
from vramcalc.speed.flops import StepFlops, estimate_flops
from vramcalc.speed.links import gpu_link
from vramcalc.speed.opprofile import OpProfile, op_profile
from vramcalc.speed.stepwork import StepWork, phase_work, step_work
from vramcalc.trace.oprecorder import ATTENTION, INT8_MATMUL, MATMUL_FP32
from vramcalc.training_plan import TrainingPlan

NO_MEASUREMENT = "prior, no measurement"
#: the case list that will measure multi-GPU speed once a multi-GPU machine is lent
MULTI_GPU_CASES = "vramcalc_harness/cases/h200x2.yaml"
# the constants, in the order the fit solves them (calibration.json: "throughput_" + name)
CONSTANTS = (
    "compute_efficiency",
    "fp32_efficiency",
    "attention_efficiency",
    "bandwidth_efficiency",
    "kernel_seconds",
    "python_call_seconds",
    "dispatch_seconds",
    "bnb_tensor_seconds",
    "step_overhead_seconds",
)
BOUNDS = ("compute", "memory", "host")
_EFFICIENCY = {ATTENTION: "attention_efficiency", MATMUL_FP32: "fp32_efficiency"}
# a GPU without an fp32 peak in the catalog can still price a recipe whose fp32 matmuls are
# below this share of its matmul FLOPs (the rotary embedding's, in every recipe)
FP32_SHARE_NEEDING_A_PEAK = 0.01


@dataclass(frozen=True)
class ThroughputCalibration:
    """The speed constants, the GPUs they were measured on, and the source of each."""

    compute_efficiency: float  # of the dense matmul peak
    fp32_efficiency: float  # fp32 matmuls outside autocast, of the fp32 (non-tensor) peak
    attention_efficiency: float  # FlashAttention kernels, of the dense peak
    bandwidth_efficiency: float  # of the datasheet memory bandwidth
    kernel_seconds: float  # GPU time every kernel takes besides its work
    python_call_seconds: float  # host: one Python-level torch call
    dispatch_seconds: float  # host: one op through the dispatcher (+ its launch)
    bnb_tensor_seconds: float  # host: one tensor of a bitsandbytes optimizer step (with sync)
    step_overhead_seconds: float  # host: fixed per optimizer step
    measured_on: tuple[str, ...] = ()  # catalog GPU names; () while these are priors
    sources: dict[str, str] = field(default_factory=dict)  # calibration.json key -> source
    fitted_on: dict[str, Any] = field(default_factory=dict)  # the measurements of the fit

    @property
    def fitted(self) -> bool:
        return bool(self.measured_on)

    @property
    def measured_on_text(self) -> str:
        return ", ".join(self.measured_on) if self.measured_on else NO_MEASUREMENT

    def values(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in CONSTANTS}

    def to_json(self) -> dict[str, dict[str, Any]]:
        """The ``throughput_*`` entries of ``data/calibration.json``, value and source each."""
        values: dict[str, Any] = self.values()
        values["measured_on"] = list(self.measured_on) or None
        values["fitted_on"] = self.fitted_on or None
        return {
            f"throughput_{name}": {
                "value": value,
                "source": self.sources.get(f"throughput_{name}", ""),
            }
            for name, value in values.items()
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ThroughputCalibration:
        def value(name: str) -> Any:
            return raw[f"throughput_{name}"]["value"]

        fitted_on = raw.get("throughput_fitted_on", {}).get("value") or {}
        return cls(
            **{name: float(value(name)) for name in CONSTANTS},
            measured_on=tuple(value("measured_on") or ()),
            sources={k: str(v["source"]) for k, v in raw.items() if k.startswith("throughput_")},
            fitted_on=dict(fitted_on),
        )


@functools.lru_cache(maxsize=1)
def load_throughput_calibration() -> ThroughputCalibration:
    """The ``throughput_*`` constants of ``data/calibration.json``."""
    try:
        return ThroughputCalibration.from_json(calibration_json())
    except (ValueError, KeyError, TypeError) as err:
        raise CatalogError(
            f"calibration file {CALIBRATION_JSON}: throughput entries unreadable ({err})"
        ) from err


# -- the GPU -------------------------------------------------------------------------------------
def compute_dtype(plan: TrainingPlan) -> str:
    """The dtype matmuls run in: the recipe's bf16 autocast (fp32 master weights included),
    or fp16 autocast when the base weights are loaded in fp16."""
    return "fp16" if plan.dtype == "fp16" else "bf16"


def peak_tflops_for(gpu: Gpu, dtype: str) -> float:
    """The dense tensor-core peak of ``dtype`` (bf16 or fp16) matmuls on ``gpu``."""
    peak = (
        gpu.bf16_dense_tflops if dtype == "bf16" else gpu.fp16_dense_tflops or gpu.bf16_dense_tflops
    )
    if peak is None and dtype == "bf16" and gpu.fp16_dense_tflops:
        raise InvalidPlanError(
            [f"--dtype bf16: {gpu.name} has no bf16 tensor cores; use --dtype fp16."]
        )
    if not peak:
        raise CatalogError(
            f"data/gpus.csv lists no dense {dtype} TFLOP/s for {gpu.name}; its speed cannot be predicted."
        )
    if not gpu.memory_bandwidth_gbps:
        raise CatalogError(
            f"data/gpus.csv lists no memory bandwidth for {gpu.name}; its speed cannot be predicted."
        )
    return peak


@dataclass(frozen=True)
class Peaks:
    """What a GPU delivers at efficiency 1, per second."""

    flops: dict[str, float]  # by kernel kind
    bytes: float

    @classmethod
    def of(cls, gpu: Gpu, plan: TrainingPlan, work: StepWork) -> Peaks:
        dense = peak_tflops_for(gpu, compute_dtype(plan)) * 1e12
        flops = {"matmul": dense, ATTENTION: dense, INT8_MATMUL: 2 * dense}
        flops[MATMUL_FP32] = (gpu.fp32_tflops or 0) * 1e12
        fp32 = sum(k.flops for s in work.stretches for k in s.compute if k.kind == MATMUL_FP32)
        if not flops[MATMUL_FP32]:
            if fp32 > FP32_SHARE_NEEDING_A_PEAK * work.matmul_flops:
                raise CatalogError(
                    f"data/gpus.csv lists no fp32 TFLOP/s for {gpu.name}; the fp32 matmuls of "
                    "this recipe (int8 LoRA's backward) cannot be priced."
                )
            flops[MATMUL_FP32] = dense  # a few tiny ones (RoPE's frequencies): their time is nil
        return cls(flops, float(gpu.memory_bandwidth_gbps or 0) * 1e9)


# -- pricing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepTime:
    """One step priced: its seconds and what they wait on (``BOUNDS`` add up to ``step``)."""

    step_seconds: float
    seconds: dict[str, float]  # compute, memory, host
    host_seconds: float  # all host work, overlapped or not
    gpu_seconds: float  # all GPU work, overlapped or not

    @property
    def bound(self) -> str:
        return max(BOUNDS, key=lambda k: self.seconds[k])


def price(work: StepWork, peaks: Peaks, cal: ThroughputCalibration) -> StepTime:
    """``work`` on a GPU of ``peaks`` with the constants ``cal`` (module docstring)."""
    bandwidth = peaks.bytes * cal.bandwidth_efficiency
    waits = dict.fromkeys(BOUNDS, 0.0)
    waits["host"] = cal.step_overhead_seconds
    host_total, gpu_total = cal.step_overhead_seconds, 0.0
    for s in work.stretches:
        host = s.python_calls * cal.python_call_seconds + s.dispatches * cal.dispatch_seconds
        memory = s.memory_bytes / bandwidth + s.memory_kernels * cal.kernel_seconds
        compute = 0.0
        for k in s.compute:
            efficiency = _EFFICIENCY.get(k.kind, "compute_efficiency")
            flops_per_second = peaks.flops[k.kind] * getattr(cal, efficiency)
            compute += max(k.flops / flops_per_second, k.bytes / bandwidth)
            compute += k.count * cal.kernel_seconds
        gpu = compute + memory
        host_total += s.times * host
        gpu_total += s.times * gpu
        if host > gpu:  # asynchronous launches: the longer of the two
            waits["host"] += s.times * host
        else:
            waits["compute"] += s.times * compute
            waits["memory"] += s.times * memory
    # bitsandbytes optimizers: per tensor, host work, then the kernel, then a sync
    waits["host"] += work.bnb_tensors * cal.bnb_tensor_seconds
    waits["memory"] += work.bnb_bytes / bandwidth + work.bnb_tensors * cal.kernel_seconds
    host_total += work.bnb_tensors * cal.bnb_tensor_seconds
    gpu_total += work.bnb_bytes / bandwidth + work.bnb_tensors * cal.kernel_seconds
    return StepTime(sum(waits.values()), waits, host_total, gpu_total)


# -- the estimate --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Work:
    """Everything the speed of a plan needs besides the GPU: counted once per plan."""

    plan: TrainingPlan
    flops: StepFlops  # flops.py: model FLOPs for MFU
    step: StepWork
    num_layers: int
    # multi-GPU plans: the collectives of a step, and one micro-batch's forward and backward
    communication: CommunicationVolume | None = None
    phases: dict[str, StepWork] | None = None


def plan_work(config_dict: dict[str, Any], inventory: ModelInventory, plan: TrainingPlan) -> Work:
    """The work of ``plan``: its recipe traced (``op_profile``, cached) and laid out."""
    profile: OpProfile = op_profile(config_dict, plan)
    multi = plan.num_gpus > 1
    return Work(
        plan,
        estimate_flops(inventory, plan),
        step_work(profile, inventory, plan),
        inventory.num_layers,
        communication_volume(inventory, plan) if multi else None,
        phase_work(profile, inventory, plan) if multi else None,
    )


def price_communication(
    work: Work, gpu: Gpu, peaks: Peaks, cal: ThroughputCalibration
) -> CommunicationTime | None:
    """The collectives of a multi-GPU plan on ``gpu``'s link, hidden behind one micro-batch's
    forward and backward priced as the step is (``communication.py``); None for one GPU."""
    if work.communication is None or work.phases is None:
        return None
    link = gpu_link(gpu, work.plan.num_gpus)
    alone = replace(cal, step_overhead_seconds=0.0)
    phases = {name: price(w, peaks, alone).step_seconds for name, w in work.phases.items()}
    return communication_time(work.communication, link, phases)


@dataclass(frozen=True)
class ThroughputEstimate:
    """Predicted speed of one plan on one GPU; field names match the harness records."""

    work: Work
    gpu: Gpu
    peak_tflops: float
    calibration: ThroughputCalibration
    time: StepTime  # one GPU's own work
    derivation: str
    communication: CommunicationTime | None = None  # multi-GPU plans

    @property
    def plan(self) -> TrainingPlan:
        return self.work.plan

    @property
    def flops(self) -> StepFlops:
        return self.work.flops

    @property
    def communication_seconds(self) -> float:
        """What the step waits for the collectives between GPUs (0 on one GPU)."""
        return self.communication.exposed_seconds if self.communication else 0.0

    @property
    def step_seconds(self) -> float:
        return self.time.step_seconds + self.communication_seconds

    @property
    def seconds(self) -> dict[str, float]:
        """What the step waits on: ``BOUNDS`` (+ ``communication`` for several GPUs)."""
        if self.communication is None:
            return self.time.seconds
        return {**self.time.seconds, "communication": self.communication_seconds}

    @property
    def bound(self) -> str:
        """``compute``, ``memory``, ``host`` or ``communication``: what the step waits on most."""
        return max(self.seconds, key=lambda k: self.seconds[k])

    @property
    def multi_gpu(self) -> bool:
        return self.plan.num_gpus > 1

    @property
    def measured(self) -> bool:
        """Whether measurements back this estimate: the constants measured on this GPU, and
        one GPU (no multi-GPU speed has been measured yet)."""
        return self.gpu.name in self.calibration.measured_on and not self.multi_gpu

    @property
    def tokens_per_second(self) -> float:
        """Per GPU, as the harness defines it: seq_len x batch_size x grad_accum / step_seconds."""
        return self.work.step.tokens / self.step_seconds

    @property
    def tokens_per_second_all_gpus(self) -> float:
        """Every GPU together (each runs its own micro-batches; communication included)."""
        return self.tokens_per_second * self.plan.num_gpus

    @property
    def mfu(self) -> float:
        """Model FLOPs (the method's matmuls, no recompute) per second over the dense peak."""
        return self.flops.model_flops / (self.step_seconds * self.peak_tflops * 1e12)

    @property
    def hfu(self) -> float:
        """Every matmul and attention FLOP the step runs (recompute included) over the peak."""
        return self.work.step.matmul_flops / (self.step_seconds * self.peak_tflops * 1e12)

    @property
    def assumptions(self) -> tuple[str, ...]:
        notes = [
            "ops counted on the recipe's own code (transformers, peft; bitsandbytes and "
            "FlashAttention as their sources state); Trainer's step, one GPU",
            f"{compute_dtype(self.plan)} tensor-core peak {self.peak_tflops:g} TFLOP/s, "
            f"{self.gpu.memory_bandwidth_gbps:g} GB/s (data/gpus.csv)",
        ]
        if self.communication is not None:
            c = self.communication
            notes.append(
                f"{self.plan.num_gpus} GPUs over {c.link.name} ({c.link.derivation}); "
                f"{c.volume.rule}; {c.exposed_seconds:.3f} of {c.total_seconds:.3f} s of "
                "collectives per step left exposed by the compute; UNMEASURED: no multi-GPU "
                f"speed measurement yet ({MULTI_GPU_CASES} measures it)"
            )
            if self.plan.cpu_offload:
                notes.append(
                    "--cpu-offload: the host transfers and the optimizer step on the CPU are "
                    "not in the step time"
                )
        return (*notes, *self.flops.notes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu.name,
            "peak_tflops": self.peak_tflops,
            "memory_bandwidth_gbps": self.gpu.memory_bandwidth_gbps,
            "step_seconds": self.step_seconds,
            "tokens_per_second": self.tokens_per_second,
            "tokens_per_second_all_gpus": self.tokens_per_second_all_gpus,
            "num_gpus": self.plan.num_gpus,
            "mfu": self.mfu,
            "hfu": self.hfu,
            "bound": self.bound,
            "seconds": dict(self.seconds),
            "host_seconds": self.time.host_seconds,
            "gpu_seconds": self.time.gpu_seconds,
            "flops": self.flops.to_dict(),
            "work": self.work.step.to_dict(),
            "constants": self.calibration.values(),
            "measured": self.measured,
            "efficiency_measured_on": self.calibration.measured_on_text,
            "derivation": self.derivation,
            "communication": self.communication.to_dict() if self.communication else None,
            "multi_gpu_measured": False if self.multi_gpu else None,
            "assumptions": list(self.assumptions),
        }


def transfer_note(cal: ThroughputCalibration) -> str:
    """One line on where the constants come from and how they reach other GPUs."""
    if not cal.fitted:
        return (
            f"speed constants: {NO_MEASUREMENT} (priors in data/calibration.json); each GPU's "
            "time uses its own peak TFLOP/s and memory bandwidth from data/gpus.csv"
        )
    return (
        f"measured on {cal.measured_on_text}; any other GPU: the fitted fractions of its own "
        "peak TFLOP/s and bandwidth (data/gpus.csv), host and kernel-launch seconds as measured"
    )


def _derivation(gpu: Gpu, cal: ThroughputCalibration, dtype: str) -> str:
    if not cal.fitted:
        return (
            f"constants: {NO_MEASUREMENT} (data/calibration.json priors), applied as fractions of "
            f"{gpu.name}'s own peak TFLOP/s and memory bandwidth from data/gpus.csv"
        )
    if gpu.name in cal.measured_on:
        return f"constants fitted on measurements of {cal.measured_on_text}, this GPU included"
    try:
        scale = "; ".join(
            f"{s.name} {peak_tflops_for(s, dtype):g} -> {peak_tflops_for(gpu, dtype):g} TFLOP/s, "
            f"{s.memory_bandwidth_gbps:g} -> {gpu.memory_bandwidth_gbps:g} GB/s"
            for s in (find_gpu(name) for name in cal.measured_on)
        )
    except VramcalcError:
        scale = "peak TFLOP/s and bandwidth from data/gpus.csv"
    return (
        f"no measurement on {gpu.name}: constants fitted on {cal.measured_on_text}, carried over "
        f"as fractions of peak, compute time scaled by peak TFLOP/s and memory time by bandwidth "
        f"({scale}); host seconds and the kernel launch term taken unchanged"
    )


def estimate_throughput(
    work: Work, gpu: Gpu, calibration: ThroughputCalibration | None = None
) -> ThroughputEstimate:
    """Step time, tokens/s and MFU of ``work``'s plan on ``gpu``."""
    cal = calibration or load_throughput_calibration()
    dtype = compute_dtype(work.plan)
    peak = peak_tflops_for(gpu, dtype)
    peaks = Peaks.of(gpu, work.plan, work.step)
    time = price(work.step, peaks, cal)
    communication = price_communication(work, gpu, peaks, cal)
    return ThroughputEstimate(
        work, gpu, peak, cal, time, _derivation(gpu, cal, dtype), communication
    )


@dataclass(frozen=True)
class PlanSpeed:
    """The speed model composed once for a plan (``plan``, ``sweep``, ``advise`` and the
    constants' fit all start here): the step's work, or why it could not be traced, priced
    on any GPU with ``on``."""

    plan: TrainingPlan
    work: Work | None  # None: the recipe's step could not be traced
    problem: str | None  # why not

    def on(
        self, gpu: Gpu, calibration: ThroughputCalibration | None = None
    ) -> tuple[ThroughputEstimate | None, str | None]:
        """The speed on ``gpu``, or None and why it cannot be predicted there."""
        if self.work is None:
            return None, self.problem
        try:
            return estimate_throughput(self.work, gpu, calibration), None
        except VramcalcError as err:
            return None, str(err)


def plan_speed(
    config_dict: dict[str, Any], inventory: ModelInventory, plan: TrainingPlan
) -> PlanSpeed:
    """``plan``'s work (``plan_work``: traced once per recipe, cached), or why there is none."""
    try:
        return PlanSpeed(plan, plan_work(config_dict, inventory, plan), None)
    except VramcalcError as err:  # the recipe's step could not be traced: no speed
        return PlanSpeed(plan, None, str(err))
