"""Sweep results as files and tables; ``fit`` results as text.

Formats, chosen by the output file's extension (``write_sweep``):

``.csv`` / ``.json`` / ``.jsonl``  every column of ``SweepResult.records``
    (exact ``*_bytes`` and rounded ``*_gib``), for programs and pandas;
``.md``    a GitHub-flavoured Markdown table of the summary columns;
``.xlsx``  for people: a *summary* sheet (headers with units, GiB to two
    decimals, fits coloured green/red), a *details* sheet with every column
    under its schema name (so ``pandas.read_excel(..., "details")`` round-trips),
    and a *gpus* sheet with each GPU's memory and the budget the headroom
    leaves. Written by pandas with openpyxl (``pip install 'vramcalc[export]'``);
    header rows frozen, columns filterable.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from vramcalc.errors import VramcalcError
from vramcalc.fit import FitResult, Probe, budget_bytes
from vramcalc.memory import GIB
from vramcalc.render import gib, plan_heading
from vramcalc.sweep import GPU_COLUMN, PLAN_FIELDS, SweepResult

FORMATS = (".csv", ".xlsx", ".json", ".jsonl", ".md")
MAX_GPU_COLUMNS_IN_TABLES = 6  # more GPUs: text/Markdown tables show smallest_fitting_gpu only
ALWAYS_SHOWN = ("model", "method")
KEY_RESULTS = ("trainable_params", "device_total_gib", "peak_reserved_gib", "peak_allocated_gib")
#: ``<prefix>_<GPU>`` columns: label, unit, XLSX number format, text format.
PER_GPU = {
    "fits": ("fits", "", "General", "{}"),
    "tokens_per_second": ("tokens/s", "", "#,##0", "{:,.0f}"),
    "step_seconds": ("step", "s", "0.000", "{:.3f}"),
    "mfu": ("MFU", "", "0.0%", "{:.1%}"),
    "wall_hours": ("wall time", "h", "#,##0.0", "{:,.1f}"),
    "gpu_hours": ("GPU-hours", "", "#,##0.0", "{:,.1f}"),
    "cost_usd": ("cost", "USD", "#,##0.00", "{:,.2f}"),
}
SUMMARY_PER_GPU = ("fits", "tokens_per_second", "cost_usd")


class ExportError(VramcalcError):
    """An output file cannot be written in the requested format."""


def output_format(path: str | Path) -> str:
    """The format of ``path`` by extension, or ``ExportError`` listing the supported ones."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ExportError(
            f"-o {path}: unknown output format {suffix or '(no extension)'!r}; use one of "
            f"{', '.join(FORMATS)}, or no -o for a table on stdout."
        )
    return suffix


def check_output(path: str | Path) -> str:
    """``output_format`` plus a folder that exists and can be written: checked before a sweep
    computes anything, so a long sweep does not fail at the end."""
    fmt = output_format(path)
    folder = Path(path).expanduser().resolve().parent
    if not folder.is_dir():
        raise ExportError(f"-o {path}: the folder {folder} does not exist; create it first.")
    if not os.access(folder, os.W_OK):
        raise ExportError(f"-o {path}: the folder {folder} is not writable.")
    if Path(path).is_dir():
        raise ExportError(f"-o {path}: is a folder; give a file name such as plans{fmt}.")
    return fmt


def write_sweep(result: SweepResult, path: str | Path) -> None:
    """Write ``result`` to ``path`` in the format its extension names."""
    fmt = output_format(path)
    path = Path(path)
    if fmt == ".xlsx":
        write_xlsx(result, path)
        return
    records, columns = result.records(), result.columns
    if fmt == ".csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)
    elif fmt == ".json":
        path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    elif fmt == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(render_markdown(result) + "\n", encoding="utf-8")


