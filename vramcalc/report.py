"""Accuracy report: every committed GPU measurement joined with its estimate.

``build_report`` reads ``data/measurements/*.jsonl`` (the harness's records),
estimates the same plan, and computes signed relative errors
``(estimate - measured) / measured`` for ``device_total_bytes`` and
``peak_allocated_bytes``. ``check_targets`` applies the accuracy gate to the
validation split; ``write_report`` writes Markdown, CSV and a PNG.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vramcalc.catalog import DATA_DIR
from vramcalc.errors import VramcalcError
from vramcalc.plan import TrainingPlan

MEASUREMENTS_DIR = DATA_DIR / "measurements"
METRICS = ("device_total_bytes", "peak_allocated_bytes")
PLAN_FIELDS = tuple(TrainingPlan.__dataclass_fields__)


@dataclass(frozen=True)
class Targets:
    """The accuracy gate (issue 'accuracy'), on the validation split."""

    median_abs_error: float = 0.03
    p90_abs_error: float = 0.06
    max_abs_error: float = 0.10
    max_underestimate: float = 0.05
    tokens_per_second_median_abs_error: float = 0.15  # issue "throughput and cost"


@dataclass(frozen=True)
class ReportRow:
    record: dict[str, Any]
    estimate: dict[str, Any] | None
    errors: dict[str, float]  # metric -> signed relative error
    estimate_error: str | None = None

    @property
    def split(self) -> str:
        return str(self.record.get("split") or "unsplit")


@dataclass(frozen=True)
class Report:
    rows: tuple[ReportRow, ...]
    sources: tuple[str, ...]
    throughput: tuple[dict[str, Any], ...] = ()  # throughput_fit.compare_records rows

    @property
    def ok_rows(self) -> list[ReportRow]:
        return [r for r in self.rows if r.record.get("status") == "ok" and r.errors]


def load_measurements(directory: Path = MEASUREMENTS_DIR) -> tuple[list[dict[str, Any]], list[str]]:
    """All records of ``directory/*.jsonl`` (file name kept in ``source_file``).

    A ``NAME.meta.json`` beside ``NAME.jsonl`` may give ``defaults``: run conditions the
    records of that file do not state (e.g. the allocator setting of a run made before the
    harness recorded it). They fill only fields a record lacks.
    """
    records: list[dict[str, Any]] = []
    files = sorted(directory.glob("*.jsonl")) if directory.is_dir() else []
    for path in files:
        meta_path = path.with_suffix(".meta.json")
        defaults: dict[str, Any] = {}
        if meta_path.is_file():
            try:
                defaults = dict(json.loads(meta_path.read_text()).get("defaults") or {})
            except (ValueError, AttributeError, TypeError) as err:
                raise VramcalcError(
                    f"{meta_path}: not a JSON object with 'defaults' ({err})"
                ) from err
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise VramcalcError(f"{path}:{number}: not a JSON line ({err})") from err
            for key, value in defaults.items():
                record.setdefault(key, value)
            record["source_file"] = path.name
            records.append(record)
    return records, [p.name for p in files]


def plan_of(record: dict[str, Any]) -> TrainingPlan:
    """The plan a measurement record describes (its plan fields)."""
    return TrainingPlan.from_dict({k: record[k] for k in PLAN_FIELDS if k in record})


def build_report(records: list[dict[str, Any]], sources: list[str] | None = None) -> Report:
    """Estimate every record's plan and compute the errors."""
    from vramcalc.estimate import estimate

    rows = []
    for record in records:
        try:
            est = estimate(plan_of(record)).to_dict()
        except VramcalcError as err:
            rows.append(ReportRow(record, None, {}, str(err)))
            continue
        errors = {}
        if record.get("status") == "ok":
            for metric in METRICS:
                measured = record.get(metric)
                if measured:
                    errors[metric] = (est[metric] - measured) / measured
        rows.append(ReportRow(record, est, errors))
    from vramcalc.throughput_fit import compare_records

    return Report(tuple(rows), tuple(sources or ()), throughput=tuple(compare_records(records)))


def throughput_summary(report: Report, split: str) -> dict[str, float]:
    """n and median |error| of predicted vs measured tokens/s on ``split``."""
    errors = [abs(r["tokens_per_second_error"]) for r in report.throughput if r["split"] == split]
    return {"n": len(errors), "median_abs_error": _percentile(errors, 0.5)}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(rows: list[ReportRow], metric: str) -> dict[str, float]:
    """n, median/p90/max |error| and the worst under-estimate of ``metric``."""
    errors = [r.errors[metric] for r in rows if metric in r.errors]
    absolute = [abs(e) for e in errors]
    return {
        "n": len(errors),
        "median_abs_error": _percentile(absolute, 0.5),
        "p90_abs_error": _percentile(absolute, 0.9),
        "max_abs_error": max(absolute, default=math.nan),
        "worst_underestimate": -min(min(errors, default=0.0), 0.0),
    }


def check_targets(report: Report, targets: Targets = Targets()) -> list[str]:
    """Every broken target on the validation split, as sentences (empty = pass)."""
    problems = []
    validation = [r for r in report.ok_rows if r.split == "validation"]
    if not validation:
        return ["no validation measurements: the accuracy gate has nothing to check"]
    for metric in METRICS:
        s = summarize(validation, metric)
        for key, limit in (
            ("median_abs_error", targets.median_abs_error),
            ("p90_abs_error", targets.p90_abs_error),
            ("max_abs_error", targets.max_abs_error),
            ("worst_underestimate", targets.max_underestimate),
        ):
            if s[key] > limit:
                problems.append(f"{metric}: {key} {100 * s[key]:.2f} % > {100 * limit:.0f} %")
    speed = throughput_summary(report, "validation")
    if speed["n"] and speed["median_abs_error"] > targets.tokens_per_second_median_abs_error:
        problems.append(
            f"tokens_per_second: median_abs_error {100 * speed['median_abs_error']:.2f} % "
            f"> {100 * targets.tokens_per_second_median_abs_error:.0f} %"
        )
    for row in report.rows:
        if row.record.get("status") == "oom" and row.split == "validation" and row.estimate:
            capacity = row.record.get("gpu_memory_bytes")
            if capacity and row.estimate["device_total_bytes"] <= capacity:
                problems.append(f"OOM case {row.record.get('case_id', '?')} is estimated to fit")
    return problems


def report_table(report: Report) -> list[dict[str, Any]]:
    """One flat row per measurement: plan, measured, estimated, error %."""
    out = []
    speed = {r["case_id"]: r for r in report.throughput}
    for row in report.rows:
        rec, est = row.record, row.estimate or {}
        flat: dict[str, Any] = {
            k: rec.get(k) for k in ("case_id", "split", "source_file", "status", "gpu_name")
        }
        flat.update({k: rec.get(k) for k in PLAN_FIELDS})
        if isinstance(flat.get("targets"), list):
            flat["targets"] = ",".join(flat["targets"])
        for metric in METRICS:
            flat[f"measured_{metric}"] = rec.get(metric)
            flat[f"estimated_{metric}"] = est.get(metric)
            error = row.errors.get(metric)
            flat[f"error_pct_{metric}"] = None if error is None else round(100 * error, 3)
        match = speed.get(str(rec.get("case_id")), {})
        flat["measured_tokens_per_second"] = match.get("measured_tokens_per_second")
        flat["predicted_tokens_per_second"] = match.get("predicted_tokens_per_second")
        error = match.get("tokens_per_second_error")
        flat["error_pct_tokens_per_second"] = None if error is None else round(100 * error, 3)
        flat["estimate_error"] = row.estimate_error
        out.append(flat)
    return out


def _fmt_pct(value: float) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{100 * value + 0.0:.2f} %"  # + 0.0: no "-0.00 %"
    )


def render_markdown(report: Report, problems: list[str]) -> str:
    """``reports/accuracy.md`` (tables through ``render.table``, GitHub Markdown)."""
    from vramcalc.render import table

    lines = ["# vramcalc accuracy report", ""]
    lines.append(
        f"Measurements: {len(report.rows)} records from {', '.join(report.sources) or 'no files'}."
    )
    lines.append("Error = (estimate − measured) / measured; positive means over-estimate.")
    lines.append("")
    if not report.rows:
        lines += [
            "No GPU measurements are committed yet (`data/measurements/` is empty), so nothing is compared.",
            "",
        ]
    ok = report.ok_rows
    for split in sorted({r.split for r in ok}):
        for method in sorted({str(r.record.get("method")) for r in ok if r.split == split}):
            rows = [r for r in ok if r.split == split and str(r.record.get("method")) == method]
            lines.append(f"## {split} · {method} ({len(rows)} cases)")
            lines.append("")
            cells = []
            for metric in METRICS:
                s = summarize(rows, metric)
                keys = ("median_abs_error", "p90_abs_error", "max_abs_error", "worst_underestimate")
                cells.append([metric, str(s["n"]), *(_fmt_pct(s[k]) for k in keys)])
            heads = ["metric", "n", "median abs", "p90 abs", "max abs", "worst under-estimate"]
            lines += [table(cells, heads, [False] + [True] * 5, markdown=True), ""]
    worst = sorted(ok, key=lambda r: -abs(r.errors.get("device_total_bytes", 0.0)))[:5]
    if worst:
        lines += ["## Worst cases (device_total_bytes)", ""]
        for r in worst:
            lines.append(
                f"- {r.record.get('case_id')}: {100 * r.errors['device_total_bytes']:+.2f} %"
            )
        lines.append("")
    if report.throughput:
        lines += ["## Throughput (tokens/s)", ""]
        lines.append(f"Efficiencies: {report.throughput[0]['efficiency_measured_on']}.")
        cells = []
        for split in sorted({r["split"] for r in report.throughput}):
            s = throughput_summary(report, split)
            cells.append([split, str(s["n"]), _fmt_pct(s["median_abs_error"])])
        heads = ["split", "n", "median abs error"]
        lines += ["", table(cells, heads, [False, True, True], markdown=True), ""]
    lines += ["## Gate", ""]
    lines += [f"- FAIL: {p}" for p in problems] or ["- all targets met on the validation split"]
    lines += ["", "## Cases", ""]
    cases = report_table(report)
    if cases:
        cols = [
            "case_id",
            "split",
            "model",
            "method",
            "seq_len",
            "batch_size",
            "status",
            "measured_device_total_bytes",
            "estimated_device_total_bytes",
            "error_pct_device_total_bytes",
            "measured_peak_allocated_bytes",
            "estimated_peak_allocated_bytes",
            "error_pct_peak_allocated_bytes",
        ]
        cells = [["" if flat.get(c) is None else str(flat.get(c)) for c in cols] for flat in cases]
        lines.append(table(cells, cols, markdown=True))
    return "\n".join(lines) + "\n"


def write_report(report: Report, problems: list[str], out_dir: Path) -> list[Path]:
    """Write accuracy.md, accuracy.csv and (with matplotlib) accuracy.png."""
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    md = out_dir / "accuracy.md"
    md.write_text(render_markdown(report, problems))
    written.append(md)
    table = report_table(report)
    csv_path = out_dir / "accuracy.csv"
    with csv_path.open("w", newline="") as handle:
        columns = list(table[0]) if table else ["case_id", "split", "status"]
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    written.append(csv_path)
    if report.ok_rows:
        written.append(_plot(report, out_dir / "accuracy.png"))
    return written


def _plot(report: Report, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    from vramcalc.memory import GIB as gib

    for split, marker in (("calibration", "o"), ("validation", "s")):
        rows = [r for r in report.ok_rows if r.split == split]
        xs = [r.record["device_total_bytes"] / gib for r in rows]
        ys = [r.estimate["device_total_bytes"] / gib for r in rows if r.estimate]
        left.scatter(xs, ys, marker=marker, label=split, alpha=0.8)
    values = [r.record["device_total_bytes"] / gib for r in report.ok_rows]
    lo, hi = min(values) * 0.8, max(values) * 1.25
    left.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="y = x")
    left.set(
        xscale="log", yscale="log", xlabel="measured device total (GiB)", ylabel="estimated (GiB)"
    )
    left.legend()
    errors = [
        100 * r.errors["device_total_bytes"]
        for r in report.ok_rows
        if "device_total_bytes" in r.errors
    ]
    right.hist(errors, bins=20)
    right.set(xlabel="error (%)", ylabel="cases", title="device_total_bytes error")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
