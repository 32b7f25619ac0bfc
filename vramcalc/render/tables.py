"""Every text vramcalc shows people: the library returns data, this module writes it.

Tables are drawn by ``tabulate`` through one helper, ``table``: its ``simple`` format for
the terminal and GitHub Markdown (``pipe``: GFM tables with column alignment) for ``.md``
files. Numbers are formatted here
(GiB to two decimals, counts with separators) and right-aligned; a ``-`` in a table always
has a note under it that says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from vramcalc.catalog import CatalogModel, Gpu
from vramcalc.estimate import MemoryEstimate
from vramcalc.fit import FitResult, Probe
from vramcalc.memory import GIB
from vramcalc.plan import TrainingPlan
from vramcalc.planner import GpuFit, Hint, PlanResult
from vramcalc.speed.cost import CostTable
from vramcalc.speed.throughput import (
    ThroughputCalibration,
    ThroughputEstimate,
    compute_dtype,
    transfer_note,
)
from vramcalc.speed.throughput_fit import FITTED, ThroughputFit
from vramcalc.sweep import GPU_COLUMN, PLAN_FIELDS, SweepResult

COMPONENT_LABELS = {
    "weights": "base weights",
    "adapters": "LoRA adapters",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "rank_allocator": "AdaLoRA rank-allocator state",
    "activations": "activations",
    "logits": "logits + loss",
    "transient": "step temporaries",
    "gathered_weights": "gathered (unsharded) weights",
    "comm_buffers": "communication buffers",
    "cublas_workspace": "cuBLAS workspace",
    "trace_difference": "traced step beyond the rules",
    "allocator_reserve": "allocator reserve (slack)",
    "cuda_context": "CUDA context + kernels",
    "driver_reserved": "driver reserve",
    "nccl": "NCCL communicators",
    "paged_optimizer_states": "paged optimizer states",
}


# -- the one table helper ------------------------------------------------------------------
def table(
    rows: Sequence[Sequence[str]],
    headers: Sequence[str],
    numeric: Sequence[bool] | None = None,
    markdown: bool = False,
) -> str:
    """Rows of preformatted cells as a table: plain text, or GitHub Markdown."""
    align = ["right" if n else "left" for n in numeric] if numeric else None
    if markdown:
        escape = [[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in rows]
        heads = [h.replace("|", "\\|") for h in headers]
        return tabulate(escape, heads, tablefmt="pipe", colalign=align, disable_numparse=True)
    return tabulate(rows, headers, tablefmt="simple", colalign=align, disable_numparse=True)


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:,.2f} GiB"


def format_duration(seconds: float) -> str:
    """``95 s``, ``12.5 min``, ``3.4 h``, ``2.1 d``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


# -- plan ------------------------------------------------------------------------------------
def plan_heading(model_name: str, plan: TrainingPlan) -> str:
    """``meta-llama/Llama-2-13b-hf — qlora (nf4)``: the first words of every plan report."""
    return f"{model_name} — {plan.method}" + (f" ({plan.quant})" if plan.is_kbit else "")


def render_plan_result(result: PlanResult, all_gpus: bool = False, verbose: bool = False) -> str:
    """The ``vramcalc plan`` report: memory, the GPUs it fits with their speed, run cost.

    Without ``all_gpus`` only the fitting GPUs are listed (smallest memory first) with a
    count of the others; ``verbose`` adds each rule, price source and efficiency source.
    """
    parts = [render_memory(result.memory, verbose)]
    if result.fits:
        parts.append(render_gpu_fits(result.fits, all_gpus, verbose))
    parts += [render_hint(hint) for hint in result.hints]
    if result.cost is not None:
        parts.append(render_cost(result.cost, verbose))
    return "\n\n".join(parts)


def render_hint(hint: Hint) -> str:
    return (
        f"hint: activations are {100 * hint.activations_share:.0f} % of the total; "
        f"{hint.option} brings the device total from {gib(hint.device_total_bytes)} to "
        f"{gib(hint.device_total_bytes_with_option)} (one more forward per step)"
    )