# -- columns and cells ---------------------------------------------------------------------
def summary_columns(
    result: SweepResult, records: list[dict[str, Any]], max_gpu_columns: int | None = None
) -> list[str]:
    """The columns people read first: plan columns that vary, key totals, fits, errors."""
    valid = [r for r in records if not r["error"]] or records  # error rows hold raw inputs
    varying = [
        name
        for name in PLAN_FIELDS
        if name in ALWAYS_SHOWN or len({repr(r[name]) for r in valid}) > 1
    ]
    columns = varying + ([GPU_COLUMN, "fits"] if GPU_COLUMN in result.columns else [])
    columns += list(KEY_RESULTS)
    if max_gpu_columns is None or len(result.gpus) <= max_gpu_columns:
        columns += [c for c in result.columns if (_per_gpu(c) or ("",))[0] in SUMMARY_PER_GPU]
    columns.append("smallest_fitting_gpu")
    if result.errors:
        columns.append("error")
    return columns


def _per_gpu(column: str) -> tuple[str, str] | None:
    """``cost_usd_RTX-4090`` → ``("cost_usd", "RTX-4090")``; None for other columns."""
    for prefix in PER_GPU:
        if column.startswith(prefix + "_"):
            return prefix, column[len(prefix) + 1 :]
    return None


def header(column: str) -> str:
    """A column's name for people, unit included: ``device_total_gib`` → ``device total (GiB)``."""
    if split := _per_gpu(column):
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
    if split := _per_gpu(column):
        return PER_GPU[split[0]][3].format(value)
    if column.endswith("_gib"):
        return f"{value:,.2f}"
    if isinstance(value, int) and column.endswith(("_params", "_bytes")):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _numeric(column: str) -> bool:
    if split := _per_gpu(column):
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


def _table(result: SweepResult) -> tuple[list[str], list[list[str]]]:
    records = result.records()
    columns = summary_columns(result, records, MAX_GPU_COLUMNS_IN_TABLES)
    rows = [[cell_text(c, r[c]) for c in columns] for r in records]
    return columns, rows


def render_table(result: SweepResult) -> str:
    """The sweep as an aligned text table (summary columns)."""
    columns, rows = _table(result)
    heads = [header(c) for c in columns]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(heads)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(w) if _numeric(c) else cell.ljust(w)
            for c, cell, w in zip(columns, cells, widths, strict=True)
        ).rstrip()

    return "\n".join([line(heads), line(["-" * w for w in widths]), *map(line, rows)])


