"""Sweep results as files (the text and Markdown tables themselves are ``render``'s).

Formats, chosen by the output file's extension (``write_sweep``):

``.csv`` / ``.json`` / ``.jsonl``  every column of ``SweepResult.records``
    (exact ``*_bytes`` and rounded ``*_gib``), for programs and pandas;
``.md``    a GitHub-flavoured Markdown table of the summary columns (``render.render_sweep``);
``.xlsx``  for people: a *summary* sheet (headers with units, GiB to two
    decimals, fits coloured green/red), a *details* sheet with every column
    under its schema name (so ``pandas.read_excel(..., "details")`` round-trips),
    and a *gpus* sheet with each GPU's memory and the budget the headroom
    leaves. Written by pandas with openpyxl (``pip install -e ".[export]"``);
    header rows frozen, columns filterable.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from vramcalc.errors import VramcalcError
from vramcalc.fitting import budget_bytes
from vramcalc.memory import GIB
from vramcalc.render.capacity import (
    PER_GPU,
    cell_text,
    header,
    per_gpu,
    render_sweep,
    summary_columns,
)
from vramcalc.sweeps import SweepResult

FORMATS = (".csv", ".xlsx", ".json", ".jsonl", ".md")


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
        path.write_text(render_sweep(result, markdown=True) + "\n", encoding="utf-8")


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
    if split := per_gpu(column):
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