def render_memory(estimate: MemoryEstimate, verbose: bool = False) -> str:
    """The memory part of the ``vramcalc plan`` report."""
    plan, total = estimate.plan, estimate.device_total_bytes
    rows = [
        [COMPONENT_LABELS.get(name, name), gib(nbytes), f"{100 * nbytes / total:.1f} %"]
        for name, nbytes in estimate.components.items()
        if nbytes and (name != "trace_difference" or abs(nbytes) >= 0.005 * GIB)
    ]
    per_gpu = (
        f", per GPU; {gib(estimate.total_device_bytes_all_gpus)} on {plan.num_gpus} GPUs"
        if plan.num_gpus > 1
        else ""
    )
    totals = [
        ["peak allocated", gib(estimate.peak_allocated_bytes), "torch max_memory_allocated"],
        ["peak reserved", gib(estimate.peak_reserved_bytes), "torch max_memory_reserved"],
        ["device total", gib(total), "nvidia-smi; what the GPU must hold" + per_gpu],
    ]
    lines = [
        plan_heading(estimate.model_name, plan)
        + f", seq {plan.seq_len} x batch {plan.batch_size}, gradient checkpointing "
        + ("on" if plan.gradient_checkpointing else "off"),
        f"parameters: {estimate.total_params:,} total, {estimate.trainable_params:,} trainable "
        f"({100 * estimate.trainable_params / max(estimate.total_params, 1):.3f} %)",
        "",
        table(rows, ["component", "memory", "share"], [False, True, True]),
        "",
        table(totals, ["total", "memory", "compare with"], [False, True, False]),
        f"peak falls at: {estimate.peak_phase.replace('_', ' ')}",
        "",
        "assumptions:",
        *[f"  - {a}" for a in estimate.assumptions],
    ]
    if verbose:
        lines += ["", "rules and sources:", *[f"  {k}: {v}" for k, v in estimate.rules.items()]]
    return "\n".join(lines)


def _fits_cell(fit: GpuFit) -> str:
    return "no bf16" if fit.blocker else ("yes" if fit.fits else "no")


def render_gpu_fits(fits: Sequence[GpuFit], all_gpus: bool = False, verbose: bool = False) -> str:
    """GPUs by memory, smallest first: the fitting ones (every one with ``all_gpus``)."""
    ordered = sorted(fits, key=lambda f: (f.gpu.memory_bytes, f.gpu.name))
    shown = ordered if all_gpus else [f for f in ordered if f.fits]
    rows, notes = [], []
    for fit in shown:
        speed = fit.throughput
        rows.append(
            [
                fit.gpu.name,
                gib(fit.gpu.memory_bytes),
                _fits_cell(fit),
                gib(fit.headroom_bytes),
                f"{speed.tokens_per_second:,.0f}" if speed else "-",
                f"{speed.step_seconds:.2f}" if speed else "-",
                f"{100 * speed.mfu:.0f} %" if speed else "-",
                speed_basis(speed),
            ]
        )
        if fit.blocker:
            notes.append(f"  {fit.gpu.name}: {fit.blocker}")
        elif speed is None:
            notes.append(f"  {fit.gpu.name}: speed '-': {fit.throughput_error}")
    lines = []
    if rows:
        heads = ["GPU", "memory", "fits", "headroom", "tokens/s", "step s", "MFU", "bound"]
        lines.append(table(rows, heads, [False, True, False, True, True, True, True, False]))
    hidden = [f for f in ordered if f not in shown]
    if not any(f.fits for f in ordered):
        largest = ordered[-1]
        lines.append(
            f"fits no GPU of the {'list' if all_gpus else 'catalog'}: the largest, "
            f"{largest.gpu.name} ({gib(largest.gpu.memory_bytes)}), is "
            f"{gib(-largest.headroom_bytes)} short"
            if largest.headroom_bytes < 0
            else f"fits no GPU of the {'list' if all_gpus else 'catalog'} (see the notes)"
        )
    too_small = [f for f in hidden if f.headroom_bytes < 0]
    blocked = [f.gpu.name for f in hidden if f.blocker and f.headroom_bytes >= 0]
    if too_small:
        lines.append(
            f"{len(too_small)} more GPU{'s' if len(too_small) > 1 else ''} of the catalog "
            "do not fit (--all-gpus lists every GPU)"
        )
    if blocked:
        lines.append(
            f"{', '.join(blocked)} would hold it but {'have' if len(blocked) > 1 else 'has'} "
            "no bf16 tensor cores for the recipe's Trainer(bf16=True); --dtype fp16 plans "
            "fp16 autocast for them"
        )
    lines += notes
    speeds = [f.throughput for f in shown if f.throughput]
    lines += speed_note(speeds)
    if speeds and verbose:
        lines += ["", render_throughput(speeds[0])]
    return "\n".join(lines)