def render_markdown(result: SweepResult) -> str:
    """The sweep as a GitHub-flavoured Markdown table (summary columns)."""
    columns, rows = _table(result)

    def escape(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(escape(header(c)) for c in columns) + " |",
        "|" + "|".join("---:" if _numeric(c) else "---" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# -- XLSX ------------------------------------------------------------------------------------
def write_xlsx(result: SweepResult, path: Path) -> None:
    """The people's workbook: summary, details and gpus sheets (see the module docstring)."""
    try:
        import pandas as pd
        from openpyxl.formatting.rule import CellIsRule
        from openpyxl.styles import Font, PatternFill
    except ImportError as err:
        raise ExportError(
            f"-o {path}: XLSX output needs pandas and openpyxl ({err}); "
            "pip install 'vramcalc[export]'."
        ) from err
    records = result.records()
    details = pd.DataFrame(records, columns=result.columns, dtype=object)
    summary_cols = summary_columns(result, records)
    gpus = pd.DataFrame(
        [
            {
                "gpu": gpu.name,
                "memory_gib": gpu.memory_bytes / GIB,
                "headroom": result.headroom,
                "budget_gib": budget_bytes(gpu, result.headroom) / GIB,
                "memory_bytes": gpu.memory_bytes,
                "price_per_hour_usd": gpu.price_per_hour_usd,
            }
            for gpu in result.gpus
        ],
        columns=[
            "gpu",
            "memory_gib",
            "headroom",
            "budget_gib",
            "memory_bytes",
            "price_per_hour_usd",
        ],
        dtype=object,
    )
    sheets = {
        "summary": (details[summary_cols].rename(columns=header), summary_cols),
        "details": (details, result.columns),
        "gpus": (gpus.rename(columns=header), list(gpus.columns)),
    }
    green = PatternFill(start_color="C6EFCE", end_color="C6EFCE", fill_type="solid")
    red = PatternFill(start_color="FFC7CE", end_color="FFC7CE", fill_type="solid")
    with pd.ExcelWriter(path, engine="openpyxl") as writer:
        for name, (frame, columns) in sheets.items():
            frame.to_excel(writer, sheet_name=name, index=False)
            sheet = writer.sheets[name]
            sheet.freeze_panes = "B2"
            sheet.auto_filter.ref = sheet.dimensions
            last_row = max(sheet.max_row, 2)
            for index, column in enumerate(columns, start=1):
                letter = sheet.cell(row=1, column=index).column_letter
                cells = f"{letter}2:{letter}{last_row}"
                for (cell,) in sheet[cells]:
                    cell.number_format = _number_format(column)
                if column == "fits" or column.startswith("fits_"):
                    sheet.conditional_formatting.add(
                        cells, CellIsRule(operator="equal", formula=["TRUE"], fill=green)
                    )
                    sheet.conditional_formatting.add(
                        cells, CellIsRule(operator="equal", formula=["FALSE"], fill=red)
                    )
                if column == "error":
                    for (cell,) in sheet[cells]:
                        cell.font = Font(color="9C0006")
                width = max(
                    [len(str(sheet.cell(row=1, column=index).value))]
                    + [len(cell_text(column, r.get(column))) for r in records[:200]]
                )
                sheet.column_dimensions[letter].width = min(max(width + 2, 8), 60)


def _number_format(column: str) -> str:
    if split := _per_gpu(column):
        return PER_GPU[split[0]][2]
    if column.endswith("_gib"):
        return "0.00"
    if column.endswith(("_bytes", "_params")):
        return "#,##0"
    if column == "headroom":
        return "0%"
    if column.endswith("_usd"):
        return "0.00"
    return "General"


# -- fit -------------------------------------------------------------------------------------
def render_fit(result: FitResult) -> str:
    """The ``vramcalc fit`` report."""
    what = "batch size" if result.field == "batch_size" else "sequence length"
    shown = result.best or result.first_too_large
    assert shown is not None  # a search always makes its first probe
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
        assert probe is not None
        hints = [
            "--method qlora" if plan.method != "qlora" else "",
            "--gradient-checkpointing" if not plan.gradient_checkpointing else "",
            "a shorter --seq-len" if result.field == "batch_size" else "a smaller --batch-size",
            "a larger GPU",
        ]
        lines += [
            f"Does not fit even at {what} {probe.value}: device total {gib(probe.estimate.device_total_bytes)} "
            f"> budget {gib(result.budget_bytes)}.",
            "Try " + ", ".join(h for h in hints if h) + ".",
        ]
        return "\n".join(lines)
    lines.append(f"largest {what} that fits: {result.best.value:,}")
    lines.append(_probe_line(what, result.best, "fits"))
    if result.first_too_large is not None:
        lines.append(_probe_line(what, result.first_too_large, "does not fit"))
    else:
        limit = "the model's context length" if result.field == "seq_len" else "the search limit"
        lines.append(f"  {what} {result.best.value:,} is {limit}; larger values were not searched")
    lines += ["", f"{result.estimates_made} estimates (doubling, then bisection)"]
    return "\n".join(lines)


def _probe_line(what: str, probe: Probe, verdict: str) -> str:
    est = probe.estimate
    return (
        f"  {what} {probe.value:>7,}  {verdict:<13} device total {gib(est.device_total_bytes)}"
        f"  (peak reserved {gib(est.peak_reserved_bytes)}, allocated {gib(est.peak_allocated_bytes)})"
    )
