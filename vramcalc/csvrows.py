"""The one reader of CSV case lists (``vramcalc sweep --cases``, the harness's CSV cases).

A file is read as UTF-8 (with or without a byte-order mark), its delimiter (comma, semicolon
or tab) taken from the header line; a column is named like the option it sets (``seq_len``,
``Seq-Len`` and ``--seq-len`` are one name); a blank cell is "not set here" and a row of
blank cells is skipped. What a cell's text means is the plan's one reader
(``training_plan.text_value``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def column_name(header: str) -> str:
    """``--Seq-Len`` → ``seq_len``."""
    return header.strip().lstrip("-").lower().replace("-", "_").replace(" ", "_")


@dataclass(frozen=True)
class CsvRow:
    """One row below the header: its line number, its non-blank cells by column name, and the
    non-blank cells beyond the header's columns."""

    line: int
    cells: dict[str, str]
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class CsvTable:
    headers: tuple[str, ...]  # as written
    names: tuple[str, ...]  # ``column_name`` of each
    rows: tuple[CsvRow, ...]  # rows with at least one non-blank cell


def read_csv(path: str | Path) -> CsvTable:
    """The table of ``path``; ``OSError`` / ``UnicodeDecodeError`` when it cannot be read."""
    text = Path(path).read_text(encoding="utf-8-sig")
    try:
        dialect: Any = csv.Sniffer().sniff(text.split("\n", 1)[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(text.splitlines(), dialect)
    headers = tuple(next(reader, None) or ())
    names = tuple(column_name(h) for h in headers)
    rows = []
    for line, cells in enumerate(reader, start=2):  # line 1 is the header
        if not any(c.strip() for c in cells):
            continue
        named = {n: c.strip() for n, c in zip(names, cells, strict=False) if c.strip()}
        extra = tuple(c.strip() for c in cells[len(names) :] if c.strip())
        rows.append(CsvRow(line, named, extra))
    return CsvTable(headers, names, tuple(rows))