def speed_basis(e: ThroughputEstimate | None) -> str:
    """What bounds the step, and ``*`` where no measurement backs the GPU (``speed_note``)."""
    if e is None:
        return "-"
    return e.bound + ("" if e.measured else "*")


def speed_note(estimates: Sequence[ThroughputEstimate]) -> list[str]:
    """The lines under a speed table: where the constants were measured; ``*`` rows."""
    if not estimates:
        return []
    lines = [f"speed: {transfer_note(estimates[0].calibration)}"]
    unmeasured = [e.gpu.name for e in estimates if not e.measured]
    if unmeasured and estimates[0].calibration.fitted:
        lines.append(
            "  * no measurement backs " + ", ".join(unmeasured) + ": speed derived from "
            f"{estimates[0].calibration.measured_on_text} (plan --verbose says how)"
        )
    return lines


def render_throughput(estimate: ThroughputEstimate) -> str:
    """How one GPU's step time is made (``plan --verbose``, for the smallest fitting GPU)."""
    e, s, w, c = estimate, estimate.seconds, estimate.work.step, estimate.calibration
    all_gpus = (
        f", {e.tokens_per_second_all_gpus:,.0f} on {e.plan.num_gpus} GPUs"
        if e.plan.num_gpus > 1
        else ""
    )
    rows = [
        [
            "step time",
            f"{e.step_seconds:.3f} s ({e.plan.grad_accum} micro-batch(es)), bound by {e.bound}: "
            f"waits on compute {s['compute']:.3f} s, memory {s['memory']:.3f} s, "
            f"host {s['host']:.3f} s",
        ],
        ["tokens/s", f"{e.tokens_per_second:,.0f} per GPU{all_gpus}"],
        ["MFU", f"{100 * e.mfu:.1f} % (model FLOPs, no recompute; HFU {100 * e.hfu:.1f} %)"],
        [
            "work / step",
            f"{w.matmul_flops:.3e} matmul FLOPs, {w.memory_bytes / 1e9:,.1f} GB moved, "
            f"{w.kernels:,.0f} kernels, {w.total('dispatches'):,.0f} dispatches "
            f"({w.total('python_calls'):,.0f} from Python), {w.syncs:,.0f} syncs",
        ],
        [
            "all GPU / host",
            f"{e.time.gpu_seconds:.3f} s / {e.time.host_seconds:.3f} s (overlapped between syncs)",
        ],
        [
            "constants",
            f"matmul {c.compute_efficiency:.2f} and attention {c.attention_efficiency:.2f} of peak, "
            f"{c.bandwidth_efficiency:.2f} of bandwidth, {1e6 * c.kernel_seconds:.1f} us a kernel; "
            f"host {1e6 * c.python_call_seconds:.1f} us a Python call + "
            f"{1e6 * c.dispatch_seconds:.1f} us a dispatch, {1e3 * c.step_overhead_seconds:.1f} ms "
            f"a step; measured on: {c.measured_on_text}",
        ],
        ["derived", e.derivation],
    ]
    head = (
        f"throughput on {e.gpu.name} ({e.peak_tflops:g} {compute_dtype(e.plan)} TFLOP/s, "
        f"{e.gpu.memory_bandwidth_gbps:g} GB/s)"
    )
    body = tabulate(rows, tablefmt="plain", disable_numparse=True)
    return head + "\n" + "\n".join("  " + line for line in body.splitlines())


