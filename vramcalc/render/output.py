"""What every report writer shares: a CSV of flat rows, and a two-panel matplotlib figure
saved as PNG (headless: the Agg backend)."""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], empty_columns: Sequence[str]) -> Path:
    """``rows`` as CSV, the first row's keys as the header (``empty_columns`` without rows)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else list(empty_columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


@contextlib.contextmanager
def two_panels(path: Path, figsize: tuple[float, float], dpi: int) -> Iterator[tuple[Any, Any]]:
    """The (left, right) axes of a figure that is laid out and saved to ``path`` on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=figsize)
    try:
        yield left, right
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
