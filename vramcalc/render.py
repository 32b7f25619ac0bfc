"""Human-readable text for estimates (the CLI prints what these return)."""

from __future__ import annotations

from dataclasses import dataclass

from vramcalc.catalog import Gpu
from vramcalc.estimate import MemoryEstimate

GIB = 2**30

COMPONENT_LABELS = {
    "weights": "base weights",
    "adapters": "LoRA adapters",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "logits": "logits + loss",
    "transient": "step temporaries",
    "gathered_weights": "gathered (unsharded) weights",
    "comm_buffers": "communication buffers",
    "cublas_workspace": "cuBLAS workspace",
    "allocator_reserve": "allocator reserve",
    "cuda_context": "CUDA context",
    "nccl": "NCCL communicators",
    "paged_optimizer_states": "paged optimizer states",
}


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:,.2f} GiB"


@dataclass(frozen=True)
class GpuFit:
    gpu: Gpu
    fits: bool
    headroom_bytes: int  # negative when it does not fit


def gpu_fits(estimate: MemoryEstimate, gpus: tuple[Gpu, ...] | list[Gpu]) -> list[GpuFit]:
    """Whether ``estimate.device_total_bytes`` fits each GPU, with headroom."""
    return [
        GpuFit(gpu, estimate.device_total_bytes <= gpu.memory_bytes, gpu.memory_bytes - estimate.device_total_bytes)
        for gpu in gpus
    ]


def render_plan(estimate: MemoryEstimate, fits: list[GpuFit]) -> str:
    """The ``vramcalc plan`` report."""
    plan = estimate.plan
    total = estimate.device_total_bytes
    lines = [
        f"{estimate.model_name} — {plan.method}"
        + (f" ({plan.quant})" if plan.is_kbit else "")
        + f", seq {plan.seq_len} x batch {plan.batch_size}",
        f"parameters: {estimate.total_params:,} total, {estimate.trainable_params:,} trainable "
        f"({100 * estimate.trainable_params / max(estimate.total_params, 1):.3f} %)",
        "",
        f"{'component':<24}{'memory':>14}{'share':>9}",
        "-" * 47,
    ]
    for name, nbytes in estimate.components.items():
        if nbytes == 0:
            continue
        lines.append(f"{COMPONENT_LABELS.get(name, name):<24}{gib(nbytes):>14}{100 * nbytes / total:>8.1f}%")
    lines += [
        "-" * 47,
        f"{'peak allocated':<24}{gib(estimate.peak_allocated_bytes):>14}   (torch max_memory_allocated)",
        f"{'peak reserved':<24}{gib(estimate.peak_reserved_bytes):>14}   (torch max_memory_reserved)",
        f"{'device total':<24}{gib(estimate.device_total_bytes):>14}   (nvidia-smi; what the GPU must hold)",
        f"peak falls at: {estimate.peak_phase.replace('_', ' ')}",
        "",
        "assumptions:",
        *[f"  - {a}" for a in estimate.assumptions],
    ]
    if fits:
        lines += ["", f"{'GPU':<16}{'memory':>14}  {'fits':<5}{'headroom':>14}"]
        for fit in fits:
            lines.append(
                f"{fit.gpu.name:<16}{gib(fit.gpu.memory_bytes):>14}  {'yes' if fit.fits else 'no':<5}"
                f"{gib(fit.headroom_bytes):>14}"
            )
    return "\n".join(lines)