def render_cost(cost: CostTable, verbose: bool = False) -> str:
    """The run-cost block: one line per GPU type (sources with ``verbose``, always in JSON)."""
    lines = [f"run: {cost.run.describe(cost.plan)}"]
    if not cost.rows and not cost.skipped:
        return lines[0] + "\nrun cost: no GPU of the list fits"
    rows, notes = [], []
    for row in sorted(cost.rows, key=lambda r: (r.throughput.gpu.memory_bytes, r.gpu_name)):
        unpriced = row.price_per_hour_usd is None
        rows.append(
            [
                row.gpu_name,
                f"{row.throughput.tokens_per_second:,.0f}",
                f"{row.throughput.step_seconds:.2f}",
                f"{100 * row.throughput.mfu:.0f} %",
                speed_basis(row.throughput),
                format_duration(row.wall_seconds),
                f"{row.gpu_hours:,.2f}",
                "-" if unpriced else f"{row.price_per_hour_usd:.2f}",
                "-" if row.cost_usd is None else f"{row.cost_usd:,.2f}",
            ]
        )
        if unpriced:
            notes.append(f"  {row.gpu_name}: cost '-': {row.price_source}")
    for name, reason in cost.skipped:
        rows.append([name, "-", "-", "-", "-", "-", "-", "-", "-"])
        notes.append(f"  {name}: not priced: {reason}")
    heads = ["GPU", "tokens/s", "step s", "MFU", "bound", "wall time", "GPU-hours", "$/GPU-h"]
    heads.append("cost $")
    numeric = [False, True, True, True, False, True, True, True, True]
    lines += [table(rows, heads, numeric), *notes]
    if verbose:
        lines += [f"  price {row.gpu_name}: {row.price_source}" for row in cost.rows]
        lines += ["  " + line for line in speed_note([row.throughput for row in cost.rows])]
    return "\n".join(lines)


# -- fit -------------------------------------------------------------------------------------
def render_fit(result: FitResult) -> str:
    """The ``vramcalc fit`` report."""
    what = "batch size" if result.field == "batch_size" else "sequence length"
    shown = result.best or result.first_too_large
    if shown is None:  # a search always makes its first probe
        raise ValueError("a FitResult without probes")
    plan = shown.estimate.plan
    fixed = f"seq {plan.seq_len}" if result.field == "batch_size" else f"batch {plan.batch_size}"
    lines = [
        plan_heading(shown.estimate.model_name, plan) + f", {fixed}, on {result.gpu.name}",
        f"GPU memory {gib(result.gpu.memory_bytes)}, headroom {result.headroom:.0%} → budget "
        f"{gib(result.budget_bytes)} for the device total",
        "",
    ]
    if result.best is None:
        probe = result.first_too_large
        if probe is None:
            raise ValueError("a FitResult without probes")
        hints = [
            "--method qlora" if plan.method != "qlora" else "",
            "--gradient-checkpointing" if not plan.gradient_checkpointing else "",
            "a shorter --seq-len" if result.field == "batch_size" else "",
            "a smaller --batch-size" if result.field == "seq_len" and plan.batch_size > 1 else "",
            "a larger GPU",
        ]
        lines += [
            f"Does not fit even at {what} {probe.value:,}: device total "
            f"{gib(probe.estimate.device_total_bytes)} > budget {gib(result.budget_bytes)}.",
            "Try " + ", ".join(h for h in hints if h) + ".",
        ]
        return "\n".join(lines)
    lines.append(f"largest {what} that fits: {result.best.value:,}")
    probes = [_probe_row(result.best, "fits")]
    if result.first_too_large is not None:
        probes.append(_probe_row(result.first_too_large, "does not fit"))
    heads = [what, "verdict", "device total", "peak reserved", "peak allocated"]
    lines.append(table(probes, heads, [True, False, True, True, True]))
    if result.first_too_large is None:
        limit = "the model's context length" if result.field == "seq_len" else "the search limit"
        lines.append(f"{what} {result.best.value:,} is {limit}; larger values were not searched")
    lines += ["", f"{result.estimates_made} estimates (doubling, then bisection)"]
    return "\n".join(lines)


def _probe_row(probe: Probe, verdict: str) -> list[str]:
    est = probe.estimate
    return [
        f"{probe.value:,}",
        verdict,
        gib(est.device_total_bytes),
        gib(est.peak_reserved_bytes),
        gib(est.peak_allocated_bytes),
    ]


