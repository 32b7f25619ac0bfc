"""Human-readable text for estimates (the CLI prints what these return)."""

from __future__ import annotations

from vramcalc.estimate import MemoryEstimate
from vramcalc.memory import GIB
from vramcalc.plan import TrainingPlan
from vramcalc.planner import PlanResult

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


def render_plan_result(result: PlanResult) -> str:
    """The ``vramcalc plan`` report: memory, GPU fit and speed, run cost."""
    from vramcalc.cost import render_cost
    from vramcalc.throughput import transfer_note

    text = render_memory(result.memory)
    if result.fits:
        lines = [
            "",
            f"{'GPU':<16}{'memory':>14}  {'fits':<5}{'headroom':>14}{'tokens/s':>11}{'step s':>9}",
        ]
        for fit in result.fits:
            speed = (
                f"{fit.throughput.tokens_per_second:>11,.0f}{fit.throughput.step_seconds:>9.2f}"
                if fit.throughput
                else f"{'-':>11}{'-':>9}"
            )
            lines.append(
                f"{fit.gpu.name:<16}{gib(fit.gpu.memory_bytes):>14}  {'yes' if fit.fits else 'no':<5}"
                f"{gib(fit.headroom_bytes):>14}{speed}"
            )
        first = next((f.throughput for f in result.fits if f.throughput), None)
        if first is not None:
            lines.append(f"speed: {transfer_note(first.calibration)}")
        text += "\n" + "\n".join(lines)
    for hint in result.hints:
        text += f"\nhint: {hint}"
    if result.cost is not None:
        text += "\n\n" + (
            render_cost(result.cost) if result.cost.rows else "run cost: no GPU of the list fits"
        )
    return text


def plan_heading(model_name: str, plan: TrainingPlan) -> str:
    """``meta-llama/Llama-2-13b-hf — qlora (nf4)``: the first words of every plan report."""
    return f"{model_name} — {plan.method}" + (f" ({plan.quant})" if plan.is_kbit else "")


def render_memory(estimate: MemoryEstimate) -> str:
    """The memory part of the ``vramcalc plan`` report."""
    plan = estimate.plan
    total = estimate.device_total_bytes
    lines = [
        plan_heading(estimate.model_name, plan)
        + f", seq {plan.seq_len} x batch {plan.batch_size}, gradient checkpointing "
        + ("on" if plan.gradient_checkpointing else "off"),
        f"parameters: {estimate.total_params:,} total, {estimate.trainable_params:,} trainable "
        f"({100 * estimate.trainable_params / max(estimate.total_params, 1):.3f} %)",
        "",
        f"{'component':<24}{'memory':>14}{'share':>9}",
        "-" * 47,
    ]
    for name, nbytes in estimate.components.items():
        if nbytes == 0:
            continue
        lines.append(
            f"{COMPONENT_LABELS.get(name, name):<24}{gib(nbytes):>14}{100 * nbytes / total:>8.1f}%"
        )
    lines += [
        "-" * 47,
        f"{'peak allocated':<24}{gib(estimate.peak_allocated_bytes):>14}   (torch max_memory_allocated)",
        f"{'peak reserved':<24}{gib(estimate.peak_reserved_bytes):>14}   (torch max_memory_reserved)",
        f"{'device total':<24}{gib(estimate.device_total_bytes):>14}   (nvidia-smi; what the GPU must hold)"
        + (
            f", per GPU; {gib(estimate.total_device_bytes_all_gpus)} on {plan.num_gpus} GPUs"
            if plan.num_gpus > 1
            else ""
        ),
        f"peak falls at: {estimate.peak_phase.replace('_', ' ')}",
        "",
        "assumptions:",
        *[f"  - {a}" for a in estimate.assumptions],
    ]
    return "\n".join(lines)
