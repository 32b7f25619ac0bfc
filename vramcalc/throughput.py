"""Step time, tokens/s and MFU of a plan on a GPU: the work done over what the GPU delivers.

Per optimizer step on one GPU (``grad_accum`` micro-batches)::

    GPU time   = matmul FLOPs / (peak TFLOP/s x compute_efficiency[method])
               + micro-batch memory traffic / (bandwidth x bandwidth_efficiency)
    host time  = grad_accum x layer passes x layers x host_seconds_per_layer_pass
    step_seconds = max(GPU time, host time)
                 + optimizer traffic / (bandwidth x bandwidth_efficiency)
                 + step_overhead_seconds

FLOPs are counted exactly (``flops.py``). Memory traffic is the work that
moves whole weights or S x S matrices without being FLOPs:

* k-bit dequantization: bitsandbytes ``MatMul4Bit`` dequantizes every NF4/FP4
  weight in each forward, each backward that needs the input gradient and each
  checkpoint recompute (reads the packed weight and its constants, writes a
  ``--dtype`` copy; double quantization first writes and reads an fp32 absmax);
  ``MatMul8bitLt`` runs the forward as an int8 matmul and, in backward,
  dequantizes ``CB`` (``CB.to(dtype, copy=True).mul_(SCB / 127)``: read int8,
  write, read and write ``--dtype``).
* eager attention materializes the S x S scores: per score element 34 bytes in
  forward (matmul output, scaling, mask add, bf16->fp32, softmax, fp32->bf16,
  read by PV) and 38 in backward (the mirror passes).
* optimizer step: read and write parameters and states, read gradients, plus
  gradient clipping (norm read + scale read/write, Trainer's
  ``max_grad_norm=1``) and in-place accumulation over micro-batches.

Efficiencies are dimensionless fractions of the datasheet peak and live in
``data/calibration.json`` (``throughput_*``): documented priors until
``fit_efficiency`` refits them on the calibration split. A prediction for a GPU
other than the one measured keeps the fractions and takes that GPU's own peak
TFLOP/s and bandwidth from ``data/gpus.csv``; host seconds carry over unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vramcalc.calibration import CALIBRATION_JSON, calibration_json
from vramcalc.catalog import Gpu, find_gpu
from vramcalc.errors import CatalogError, InvalidPlanError, VramcalcError
from vramcalc.flops import StepFlops, estimate_flops, linear_input_grad_shares
from vramcalc.inventory import ModelInventory
from vramcalc.memory import DTYPE_BYTES
from vramcalc.memory.gradients import gradient_bytes, trainable_dtype
from vramcalc.memory.optimizer import estimate_optimizer
from vramcalc.memory.weights import NF4_BLOCKSIZE, four_bit_linear_bytes, int8_linear_bytes
from vramcalc.plan import TrainingPlan

EFFICIENCY_KEYS = ("full", "lora", "qlora", "int8")
EAGER_FORWARD_BYTES_PER_SCORE = 34
EAGER_BACKWARD_BYTES_PER_SCORE = 38
SHARDED_STRATEGIES = ("fsdp", "fsdp-grad-op", "zero1", "zero2", "zero3")
NO_MEASUREMENT = "prior, no measurement"
_SCALARS = ("bandwidth_efficiency", "host_seconds_per_layer_pass", "step_overhead_seconds")


def efficiency_key(plan: TrainingPlan) -> str:
    """Which compute efficiency a plan uses: full, lora (16-bit base), qlora (4-bit), int8."""
    if plan.method == "full":
        return "full"
    if plan.quant == "int8":
        return "int8"
    return "qlora" if plan.quant in ("nf4", "fp4") else "lora"


@dataclass(frozen=True)
class ThroughputCalibration:
    """The efficiency constants, where they were measured, and the source of each."""

    compute_efficiency: dict[str, float]  # by efficiency_key
    bandwidth_efficiency: float
    host_seconds_per_layer_pass: float
    step_overhead_seconds: float
    measured_on: tuple[str, ...] = ()  # catalog GPU names; () while these are priors
    sources: dict[str, str] = field(default_factory=dict)  # calibration.json key -> source

    @property
    def fitted(self) -> bool:
        return bool(self.measured_on)

    @property
    def measured_on_text(self) -> str:
        return ", ".join(self.measured_on) if self.measured_on else NO_MEASUREMENT

    def to_json(self) -> dict[str, dict[str, Any]]:
        """The ``throughput_*`` entries of ``data/calibration.json``, value and source each."""
        values: dict[str, Any] = {
            f"compute_efficiency_{k}": v for k, v in self.compute_efficiency.items()
        }
        values.update({name: getattr(self, name) for name in _SCALARS})
        values["measured_on"] = list(self.measured_on) or None
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

        return cls(
            compute_efficiency={
                k: float(value(f"compute_efficiency_{k}")) for k in EFFICIENCY_KEYS
            },
            bandwidth_efficiency=float(value("bandwidth_efficiency")),
            host_seconds_per_layer_pass=float(value("host_seconds_per_layer_pass")),
            step_overhead_seconds=float(value("step_overhead_seconds")),
            measured_on=tuple(value("measured_on") or ()),
            sources={k: str(v["source"]) for k, v in raw.items() if k.startswith("throughput_")},
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


# -- the work: FLOPs and bytes -----------------------------------------------------------------
@dataclass(frozen=True)
class StepTraffic:
    """Bytes one optimizer step moves that are not matmul FLOPs, on one GPU."""

    dequant_bytes: int  # k-bit weights dequantized (all micro-batches)
    attention_score_bytes: int  # eager attention's S x S passes (all micro-batches)
    optimizer_bytes: int  # optimizer step + clipping + gradient accumulation

    @property
    def micro_batch_bytes(self) -> int:
        return self.dequant_bytes + self.attention_score_bytes


def estimate_traffic(inventory: ModelInventory, plan: TrainingPlan) -> StepTraffic:
    """Memory traffic of one optimizer step (see the module docstring for each rule)."""
    out_bytes = DTYPE_BYTES[plan.dtype]
    dequant = 0.0
    if plan.is_kbit:
        shares = linear_input_grad_shares(inventory, plan)
        for g in (g for g in inventory.linears if g.quantizable):
            n = g.in_features * g.out_features
            if plan.quant == "int8":
                per_pass = int8_linear_bytes(g.out_features, g.in_features) + 3 * n * out_bytes
                passes = float(shares[g.name])
            else:
                per_pass = four_bit_linear_bytes(g.out_features, g.in_features, plan.double_quant)
                per_pass += n * out_bytes + (8 * -(n // -NF4_BLOCKSIZE) if plan.double_quant else 0)
                passes = 1 + int(plan.gradient_checkpointing) + float(shares[g.name])
            dequant += per_pass * passes * g.count
    scores = 0
    if plan.attn == "eager":
        per_pass = (
            plan.batch_size * inventory.num_attention_heads * plan.seq_len**2 * inventory.num_layers
        )
        forward_passes = 1 + int(plan.gradient_checkpointing)
        scores = per_pass * (
            forward_passes * EAGER_FORWARD_BYTES_PER_SCORE + EAGER_BACKWARD_BYTES_PER_SCORE
        )
    grads = gradient_bytes(inventory, plan)
    params = inventory.trainable_params * DTYPE_BYTES[trainable_dtype(plan)]
    states = estimate_optimizer(inventory, plan).total_state_bytes
    optimizer = 2 * params + grads + 2 * states + 3 * grads + 3 * grads * (plan.grad_accum - 1)
    if plan.strategy in SHARDED_STRATEGIES and plan.num_gpus > 1:
        optimizer //= plan.num_gpus
    return StepTraffic(round(dequant) * plan.grad_accum, scores * plan.grad_accum, optimizer)


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
class TimeTerms:
    """One plan on one GPU as seconds at efficiency 1: the features the fit works on."""

    key: str
    grad_accum: int
    compute_seconds: float  # step FLOPs / peak
    memory_seconds: float  # micro-batch traffic of the step / bandwidth
    optimizer_seconds: float  # optimizer traffic / bandwidth
    host_layer_passes: int  # per micro-batch: (forward 1 + backward 2 + recompute 1) x layers

    def gpu_seconds(self, cal: ThroughputCalibration) -> float:
        return (
            self.compute_seconds / cal.compute_efficiency[self.key]
            + self.memory_seconds / cal.bandwidth_efficiency
        )

    def host_seconds(self, cal: ThroughputCalibration) -> float:
        return self.grad_accum * self.host_layer_passes * cal.host_seconds_per_layer_pass

    def step_seconds(self, cal: ThroughputCalibration) -> float:
        return (
            max(self.gpu_seconds(cal), self.host_seconds(cal))
            + self.optimizer_seconds / cal.bandwidth_efficiency
            + cal.step_overhead_seconds
        )


def time_terms(
    inventory: ModelInventory, plan: TrainingPlan, gpu: Gpu
) -> tuple[TimeTerms, StepFlops, StepTraffic]:
    """The work of ``plan`` priced on ``gpu`` at efficiency 1, with the counts behind it."""
    flops = estimate_flops(inventory, plan)
    traffic = estimate_traffic(inventory, plan)
    peak = peak_tflops_for(gpu, compute_dtype(plan)) * 1e12
    bandwidth = float(gpu.memory_bandwidth_gbps or 0) * 1e9
    passes = (3 + int(plan.gradient_checkpointing)) * inventory.num_layers
    terms = TimeTerms(
        efficiency_key(plan),
        plan.grad_accum,
        flops.total / peak,
        traffic.micro_batch_bytes / bandwidth,
        traffic.optimizer_bytes / bandwidth,
        passes,
    )
    return terms, flops, traffic


# -- the estimate --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThroughputEstimate:
    """Predicted speed of one plan on one GPU; field names match the harness records."""

    plan: TrainingPlan
    gpu: Gpu
    peak_tflops: float
    flops: StepFlops
    traffic: StepTraffic
    calibration: ThroughputCalibration
    seconds: dict[str, float]  # compute, memory, host, optimizer, overhead (per step)
    step_seconds: float
    bound: str  # "GPU" or "host": which is longer per micro-batch
    derivation: str

    @property
    def tokens_per_second(self) -> float:
        """Per GPU, as the harness defines it: seq_len x batch_size x grad_accum / step_seconds."""
        return self.plan.seq_len * self.plan.batch_size * self.plan.grad_accum / self.step_seconds

    @property
    def tokens_per_second_all_gpus(self) -> float:
        """Every GPU together (communication between GPUs not modeled)."""
        return self.tokens_per_second * self.plan.num_gpus

    @property
    def mfu(self) -> float:
        """Model FLOPs (the method's matmuls, no recompute) per second over the dense peak."""
        return self.flops.model_flops / (self.step_seconds * self.peak_tflops * 1e12)

    @property
    def hfu(self) -> float:
        """As ``mfu`` with the checkpoint recompute counted (hardware FLOPs)."""
        return self.flops.total / (self.step_seconds * self.peak_tflops * 1e12)

    @property
    def efficiency_key(self) -> str:
        return efficiency_key(self.plan)

    @property
    def assumptions(self) -> tuple[str, ...]:
        notes = [
            "matmul FLOPs counted exactly; elementwise work sits in the fitted efficiencies",
            f"{compute_dtype(self.plan)} tensor-core peak {self.peak_tflops:g} TFLOP/s, "
            f"{self.gpu.memory_bandwidth_gbps:g} GB/s (data/gpus.csv)",
        ]
        if self.plan.num_gpus > 1:
            notes.append(
                "per-GPU work only: all-reduce / all-gather time between GPUs is not modeled"
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
            "mfu": self.mfu,
            "hfu": self.hfu,
            "bound": self.bound,
            "seconds": dict(self.seconds),
            "flops": self.flops.to_dict(),
            "traffic_bytes": {
                "dequant": self.traffic.dequant_bytes,
                "attention_scores": self.traffic.attention_score_bytes,
                "optimizer": self.traffic.optimizer_bytes,
            },
            "efficiency_key": self.efficiency_key,
            "compute_efficiency": self.calibration.compute_efficiency[self.efficiency_key],
            "bandwidth_efficiency": self.calibration.bandwidth_efficiency,
            "efficiency_measured_on": self.calibration.measured_on_text,
            "derivation": self.derivation,
            "assumptions": list(self.assumptions),
        }


def transfer_note(cal: ThroughputCalibration) -> str:
    """One line on where the efficiencies come from and how they reach other GPUs."""
    if not cal.fitted:
        return (
            f"efficiency measured on: {NO_MEASUREMENT} (priors in data/calibration.json); each GPU's "
            "time uses its own peak TFLOP/s and memory bandwidth from data/gpus.csv"
        )
    return (
        f"efficiency measured on: {cal.measured_on_text}; other GPUs keep the fitted fractions of "
        "peak, with their own peak TFLOP/s and bandwidth from data/gpus.csv; host seconds unchanged"
    )


def _derivation(gpu: Gpu, cal: ThroughputCalibration, dtype: str) -> str:
    if not cal.fitted:
        return (
            f"efficiency: {NO_MEASUREMENT} (data/calibration.json priors), applied as fractions of "
            f"{gpu.name}'s own peak TFLOP/s and memory bandwidth from data/gpus.csv"
        )
    if gpu.name in cal.measured_on:
        return f"efficiency fitted on measurements of {cal.measured_on_text}, this GPU included"
    try:
        sources = [find_gpu(name) for name in cal.measured_on]
        scale = "; ".join(
            f"{s.name} {peak_tflops_for(s, dtype):g} -> {peak_tflops_for(gpu, dtype):g} TFLOP/s, "
            f"{s.memory_bandwidth_gbps:g} -> {gpu.memory_bandwidth_gbps:g} GB/s"
            for s in sources
        )
    except VramcalcError:
        scale = "peak TFLOP/s and bandwidth from data/gpus.csv"
    return (
        f"efficiency fitted on {cal.measured_on_text}, not on {gpu.name}: carried over as fractions of "
        f"peak, compute time scaled by peak TFLOP/s and memory time by bandwidth ({scale}); "
        "host launch and per-step seconds taken unchanged"
    )


def estimate_throughput(
    inventory: ModelInventory,
    plan: TrainingPlan,
    gpu: Gpu,
    calibration: ThroughputCalibration | None = None,
) -> ThroughputEstimate:
    """Step time, tokens/s and MFU of ``plan`` on ``gpu``."""
    cal = calibration or load_throughput_calibration()
    terms, flops, traffic = time_terms(inventory, plan, gpu)
    gpu_s, host_s = terms.gpu_seconds(cal), terms.host_seconds(cal)
    seconds = {
        "compute": terms.compute_seconds / cal.compute_efficiency[terms.key],
        "memory": terms.memory_seconds / cal.bandwidth_efficiency,
        "host": host_s,
        "optimizer": terms.optimizer_seconds / cal.bandwidth_efficiency,
        "overhead": cal.step_overhead_seconds,
    }
    return ThroughputEstimate(
        plan,
        gpu,
        peak_tflops_for(gpu, compute_dtype(plan)),
        flops,
        traffic,
        cal,
        seconds,
        terms.step_seconds(cal),
        "GPU" if gpu_s >= host_s else "host",
        _derivation(gpu, cal, compute_dtype(plan)),
    )