# -- sweep -----------------------------------------------------------------------------------
MAX_GPU_COLUMNS_IN_TABLES = 6  # more GPUs: text/Markdown tables show smallest_fitting_gpu only
#: plan columns that define a row: shown even when every row has the same value
DEFINING = ("model", "method", "quant", "rank", "seq_len", "batch_size", "gradient_checkpointing")
KEY_RESULTS = ("trainable_params", "device_total_gib", "peak_reserved_gib", "peak_allocated_gib")
#: ``<prefix>_<GPU>`` columns: label, unit, XLSX number format, text format.
PER_GPU = {
    "fits": ("fits", "", "General", "{}"),
    "tokens_per_second": ("tokens/s", "", "#,##0", "{:,.0f}"),
    "step_seconds": ("step", "s", "0.000", "{:.3f}"),
    "mfu": ("MFU", "", "0.0%", "{:.1%}"),
    "bound": ("bound", "", "General", "{}"),
    "speed_measured": ("speed measured", "", "General", "{}"),
    "wall_hours": ("wall time", "h", "#,##0.0", "{:,.1f}"),
    "gpu_hours": ("GPU-hours", "", "#,##0.0", "{:,.1f}"),
    "cost_usd": ("cost", "USD", "#,##0.00", "{:,.2f}"),
}
SUMMARY_PER_GPU = ("fits", "tokens_per_second", "cost_usd")


def summary_columns(
    result: SweepResult, records: list[dict[str, Any]], max_gpu_columns: int | None = None
) -> list[str]:
    """The columns people read first: the plan columns that define a row (``DEFINING``, the
    options given, and any that vary), key totals, fits, errors."""
    valid = [r for r in records if not r["error"]] or records  # error rows hold raw inputs
    plan_columns = [
        name
        for name in PLAN_FIELDS
        if name in DEFINING or name in result.given or len({repr(r[name]) for r in valid}) > 1
    ]
    columns = plan_columns + ([GPU_COLUMN, "fits"] if GPU_COLUMN in result.columns else [])
    columns += list(KEY_RESULTS)
    if max_gpu_columns is None or len(result.gpus) <= max_gpu_columns:
        columns += [c for c in result.columns if (per_gpu(c) or ("",))[0] in SUMMARY_PER_GPU]
    columns.append("smallest_fitting_gpu")
    if result.errors:
        columns.append("error")
    return columns


def per_gpu(column: str) -> tuple[str, str] | None:
    """``cost_usd_RTX-4090`` → ``("cost_usd", "RTX-4090")``; None for other columns."""
    for prefix in PER_GPU:
        if column.startswith(prefix + "_"):
            return prefix, column[len(prefix) + 1 :]
    return None


def header(column: str) -> str:
    """A column's name for people, unit included: ``device_total_gib`` → ``device total (GiB)``."""
    if split := per_gpu(column):
        label, unit, _, _ = PER_GPU[split[0]]
        return f"{label} {split[1]}" + (f" ({unit})" if unit else "")
    for suffix, unit in (("_gib", " (GiB)"), ("_bytes", " (bytes)"), ("_usd", " (USD)")):
        if column.endswith(suffix):
            return column[: -len(suffix)].replace("_", " ") + unit
    return column.replace("_", " ")


def cell_text(column: str, value: Any) -> str:
    """A value as tables show it: GiB to 2 decimals, counts with separators, yes/no."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if split := per_gpu(column):
        return PER_GPU[split[0]][3].format(value)
    if column.endswith("_gib"):
        return f"{value:,.2f}"
    if isinstance(value, int) and column.endswith(("_params", "_bytes")):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def is_numeric(column: str) -> bool:
    if split := per_gpu(column):
        return split[0] != "fits"
    return column.endswith(("_gib", "_bytes", "_params")) or column in (
        "rank",
        "alpha",
        "dropout",
        "seq_len",
        "batch_size",
        "grad_accum",
        "num_gpus",
        "optimizer_steps",
    )


def render_sweep(result: SweepResult, markdown: bool = False) -> str:
    """The sweep's summary columns as a table (text, or Markdown for ``.md`` files)."""
    records = result.records()
    columns = summary_columns(result, records, MAX_GPU_COLUMNS_IN_TABLES)
    rows = [[cell_text(c, r[c]) for c in columns] for r in records]
    heads = [header(c) for c in columns]
    return table(rows, heads, [is_numeric(c) for c in columns], markdown)


# -- catalogs --------------------------------------------------------------------------------
def render_models(entries: Sequence[CatalogModel]) -> str:
    """``vramcalc models``: every bundled model with its exact parameter count."""
    rows = [[e.name, f"{e.params:,}" if e.params else "-", ", ".join(e.aliases)] for e in entries]
    text = table(rows, ["model", "parameters", "aliases"], [False, True, False])
    if any(not e.params for e in entries):
        text += "\nparameters '-': no published count for that model"
    return text


