"""reports/ is what ``vramcalc report`` writes on the committed code and data (issue 22, item 6):
a stale report (older estimator, other data, other columns) fails here, and every figure the
README and the console state names the subset it is over."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

from click.testing import CliRunner

from vramcalc import api
from vramcalc.accuracy import subset_name, target_distances
from vramcalc.cli import cli
from vramcalc.freshness import CSV_COLUMNS, REPORTS_DIR, estimator_version, report_inputs
from vramcalc.measurements import MEASUREMENTS_DIR

ROOT = Path(__file__).resolve().parent.parent
RERUN = "run `vramcalc report` and commit reports/"


def _report_dir(tmp_path: Path, **inputs) -> Path:
    """A report folder as ``vramcalc report`` writes it today, ``inputs`` changed."""
    out = tmp_path / "reports"
    out.mkdir()
    recorded = {**report_inputs(MEASUREMENTS_DIR), **inputs}
    (out / "accuracy.json").write_text(json.dumps({"figures": {}, "inputs": recorded}))
    (out / "accuracy.csv").write_text(",".join(recorded["csv_columns"]) + "\n")
    return out


def test_a_current_report_has_no_problems(tmp_path):
    assert api.stale_reports(_report_dir(tmp_path)) == []


def test_a_report_of_an_older_estimator_is_stale(tmp_path):
    out = _report_dir(tmp_path, estimator="vramcalc 0.0.9, allocator simulation 9")
    assert api.stale_reports(out) == [
        f"{out / 'accuracy.json'} was written by vramcalc 0.0.9, allocator simulation 9, this is "
        f"{estimator_version()}; {RERUN}"
    ]


def test_a_report_without_inputs_is_stale(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "accuracy.json").write_text('{"figures": {}}')
    assert api.stale_reports(out) == [
        f"{out / 'accuracy.json'} records no inputs: written by a vramcalc older than the check; "
        + RERUN
    ]


def test_a_report_on_other_data_is_stale(tmp_path):
    data = tmp_path / "measurements"
    data.mkdir()
    shutil.copy(next(MEASUREMENTS_DIR.glob("*.jsonl")), data)
    out = _report_dir(tmp_path)
    assert api.stale_reports(out, data) == [
        f"{out / 'accuracy.json'} was computed on other data (calibration, GPUs, model configs "
        f"or measurements changed since); {RERUN}"
    ]


def test_a_report_with_other_columns_is_stale(tmp_path):
    out = _report_dir(tmp_path)
    extra = [*CSV_COLUMNS, "rank_allocator_bytes"]
    (out / "accuracy.csv").write_text(",".join(extra) + "\n")
    assert api.stale_reports(out) == [
        f"{out / 'accuracy.csv'} has other columns than vramcalc writes now (extra: "
        f"rank_allocator_bytes; missing: none); {RERUN}"
    ]


def test_the_committed_reports_are_current():
    """The CI check: the committed reports were written by this estimator on this data."""
    assert api.stale_reports(REPORTS_DIR) == []


def test_the_committed_csv_has_one_row_per_measurement_case():
    with (REPORTS_DIR / "accuracy.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    records = [
        json.loads(line)
        for path in sorted(MEASUREMENTS_DIR.glob("*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    assert len(rows) == len(records)


def test_console_figures_name_their_subset():
    figures = {
        "validation/device_total_bytes/n": 35,
        "validation/device_total_bytes/p90_abs_error": 0.0208,
        "validation[default]/device_total_bytes/n": 31,
        "validation[expandable]/device_total_bytes/n": 4,
    }
    assert subset_name(figures, "device_total_bytes") == (
        "validation split, 35 cases, default and expandable allocators"
    )
    assert target_distances(figures) == [
        "device_total_bytes p90_abs_error (validation split, 35 cases, default and expandable "
        "allocators): 2.08 % (target 4.0 %, met, -1.92 pp)"
    ]


README_ROWS = {
    "device total (nvidia-smi), default allocator": ("default", "device_total_bytes"),
    "peak reserved, default allocator": ("default", "peak_reserved_bytes"),
    "peak allocated, default allocator": ("default", "peak_allocated_bytes"),
    "device total, expandable segments": ("expandable", "device_total_bytes"),
    "peak reserved, expandable segments": ("expandable", "peak_reserved_bytes"),
}
STATS = ("median_abs_error", "p90_abs_error", "max_abs_error", "worst_underestimate")


def _readme_texts() -> str:
    return "\n".join(
        p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    )


def test_the_readme_accuracy_table_is_the_committed_report():
    figures = json.loads((REPORTS_DIR / "accuracy.json").read_text())["figures"]
    text = _readme_texts()
    for label, (mode, metric) in README_ROWS.items():
        row = re.search(rf"^\| {re.escape(label)} \| (\d+) \|([^\n]*)$", text, re.MULTILINE)
        assert row, f"the accuracy table has no row '{label}'"
        cells = [c.strip() for c in row.group(2).split("|")][:4]
        group = f"validation[{mode}]/{metric}"
        assert int(row.group(1)) == figures[f"{group}/n"], label
        expected = [f"{100 * figures[f'{group}/{stat}']:.2f} %" for stat in STATS]
        assert cells == expected, label


def test_report_prints_the_subset_of_each_figure(tmp_path, tiny_llama_dir):
    from tests.test_accuracy import record

    data = tmp_path / "data"
    data.mkdir()
    records = [record(tiny_llama_dir, "validation", s) for s in (1.0, 1.01)]
    (data / "h200.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["report", "--measurements", str(data), "--out", str(out), "--no-progress"]
    )
    assert result.exit_code in (0, 1), result.output
    lines = [line for line in result.output.splitlines() if "_bytes " in line and " % " in line]
    assert lines and all("(validation split, 2 cases, default allocator)" in x for x in lines)
    inputs = json.loads((out / "accuracy.json").read_text())["inputs"]
    assert inputs == report_inputs(data)
    assert api.stale_reports(out, data) == []
