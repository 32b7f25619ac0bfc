"""The text of ``vramcalc serve``: memory, GPUs with prefill/decode speed, disk, ``--fit``."""

from __future__ import annotations

from vramcalc.budget import DEFAULT_HEADROOM
from vramcalc.render.tables import COMPONENT_LABELS, gib, headroom_note, margin, table
from vramcalc.serving.serve import ServeMemory
from vramcalc.serving.serve_planner import FitAnswer, ServeFit, ServeResult
from vramcalc.serving.serve_speed import SPEED_EVIDENCE

SERVE_LABELS = COMPONENT_LABELS | {
    "weights": "base weights",
    "adapters": "LoRA adapters (unmerged)",
    "kv_cache": "KV cache",
    "activations": "forward temporaries",
    "logits": "logits",
    "trace_difference": "simulated run beyond the rules",
}
PHASES = {
    "prefill": "prefill (the prompt's forward)",
    "decode": "decode (the last step)",
    "merge": "merge (at load)",
}


def _heading(memory: ServeMemory) -> str:
    plan = memory.plan
    weights = plan.quant if plan.is_kbit else plan.dtype
    n = len(plan.adapters)
    adapters = f"{n} adapter{'s' if n != 1 else ''} {plan.mode}" if n else "no adapters"
    return (
        f"{memory.model_name} ({weights}) — {adapters}; batch {plan.batch} x "
        f"{plan.context:,} tokens ({plan.prompt_tokens:,} prompt + {plan.new_tokens:,} new), "
        f"{plan.cache} cache"
    )


def render_serve_memory(memory: ServeMemory) -> str:
    total = memory.device_total_bytes
    rows = [
        [SERVE_LABELS.get(name, name), gib(nbytes), f"{100 * nbytes / total:.1f} %"]
        for name, nbytes in memory.components.items()
        if nbytes
    ]
    totals = [
        ["peak allocated", gib(memory.peak_allocated_bytes), "torch max_memory_allocated"],
        ["peak reserved", gib(memory.peak_reserved_bytes), "torch max_memory_reserved"],
        ["device total", gib(total), "nvidia-smi; what the GPU must hold"],
    ]
    adapters = sum(memory.adapter_params)
    disk = memory.disk
    lines = [
        _heading(memory),
        f"parameters: {memory.base_params:,} base, {adapters:,} in adapters",
        "",
        table(rows, ["component", "memory", "share"], [False, True, True]),
        "",
        table(totals, ["total", "memory", "compare with"], [False, True, False]),
        f"peak falls at: {PHASES[memory.peak_phase]}",
        "allocator model: "
        + (
            "simulated (generate traced on fake tensors, replayed through the caching allocator)"
            if memory.allocator_model == "simulated"
            else "APPROXIMATE (rules and a calibrated slack fraction, not simulated)"
        ),
        f"KV cache: {memory.kv_cache_bytes_per_token / 2**20:,.3f} MiB per token of one "
        f"sequence (all layers); {gib(memory.kv_cache_bytes)} at the end of the request",
        "",
        "disk: "
        + (
            f"{len(disk.adapter_bytes)} adapter file(s) {sum(disk.adapter_bytes) / 2**20:,.1f} MiB "
            f"(fp32 safetensors); "
            if disk.adapter_bytes
            else ""
        )
        + f"a merged checkpoint {gib(disk.merged_checkpoint_bytes)} ({memory.plan.dtype})",
        "",
        "assumptions:",
        *[f"  - {a}" for a in memory.assumptions],
    ]
    return "\n".join(lines)


def render_serve_fits(
    fits: tuple[ServeFit, ...], all_gpus: bool, headroom: float = DEFAULT_HEADROOM
) -> str:
    ordered = sorted(fits, key=lambda f: (f.gpu.memory_bytes, f.gpu.name))
    shown = ordered if all_gpus else [f for f in ordered if f.fits]
    rows, notes = [], []
    for fit in shown:
        s = fit.speed
        rows.append(
            [
                fit.gpu.name,
                gib(fit.gpu.memory_bytes),
                "yes" if fit.fits else "no",
                margin(fit.headroom_bytes),
                f"{s.prefill_tokens_per_second:,.0f}" if s else "-",
                f"{s.decode_tokens_per_second:,.1f}" if s else "-",
                f"{s.decode_step.bound}*" if s else "-",
                f"{100 * s.adapter_overhead_fraction:+.0f} %" if s else "-",
                f"{s.request_seconds:,.1f}" if s else "-",
            ]
        )
        if s is None:
            notes.append(f"  {fit.gpu.name}: speed '-': {fit.speed_error}")
    heads = [
        "GPU",
        "memory",
        "fits",
        "margin",
        "prefill tok/s",
        "decode tok/s",
        "decode bound",
        "adapters",
        "request s",
    ]
    lines = []
    if rows:
        lines.append(table(rows, heads, [False, True, False, True, True, True, False, True, True]))
        lines.append(headroom_note(headroom))
        lines.append(
            "speed: the training path's roofline constants (fitted on H200 training steps); "
            f"* {SPEED_EVIDENCE}. 'adapters': decode step time with the adapters unmerged vs "
            "without; 'request s': prefill + every decoding step"
        )
    hidden = len(ordered) - len(shown)
    if hidden:
        lines.append(f"{hidden} GPU(s) of the catalog do not fit (--gpu NAME lists any)")
    if not rows and not hidden:
        lines.append("no GPU selected")
    return "\n".join(lines + notes)


def render_fit_answer(answer: FitAnswer) -> str:
    what = "batch" if answer.target == "batch" else "context (tokens per sequence)"
    if answer.value is None:
        return (
            f"fit: no {what} fits {answer.gpu} within {gib(answer.budget_bytes)} "
            f"({100 * answer.headroom:.0f} % headroom)"
        )
    return (
        f"fit: the largest {what} on {answer.gpu} is {answer.value:,} "
        f"({gib(answer.device_total_bytes or 0)} of a {gib(answer.budget_bytes)} budget, "
        f"{100 * answer.headroom:.0f} % headroom); the report below is for it"
    )


def render_serve_result(result: ServeResult, all_gpus: bool = False) -> str:
    parts = []
    if result.fit is not None:
        parts.append(render_fit_answer(result.fit))
        if result.fit.value is None:
            return parts[0]
    parts += [
        render_serve_memory(result.memory),
        render_serve_fits(result.fits, all_gpus, result.headroom),
    ]
    return "\n\n".join(parts)