def render_gpus(gpus: Sequence[Gpu]) -> str:
    """``vramcalc gpus``: by memory, with bf16 and fp16 peaks apart, and why any cell is '-'."""
    rows, no_bf16, unpublished, unpriced = [], [], [], []
    for g in sorted(gpus, key=lambda g: (g.memory_bytes, g.name)):
        if not g.has_bf16:
            no_bf16.append(g.name)
        elif g.bf16_dense_tflops is None:
            unpublished.append(g.name)
        if g.price_per_hour_usd is None:
            unpriced.append(g.name)
        rows.append(
            [
                g.name,
                gib(g.memory_bytes),
                "none" if not g.has_bf16 else _number(g.bf16_dense_tflops),
                _number(g.fp16_dense_tflops),
                _number(g.fp32_tflops),
                _number(g.memory_bandwidth_gbps),
                "-" if g.price_per_hour_usd is None else f"{g.price_per_hour_usd:.2f}",
                ", ".join(g.aliases),
            ]
        )
    heads = ["GPU", "memory", "bf16 TFLOP/s", "fp16 TFLOP/s", "fp32", "GB/s", "$/hour", "aliases"]
    lines = [table(rows, heads, [False, True, True, True, True, True, True, False])]
    if no_bf16:
        lines.append(
            f"bf16 'none': {', '.join(no_bf16)} have no bf16 tensor cores; bf16 plans do not "
            "run there (plan them with --dtype fp16)"
        )
    if unpublished:
        lines.append(
            f"TFLOP/s '-': {', '.join(unpublished)}: the vendor publishes no dense tensor "
            "TFLOP/s, so speed is not predicted (memory fit is)"
        )
    if unpriced:
        lines.append(f"$/hour '-': no price in data/gpus.csv for {', '.join(unpriced)}")
    lines.append("memory: what nvidia-smi reports as total; TFLOP/s: dense tensor-core peaks")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


# -- speed report ----------------------------------------------------------------------------
_CONSTANT_UNITS = {
    "compute_efficiency": ("of the dense matmul peak", 1, "{:.3f}"),
    "fp32_efficiency": ("of the fp32 peak, fp32 matmuls", 1, "{:.3f}"),
    "attention_efficiency": ("of the dense peak, FlashAttention (prior)", 1, "{:.3f}"),
    "bandwidth_efficiency": ("of the memory bandwidth", 1, "{:.3f}"),
    "kernel_seconds": ("us of GPU time a kernel", 1e6, "{:.2f}"),
    "python_call_seconds": ("us of host time a Python-level torch call", 1e6, "{:.2f}"),
    "dispatch_seconds": ("us of host time a dispatched op", 1e6, "{:.2f}"),
    "bnb_tensor_seconds": ("us of host time a bitsandbytes optimizer tensor", 1e6, "{:.1f}"),
    "step_overhead_seconds": ("ms of host time a step", 1e3, "{:.2f}"),
}


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value) + 0.0:+.1f} %"


def _abs_pct(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.1f} %"


def _case_cells(row: dict[str, Any]) -> list[str]:
    return [
        str(row["case_id"])[:8],
        str(row["split"]),
        str(row.get("model") or "").split("/")[-1],
        f"{row.get('method')} {row.get('quant')}",
        f"{row.get('seq_len')}x{row.get('batch_size')}",
        "on" if row.get("gradient_checkpointing") else "off",
        f"{row['measured_tokens_per_second']:,.0f}",
        f"{row['predicted_tokens_per_second']:,.0f}",
        _pct(row["tokens_per_second_error"]),
        str(row["bound"]),
        str(row.get("steps") or "–"),
        _abs_pct(row.get("iqr_over_median")),
    ]


_CASE_HEADS = [
    "case",
    "split",
    "model",
    "method",
    "seq x batch",
    "ckpt",
    "measured tok/s",
    "predicted tok/s",
    "error",
    "bound",
    "steps",
    "IQR/median",
]
_CASE_NUMERIC = [False] * 6 + [True] * 3 + [False, True, True]


