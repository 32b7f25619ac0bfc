"""The ``vramcalc fit`` report and the sweep's table columns (text, Markdown; ``export`` writes the files)."""

from __future__ import annotations

from typing import Any

from vramcalc.fitting import FitResult, Probe
from vramcalc.render.tables import (
    gib,
    plan_heading,
    table,
)
from vramcalc.sweeps import GPU_COLUMN, PLAN_FIELDS, SweepResult


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
    "tokens_per_second_all_gpus": ("tokens/s all GPUs", "", "#,##0", "{:,.0f}"),
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
#: shown too where a row runs on several GPUs
SUMMARY_PER_GPU_MULTI = ("tokens_per_second_all_gpus",)


def summary_columns(
    result: SweepResult, records: list[dict[str, Any]], max_gpu_columns: int | None = None
) -> list[str]:
    """The columns people read first: the plan columns that define a row (``DEFINING``, the
    options given, and any that vary among the rows that have them), key totals, fits,
    errors."""
    valid = [r for r in records if not r["error"]] or records  # error rows hold raw inputs
    plan_columns = [
        name
        for name in PLAN_FIELDS
        if name in result.columns
        and (name in DEFINING or name in result.given or _varies(name, valid))
    ]
    columns = plan_columns + ([GPU_COLUMN, "fits"] if GPU_COLUMN in result.columns else [])
    columns += list(KEY_RESULTS)
    if max_gpu_columns is None or len(result.gpus) <= max_gpu_columns:
        shown = SUMMARY_PER_GPU
        if any((r.get("num_gpus") or 1) > 1 for r in valid):
            shown += SUMMARY_PER_GPU_MULTI
        columns += [c for c in result.columns if (per_gpu(c) or ("",))[0] in shown]
    columns.append("smallest_fitting_gpu")
    if result.errors:
        columns.append("error")
    return columns


def _varies(name: str, records: list[dict[str, Any]]) -> bool:
    """Whether a plan column takes several values among the rows that have it (a row whose
    method or settings lack the field leaves it blank: that is no variation)."""
    return len({repr(r[name]) for r in records if r[name] is not None}) > 1


def per_gpu(column: str) -> tuple[str, str] | None:
    """``cost_usd_RTX-4090`` → ``("cost_usd", "RTX-4090")``; None for other columns (the
    longest prefix first: ``tokens_per_second_all_gpus`` before ``tokens_per_second``)."""
    for prefix in sorted(PER_GPU, key=len, reverse=True):
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
