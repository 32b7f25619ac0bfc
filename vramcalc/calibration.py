"""The one reader of ``data/calibration.json``.

The file holds every constant the estimator cannot derive from library source
(memory overheads, throughput efficiencies), each with its source. It is read
once per process here; ``memory.overhead.load_calibration`` and
``throughput.load_throughput_calibration`` parse their parts of it, and the
commands pass the parsed objects in (``estimate.prepare``), so no rule reads a
file.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from vramcalc.catalog import DATA_DIR
from vramcalc.errors import CatalogError

CALIBRATION_JSON = DATA_DIR / "calibration.json"


@functools.lru_cache(maxsize=1)
def calibration_json() -> dict[str, Any]:
    """The parsed ``data/calibration.json`` (read once; a ``CatalogError`` if unreadable)."""
    try:
        raw = json.loads(CALIBRATION_JSON.read_text())
    except (OSError, ValueError) as err:
        raise CatalogError(f"calibration file {CALIBRATION_JSON} is unreadable ({err})") from err
    if not isinstance(raw, dict):
        raise CatalogError(f"calibration file {CALIBRATION_JSON} is not a JSON object")
    return raw


def write_throughput_entries(entries: dict[str, Any], path: Path | None = None) -> Path:
    """Replace the ``throughput_*`` entries of ``path`` (default ``CALIBRATION_JSON``) by
    ``entries``; keep every other entry (and its place) as it is."""
    path = path or CALIBRATION_JSON
    raw = json.loads(path.read_text())
    kept = {k: v for k, v in raw.items() if not k.startswith("throughput_")}
    path.write_text(json.dumps(kept | dict(entries), indent=2, ensure_ascii=False) + "\n")
    calibration_json.cache_clear()
    return path