def render_speed_report(data: dict[str, Any]) -> str:
    """``reports/throughput.md`` from ``speed_report.SpeedReport.to_json()``."""
    lines = ["# vramcalc speed report (tokens/s)", ""]
    lines.append(
        "Error = predicted / measured tokens/s - 1: positive means the planner promises more "
        "speed than the GPU gave. Measured on: " + (", ".join(data["measured_on"]) or "none") + "."
    )
    lines += ["", "## Accuracy by split", ""]
    cells = [
        [
            split,
            str(s.get("n", 0)),
            _abs_pct(s.get("median_abs_error")),
            _abs_pct(s.get("p90_abs_error")),
            _pct(s.get("max_overprediction")),
            _pct(-s["max_underprediction"] if "max_underprediction" in s else None),
        ]
        for split, s in data["splits"].items()
    ]
    heads = ["split", "n", "median abs", "p90 abs", "max over", "max under"]
    lines += [table(cells, heads, [False] + [True] * 5, markdown=True), ""]
    targets = data["targets"]
    lines.append(
        f"Targets on the validation split: median <= {100 * targets['median_abs_error']:.0f} %, "
        f"p90 <= {100 * targets['p90_abs_error']:.0f} %, no case over-predicted by more than "
        f"{100 * targets['max_overprediction']:.0f} %."
    )
    lines += [f"- {line}" for line in data["distance_to_targets"]]
    lines += ["", "## Constants (data/calibration.json)", ""]
    cells = [
        [name, fmt.format(value * scale), unit]
        for name, value in data["constants"].items()
        for unit, scale, fmt in [_CONSTANT_UNITS[name]]
    ]
    lines += [table(cells, ["constant", "value", "unit"], [False, True, False], markdown=True), ""]
    lines += ["## Worst validation cases", ""]
    worst = [_case_cells(r) for r in data["worst_validation_cases"]]
    lines += [table(worst, _CASE_HEADS, _CASE_NUMERIC, markdown=True), ""]
    lines += ["## Measurement quality", ""]
    spread = data["dispersion"]
    lines.append(
        "Spread of the timed steps of a case, (Q3 - Q1) / median: median "
        f"{_abs_pct(spread['median_iqr_over_median'])}, largest {_abs_pct(spread['max_iqr_over_median'])}."
    )
    repeat = data["repeatability"]
    lines.append(
        f"Plans measured twice (same plan, same GPU, another seed or run): {len(repeat['pairs'])} "
        f"pairs, tokens/s apart by {_abs_pct(repeat['median_abs_difference'])} (median), "
        f"{_abs_pct(repeat['max_abs_difference'])} (largest); target 5 %."
    )
    lines.append("")
    for title, pairs in (
        ("Same plan", repeat["pairs"]),
        ("Same plan under the other allocator setting", repeat["other_allocator_pairs"]),
    ):
        if not pairs:
            continue
        cells = [
            [
                " / ".join(str(c)[:8] for c in p["case_ids"]),
                str(p["model"]).split("/")[-1],
                " / ".join(f"{t:,.0f}" for t in p["tokens_per_second"]),
                _pct(p["difference"]),
            ]
            for p in pairs
        ]
        lines += [f"{title}:", ""]
        heads = ["cases", "model", "tokens/s", "difference"]
        lines += [table(cells, heads, [False, False, True, True], markdown=True), ""]
    if data["excluded"]:
        lines += ["## Not compared", ""]
        lines += [f"- {line}" for line in data["excluded"]]
        lines.append("")
    lines += ["## Cases", ""]
    cases = [_case_cells(r) for r in data["cases"]]
    lines.append(table(cases, _CASE_HEADS, _CASE_NUMERIC, markdown=True))
    return "\n".join(lines) + "\n"


def render_speed_fit(fit: ThroughputFit, prior: ThroughputCalibration) -> str:
    """``vramcalc speed-fit``: each constant before and after, and how well the fit reproduces
    the cases it was fitted on."""
    new = fit.calibration.values()
    cells = [
        [
            name,
            fmt.format(prior.values()[name] * scale),
            fmt.format(new[name] * scale),
            unit + ("" if name in FITTED else " (kept)"),
        ]
        for name in new
        for unit, scale, fmt in [_CONSTANT_UNITS[name]]
    ]
    lines = [
        f"fitted on {len(fit.cases)} calibration cases measured on "
        f"{fit.calibration.measured_on_text} ({fit.iterations} iterations); median |error| "
        f"{100 * fit.median_abs_error:.1f} % on them",
        table(cells, ["constant", "before", "after", "unit"], [False, True, True, False]),
    ]
    if fit.skipped:
        lines += ["not used:", *[f"  {line}" for line in fit.skipped]]
    return "\n".join(lines)
