"""Tokens/s accuracy on the committed measurements, the quality of those measurements, and
the regression gate.

``speed_report`` joins every usable record with its prediction
(``throughput_fit.compare_records``) and adds what the measurement itself says:

* dispersion: the spread of the timed steps of a case (``step_seconds_measured``),
  as interquartile range and full range over the median, with the number of steps;
* repeatability: cases whose plan was measured twice on the same GPU (another seed,
  another run), and how far the two tokens/s figures are apart; plans measured again
  under the other allocator setting are listed apart (the plan differs).

``summary`` gives, per split, the median and 90th percentile of |error| and the
largest over- and under-prediction (error = predicted / measured tokens/s - 1:
positive means the planner promised more speed than the GPU gave). ``regressions``
compares a summary with the committed one (``reports/throughput.json``) and
``distances`` says how far the validation figures stand from ``TARGETS``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vramcalc.measurements import Gate, percentile, plan_of
from vramcalc.parallel import warm_caches
from vramcalc.speed.throughput import ThroughputCalibration, load_throughput_calibration
from vramcalc.speed.throughput_fit import (
    WorkFor,
    compare_records,
    excluded_reason,
)

#: issue 11, on the validation split
TARGETS = {"median_abs_error": 0.15, "p90_abs_error": 0.30, "max_overprediction": 0.40}
FIGURES = ("median_abs_error", "p90_abs_error", "max_overprediction", "max_underprediction")
TOLERANCE = 0.005  # a recomputed figure may be this much worse (fraction) before the gate fails
REPORT_JSON = "throughput.json"


def dispersion(record: Mapping[str, Any]) -> dict[str, float | int | None]:
    """Spread of a case's timed steps: (Q3 - Q1) / median and (max - min) / median."""
    steps = [float(s) for s in record.get("step_seconds_measured") or [] if s]
    if not steps:
        return {
            "steps": 0,
            "timed_seconds": None,
            "iqr_over_median": None,
            "range_over_median": None,
        }
    median = statistics.median(steps)
    iqr = percentile(steps, 0.75) - percentile(steps, 0.25)
    return {
        "steps": len(steps),
        "timed_seconds": sum(steps),
        "iqr_over_median": iqr / median,
        "range_over_median": (max(steps) - min(steps)) / median,
    }


