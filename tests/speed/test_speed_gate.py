"""The CI regression gate for tokens/s: today's model on the committed H200 measurements
against the committed report (reports/throughput.json), and the committed constants against
a refit on the calibration split."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from vramcalc.measurements import MEASUREMENTS_DIR, load_measurements
from vramcalc.speed.speed_report import TARGETS, distances, regressions, speed_report
from vramcalc.speed.throughput import CONSTANTS, load_throughput_calibration
from vramcalc.speed.throughput_fit import FITTED, cases_from_records, fit_cases

REPORT = Path(__file__).resolve().parents[2] / "reports" / "throughput.json"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def records():
    records, _ = load_measurements(MEASUREMENTS_DIR)
    if not [r for r in records if r.get("device") == "cuda" and r.get("tokens_per_second")]:
        pytest.skip("no GPU measurements committed under data/measurements/")
    return records


@pytest.fixture(scope="module")
def report(records):
    return speed_report(records)


def test_tokens_per_second_does_not_regress(report, capsys):
    committed = json.loads(REPORT.read_text())
    problems = regressions(report.splits, committed["splits"])
    with capsys.disabled():
        print("\ntokens/s on the validation split, distance to the targets:")
        for line in distances(report.splits["validation"]):
            print(f"  {line}")
    assert problems == [], "worse than the committed reports/throughput.json:\n" + "\n".join(
        problems
    )


def test_validation_split_meets_the_targets(report):
    validation = report.splits["validation"]
    assert validation["n"] >= 30
    for key, limit in TARGETS.items():
        assert validation[key] <= limit, key


def test_the_committed_constants_are_the_calibration_fit(records):
    """From 1.5x every committed constant, the fit on the calibration split finds them again
    (within their 4 stored digits): they were fitted there, and only there, the fit never sees
    a validation case."""
    committed = load_throughput_calibration()
    cases, _ = cases_from_records(records, "calibration")
    assert cases and {c.split for c in cases} == {"calibration"}
    start = replace(committed, **{n: 1.5 * getattr(committed, n) for n in FITTED})
    fit = fit_cases(cases, start)
    for name in CONSTANTS:
        assert getattr(fit.calibration, name) == pytest.approx(
            getattr(committed, name), rel=2e-3
        ), name
    used = sorted(f"{c.record.get('source_file')}:{c.case_id}" for c in cases)
    assert committed.fitted_on["cases"] == used
