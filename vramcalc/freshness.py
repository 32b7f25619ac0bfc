"""Whether ``reports/`` is what ``vramcalc report`` writes on the code and data at hand.

``vramcalc report`` records in ``accuracy.json`` what it was computed from (``report_inputs``):
the estimator's version (vramcalc's, and the allocator simulation's ``SIMULATION_VERSION``),
the CSV's columns, and a SHA-256 of every data file an estimate or the comparison reads
(``data/calibration.json``, ``data/gpus.csv``, ``data/models/``, the measurements). A report
whose inputs differ from today's is stale: written by an older estimator, on other data, or
in another schema. ``stale_report_problems`` says how, one sentence each; the test suite fails
on any (``tests/test_freshness.py``), and the slow test there also rewrites the report and
compares it with the committed one byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import vramcalc
from vramcalc.catalog import DATA_DIR
from vramcalc.memory.slack import SIMULATION_VERSION
from vramcalc.training_plan import PLAN_FIELDS

FIGURES_FILE = "accuracy.json"
CSV_FILE = "accuracy.csv"
METRICS = ("device_total_bytes", "peak_reserved_bytes", "peak_allocated_bytes")
#: the columns of accuracy.csv, in order (``accuracy.report_table``)
CSV_COLUMNS = (
    ("case_id", "split", "source_file", "status", "gpu_name")
    + PLAN_FIELDS
    + tuple(f"{kind}_{m}" for m in METRICS for kind in ("measured", "estimated", "error_pct"))
    + (
        "measured_tokens_per_second",
        "predicted_tokens_per_second",
        "error_pct_tokens_per_second",
        "estimate_error",
    )
)
RERUN = "run `vramcalc report` and commit reports/"
#: the committed reports of a source checkout
REPORTS_DIR = DATA_DIR.parent / "reports"


def estimator_version() -> str:
    """vramcalc's version and the allocator simulation's: what makes the report's numbers."""
    return f"vramcalc {vramcalc.__version__}, allocator simulation {SIMULATION_VERSION}"


def _data_files(measurements_dir: Path) -> list[tuple[str, Path]]:
    """(name, path) of the data the report reads: the estimator's data and the records."""
    files = [DATA_DIR / "calibration.json", DATA_DIR / "gpus.csv"]
    files += sorted(p for p in (DATA_DIR / "models").rglob("*") if p.is_file())
    out = [(path.relative_to(DATA_DIR).as_posix(), path) for path in files]
    records = sorted(Path(measurements_dir).glob("*.jsonl"))  # what load_measurements reads
    return out + [(f"measurements/{path.name}", path) for path in records]


def data_digest(measurements_dir: Path) -> str:
    """SHA-256 over the names and bytes of every data file the report reads."""
    digest = hashlib.sha256()
    for name, path in _data_files(measurements_dir):
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def report_inputs(measurements_dir: Path) -> dict[str, Any]:
    """What a report is computed from, as ``accuracy.json`` records it under ``inputs``."""
    return {
        "estimator": estimator_version(),
        "csv_columns": list(CSV_COLUMNS),
        "data_sha256": data_digest(measurements_dir),
    }


def stale_report_problems(out_dir: Path, measurements_dir: Path) -> list[str]:
    """How the report in ``out_dir`` differs from what ``vramcalc report`` would write now
    (its recorded inputs against today's, its CSV header against today's columns), as
    sentences; empty: current."""
    path = Path(out_dir) / FIGURES_FILE
    if not path.is_file():
        return [f"{path} is missing; {RERUN}"]
    recorded = json.loads(path.read_text()).get("inputs")
    if not isinstance(recorded, dict):
        return [f"{path} records no inputs: written by a vramcalc older than the check; {RERUN}"]
    now = report_inputs(measurements_dir)
    problems = []
    if recorded.get("estimator") != now["estimator"]:
        problems.append(
            f"{path} was written by {recorded.get('estimator')}, this is {now['estimator']}; "
            + RERUN
        )
    if recorded.get("data_sha256") != now["data_sha256"]:
        problems.append(
            f"{path} was computed on other data (calibration, GPUs, model configs or "
            f"measurements changed since); {RERUN}"
        )
    if recorded.get("csv_columns") != now["csv_columns"]:
        problems.append(f"{path} lists other CSV columns than vramcalc writes now; {RERUN}")
    csv_path = Path(out_dir) / CSV_FILE
    header = csv_path.read_text().split("\n", 1)[0].split(",") if csv_path.is_file() else None
    if header != list(CSV_COLUMNS):
        extra = sorted(set(header or ()) - set(CSV_COLUMNS))
        missing = sorted(set(CSV_COLUMNS) - set(header or ()))
        problems.append(
            f"{csv_path} has other columns than vramcalc writes now (extra: "
            f"{', '.join(extra) or 'none'}; missing: {', '.join(missing) or 'none'}); {RERUN}"
        )
    return problems