def _plan_key(record: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> str:
    plan = plan_of(record).to_dict()
    for name in ignore:
        plan.pop(name, None)
    return json.dumps([plan, record.get("gpu_name")], sort_keys=True, default=str)


def _tokens_per_second(record: Mapping[str, Any]) -> float:
    return float(record["tokens_per_second"])


def repeat_pairs(
    records: Iterable[Mapping[str, Any]], ignore: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Pairs of usable records of the same plan (but for ``ignore``) on the same GPU, from
    different runs: each later one against the first, with the relative difference."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        if excluded_reason(record) is None and record.get("tokens_per_second"):
            groups.setdefault(_plan_key(record, ignore), []).append(record)
    pairs = []
    for group in groups.values():
        first = group[0]
        first_plan = plan_of(first)
        for other in group[1:]:
            other_plan = plan_of(other)
            if ignore and all(getattr(other_plan, k) == getattr(first_plan, k) for k in ignore):
                continue  # the same plan exactly: listed by the call without ``ignore``
            a, b = _tokens_per_second(first), _tokens_per_second(other)
            pairs.append(
                {
                    "case_ids": [first.get("case_id"), other.get("case_id")],
                    "files": [first.get("source_file"), other.get("source_file")],
                    "seeds": [first.get("seed"), other.get("seed")],
                    **{k: [getattr(first_plan, k), getattr(other_plan, k)] for k in ignore},
                    "model": first.get("model"),
                    "tokens_per_second": [a, b],
                    "difference": b / a - 1,
                }
            )
    return pairs


def summary(rows: Sequence[Mapping[str, Any]], split: str) -> dict[str, float | int]:
    """n, median and p90 |error|, largest over- and under-prediction of tokens/s on ``split``."""
    errors = [float(r["tokens_per_second_error"]) for r in rows if r["split"] == split]
    if not errors:
        return {"n": 0}
    absolute = [abs(e) for e in errors]
    return {
        "n": len(errors),
        "median_abs_error": statistics.median(absolute),
        "p90_abs_error": percentile(absolute, 0.9),
        "max_overprediction": max(max(errors), 0.0),
        "max_underprediction": max(-min(errors), 0.0),
    }


def distances(validation: Mapping[str, float | int]) -> list[str]:
    """How far each validation figure stands from its target, as sentences."""
    out = []
    for key, limit in TARGETS.items():
        value = validation.get(key)
        if value is None:
            out.append(f"{key}: no validation case")
            continue
        gap = round(limit - float(value), 9)
        inside = f"{100 * gap + 0.0:.1f} points inside"  # + 0.0: no "-0.0"
        verdict = inside if gap >= 0 else f"{100 * -gap:.1f} points OUTSIDE"
        out.append(f"{key} {100 * float(value):.1f} % (target {100 * limit:.0f} %): {verdict}")
    return out


def regressions(
    current: Mapping[str, Mapping[str, float | int]],
    committed: Mapping[str, Mapping[str, float | int]],
    tolerance: float = TOLERANCE,
) -> list[str]:
    """Every split figure worse than the committed one by more than ``tolerance``."""
    problems = []
    for split, old in committed.items():
        new = current.get(split, {})
        if int(new.get("n", 0)) < int(old.get("n", 0)):
            problems.append(
                f"{split}: {new.get('n', 0)} cases, the committed report had {old['n']}"
            )
        for key in FIGURES:
            if key in old and key in new and float(new[key]) > float(old[key]) + tolerance:
                problems.append(
                    f"{split} {key}: {100 * float(new[key]):.2f} % > committed "
                    f"{100 * float(old[key]):.2f} % (+{100 * tolerance:.1f} points allowed)"
                )
    return problems


@dataclass(frozen=True)
class SpeedReport:
    rows: tuple[dict[str, Any], ...]  # compare_records rows + dispersion + plan facts
    excluded: tuple[str, ...]
    splits: dict[str, dict[str, float | int]]
    repeats: tuple[dict[str, Any], ...]  # same plan measured twice
    allocator_repeats: tuple[dict[str, Any], ...]  # same plan but the allocator setting
    calibration: ThroughputCalibration

    @property
    def worst(self) -> list[dict[str, Any]]:
        """The five validation cases with the largest |error| (every split if none)."""
        pool = [r for r in self.rows if r["split"] == "validation"] or list(self.rows)
        return sorted(pool, key=lambda r: -abs(r["tokens_per_second_error"]))[:5]

    def to_json(self) -> dict[str, Any]:
        spreads = [r["iqr_over_median"] for r in self.rows if r["iqr_over_median"] is not None]
        differences = [abs(p["difference"]) for p in self.repeats]
        return {
            "targets": TARGETS,
            "splits": self.splits,
            "distance_to_targets": distances(self.splits.get("validation", {})),
            "constants": self.calibration.values(),
            "measured_on": list(self.calibration.measured_on),
            "worst_validation_cases": self.worst,
            "repeatability": {
                "pairs": list(self.repeats),
                "max_abs_difference": max(differences, default=None),
                "median_abs_difference": statistics.median(differences) if differences else None,
                "other_allocator_pairs": list(self.allocator_repeats),
            },
            "dispersion": {
                "median_iqr_over_median": statistics.median(spreads) if spreads else None,
                "max_iqr_over_median": max(spreads, default=None),
            },
            "excluded": list(self.excluded),
            "cases": list(self.rows),
        }


_PLAN_COLUMNS = ("model", "method", "quant", "seq_len", "batch_size", "gradient_checkpointing")


def speed_report(
    records: Sequence[Mapping[str, Any]],
    calibration: ThroughputCalibration | None = None,
    work_for: WorkFor | None = None,
) -> SpeedReport:
    """Predictions against every usable record, with the measurement-quality figures."""
    cal = calibration or load_throughput_calibration()
    if work_for is None:  # the steps' ops profiled in parallel first (parallel.warm_caches)
        warm_caches(list(records), None, memory=False)
    # the same case id may be in two files (a plan measured again under another allocator)
    by_id = {(r.get("case_id"), r.get("source_file")): r for r in records}
    rows = []
    for row in compare_records(records, cal, work_for=work_for):
        record = by_id.get((row["case_id"], row.get("source_file")), {})
        plan = {k: record.get(k) for k in _PLAN_COLUMNS}
        plan["optimizer"] = record.get("optimizer")
        plan["attn"] = record.get("attn")
        rows.append({**row, **plan, **dispersion(record)})
    excluded = tuple(
        f"{r.get('case_id')} ({r.get('source_file')}): {reason}"
        for r in records
        if (reason := excluded_reason(r)) is not None
    )
    splits = {s: summary(rows, s) for s in sorted({str(r["split"]) for r in rows})}
    return SpeedReport(
        tuple(rows),
        excluded,
        splits,
        tuple(repeat_pairs(records)),
        tuple(repeat_pairs(records, ignore=("allocator",))),
        cal,
    )


def committed_splits(out_dir: Path) -> dict[str, dict[str, float | int]] | None:
    """The split figures of the committed ``throughput.json`` in ``out_dir`` (None if absent)."""
    path = out_dir / REPORT_JSON
    if not path.is_file():
        return None
    return dict(json.loads(path.read_text())["splits"])


@dataclass(frozen=True)
class GatedSpeedReport:
    """``vramcalc speed-report``: the report and its gate against the committed splits."""

    report: SpeedReport
    gate: Gate


def gated_speed_report(
    records: Sequence[Mapping[str, Any]],
    baseline: Mapping[str, Mapping[str, float | int]] | None,
) -> GatedSpeedReport:
    """Predictions against every usable record, and the gate against ``baseline``
    (``committed_splits``; None: nothing to compare with)."""
    report = speed_report(records)
    problems = regressions(report.splits, baseline) if baseline is not None else None
    gate = Gate(
        None if problems is None else tuple(problems),
        tuple(distances(report.splits.get("validation", {}))),
    )
    return GatedSpeedReport(report, gate)
