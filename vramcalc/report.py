"""Accuracy report: every committed GPU measurement joined with its estimate.

``build_report`` reads ``data/measurements/*.jsonl`` (the harness's records),
estimates the same plan, and computes signed relative errors
``(estimate - measured) / measured`` for ``device_total_bytes`` and
``peak_allocated_bytes``. ``check_targets`` applies the accuracy gate to the
validation split; ``write_report`` writes Markdown, CSV and a PNG.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vramcalc.catalog import DATA_DIR
from vramcalc.errors import VramcalcError
from vramcalc.plan import TrainingPlan

MEASUREMENTS_DIR = DATA_DIR / "measurements"
METRICS = ("device_total_bytes", "peak_reserved_bytes", "peak_allocated_bytes")
PLAN_FIELDS = tuple(TrainingPlan.__dataclass_fields__)
STATS = ("median_abs_error", "p90_abs_error", "max_abs_error", "worst_underestimate")
#: a committed figure may get worse by this much (absolute, as a fraction) before the
#: regression gate fails: numerical noise, not a change of the estimator
REGRESSION_TOLERANCE = 0.0005


@dataclass(frozen=True)
class Targets:
    """The accuracy targets on the validation split (issue 10 for memory, 11 for speed);
    ``None``: no target for that figure."""

    by_metric: tuple[tuple[str, tuple[float | None, ...]], ...] = (
        ("device_total_bytes", (0.02, 0.04, 0.08, 0.03)),
        ("peak_reserved_bytes", (0.02, 0.04, 0.08, 0.03)),
        ("peak_allocated_bytes", (0.005, None, 0.05, None)),
    )
    tokens_per_second_median_abs_error: float = 0.15

    def limits(self, metric: str) -> dict[str, float | None]:
        return dict(zip(STATS, dict(self.by_metric)[metric], strict=True))


@dataclass(frozen=True)
class ReportRow:
    record: dict[str, Any]
    estimate: dict[str, Any] | None
    errors: dict[str, float]  # metric -> signed relative error
    estimate_error: str | None = None

    @property
    def split(self) -> str:
        """The record's split; multi-GPU records (simulated worlds, real N-GPU runs) form
        their own groups (``multi-gpu/validation``...), apart from the single-GPU figures."""
        split = str(self.record.get("split") or "unsplit")
        return f"{MULTI_GPU_PREFIX}{split}" if is_multi_gpu(self.record) else split


@dataclass(frozen=True)
class Report:
    rows: tuple[ReportRow, ...]
    sources: tuple[str, ...]
    throughput: tuple[dict[str, Any], ...] = ()  # throughput_fit.compare_records rows

    @property
    def ok_rows(self) -> list[ReportRow]:
        return [r for r in self.rows if r.record.get("status") == "ok" and r.errors]


def _abs_error_desc(metric: str, row: ReportRow) -> float:
    """Sort key: the largest |error| of ``metric`` first."""
    return -abs(row.errors.get(metric, 0.0))


MULTI_GPU_PREFIX = "multi-gpu/"


def is_multi_gpu(record: dict[str, Any]) -> bool:
    """A record of a multi-GPU plan (rank 0 of a simulated world, or a real N-GPU run)."""
    return bool(record.get("simulated_world_size")) or int(record.get("num_gpus") or 1) > 1


SERVE_RECORD_REASON = (
    "serving measurement (kind serve): the training estimate does not describe it; "
    "vramcalc serve's estimate is not compared yet"
)


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


def build_report(
    records: list[dict[str, Any]],
    sources: list[str] | None = None,
    allocator_model: str | None = None,
    progress: Any = None,
) -> Report:
    """Estimate every record's plan and compute the errors.

    ``allocator_model`` as ``Prepared.estimate`` takes it (default: simulate the caching
    allocator for every single-GPU plan; cached after the first run). ``progress`` is
    called once per record (a progress bar's ``update``).
    """
    from vramcalc.estimate import prepare

    rows = []
    for record in records:
        if record.get("kind") == "serve":  # not a training plan: left out, with the reason
            rows.append(ReportRow(record, None, {}, SERVE_RECORD_REASON))
            if progress is not None:
                progress(1)
            continue
        try:
            plan = plan_of(record)
            est = prepare(plan.model, plan).estimate(plan, allocator_model).to_dict()
        except VramcalcError as err:
            rows.append(ReportRow(record, None, {}, str(err)))
            continue
        finally:
            if progress is not None:
                progress(1)
        mismatch = _plan_mismatch(record, est)
        if mismatch:
            rows.append(ReportRow(record, est, {}, mismatch))
            continue
        errors = {}
        if record.get("status") == "ok":
            for metric in METRICS:
                measured = record.get(metric)
                if measured:
                    errors[metric] = (est[metric] - measured) / measured
        rows.append(ReportRow(record, est, errors))
    from vramcalc.speed.throughput_fit import compare_records

    return Report(tuple(rows), tuple(sources or ()), throughput=tuple(compare_records(records)))


def _plan_mismatch(record: dict[str, Any], est: dict[str, Any]) -> str | None:
    """Why a record does not measure its plan (None: it does). A run that trained another
    number of parameters than the plan has ran another plan (the harness of 2026-12-01
    dropped ``use_dora``: its DoRA records measured plain LoRA): it is not compared."""
    trained = record.get("trainable_params")
    if trained and trained != est["trainable_params"]:
        return (
            f"the run trained {trained:,} parameters, the plan has {est['trainable_params']:,}: "
            "it did not run this plan, so it is not compared"
        )
    return None


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


def _allocator(row: ReportRow) -> str:
    return str(row.record.get("allocator") or "default")


def summary_figures(report: Report) -> dict[str, float]:
    """Every figure the report states, by a stable name: ``SPLIT/METRIC/STAT`` over both
    allocators, ``SPLIT[ALLOCATOR]/METRIC/STAT`` per allocator, ``SPLIT/METRIC/n``, and
    ``SPLIT/tokens_per_second/median_abs_error``."""
    figures: dict[str, float] = {}
    good = report.ok_rows
    for split in sorted({r.split for r in good}):
        groups = {split: [r for r in good if r.split == split]}
        for allocator in sorted({_allocator(r) for r in groups[split]}):
            groups[f"{split}[{allocator}]"] = [
                r for r in groups[split] if _allocator(r) == allocator
            ]
        for name, rows in groups.items():
            for metric in METRICS:
                stats = summarize(rows, metric)
                if not stats["n"]:
                    continue
                figures[f"{name}/{metric}/n"] = stats["n"]
                for stat in STATS:
                    figures[f"{name}/{metric}/{stat}"] = round(stats[stat], 6)
    for split in sorted({r["split"] for r in report.throughput}):
        speed = throughput_summary(report, split)
        if speed["n"]:
            figures[f"{split}/tokens_per_second/n"] = speed["n"]
            figures[f"{split}/tokens_per_second/median_abs_error"] = round(
                speed["median_abs_error"], 6
            )
    return figures


def check_regressions(
    figures: dict[str, float], committed: dict[str, float], tolerance: float = REGRESSION_TOLERANCE
) -> list[str]:
    """Figures worse than the committed report's (errors up by more than ``tolerance``,
    fewer cases than before, a figure gone), as sentences; empty: no regression."""
    problems = []
    for name, before in sorted(committed.items()):
        now = figures.get(name)
        if now is None or (isinstance(now, float) and math.isnan(now)):
            problems.append(f"{name}: in the committed report ({before:g}), missing now")
        elif name.endswith("/n"):
            if now < before:
                problems.append(f"{name}: {now:g} cases, the committed report had {before:g}")
        elif now > before + tolerance:
            problems.append(
                f"{name}: {100 * now + 0.0:.2f} %, committed {100 * before + 0.0:.2f} %"
            )
    return problems


def target_distances(figures: dict[str, float], targets: Targets | None = None) -> list[str]:
    """How far each validation figure stands from its target, one line each."""
    targets = targets or Targets()
    out = []
    for metric, _ in targets.by_metric:
        for stat, limit in targets.limits(metric).items():
            value = figures.get(f"validation/{metric}/{stat}")
            if limit is None or value is None:
                continue
            verdict = "met" if value <= limit else "NOT met"
            out.append(
                f"{metric} {stat}: {100 * value:.2f} % (target {100 * limit:.1f} %, {verdict}, "
                f"{100 * (value - limit):+.2f} pp)"
            )
    value = figures.get("validation/tokens_per_second/median_abs_error")
    if value is not None:
        limit = targets.tokens_per_second_median_abs_error
        verdict = "met" if value <= limit else "NOT met"
        out.append(
            f"tokens_per_second median_abs_error: {100 * value:.2f} % (target "
            f"{100 * limit:.0f} %, {verdict}, {100 * (value - limit):+.2f} pp)"
        )
    return out


def check_targets(report: Report, targets: Targets | None = None) -> list[str]:
    """Every broken target on the validation split, as sentences (empty = all met)."""
    targets = targets or Targets()
    problems = []
    validation = [r for r in report.ok_rows if r.split == "validation"]
    if not validation:
        return ["no validation measurements: the accuracy gate has nothing to check"]
    for metric, _ in targets.by_metric:
        s = summarize(validation, metric)
        for key, limit in targets.limits(metric).items():
            if limit is not None and s[key] > limit:
                problems.append(f"{metric}: {key} {100 * s[key]:.2f} % > {100 * limit:.1f} %")
    speed = throughput_summary(report, "validation")
    if speed["n"] and speed["median_abs_error"] > targets.tokens_per_second_median_abs_error:
        problems.append(
            f"tokens_per_second: median_abs_error {100 * speed['median_abs_error']:.2f} % "
            f"> {100 * targets.tokens_per_second_median_abs_error:.0f} %"
        )
    for row in report.rows:
        if row.record.get("status") == "oom" and row.estimate and not estimated_not_to_fit(row):
            problems.append(f"OOM case {row.record.get('case_id', '?')} is estimated to fit")
    return problems


def estimated_not_to_fit(row: ReportRow) -> bool:
    """Whether the estimate says the measured GPU could not hold the run: its device total
    beyond the card's (CUDA's total for processes, plus the driver's reserve)."""
    capacity = row.record.get("gpu_memory_bytes")
    if not capacity or not row.estimate:
        return False
    reserve = int(row.estimate.get("components", {}).get("driver_reserved", 0))
    return bool(row.estimate["device_total_bytes"] > capacity + reserve)


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
    from vramcalc.render.tables import table

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
    heads = ["metric", "n", "median abs", "p90 abs", "max abs", "worst under-estimate"]
    for split in sorted({r.split for r in ok}):
        for allocator in sorted({_allocator(r) for r in ok if r.split == split}):
            group = [r for r in ok if r.split == split and _allocator(r) == allocator]
            lines += [f"## {split} · {allocator} allocator ({len(group)} cases)", ""]
            cells = []
            for method in sorted({str(r.record.get("method")) for r in group}):
                rows = [r for r in group if str(r.record.get("method")) == method]
                for metric in METRICS:
                    s = summarize(rows, metric)
                    cells.append(
                        [f"{method} · {metric}", str(s["n"]), *(_fmt_pct(s[k]) for k in STATS)]
                    )
            for metric in METRICS:
                s = summarize(group, metric)
                cells.append([f"all · {metric}", str(s["n"]), *(_fmt_pct(s[k]) for k in STATS)])
            lines += [table(cells, heads, [False] + [True] * 5, markdown=True), ""]
    for metric in ("device_total_bytes", "peak_reserved_bytes"):
        worst = sorted(ok, key=functools.partial(_abs_error_desc, metric))[:5]
        if worst:
            lines += [f"## Worst cases ({metric})", ""]
            for r in worst:
                rec = r.record
                lines.append(
                    f"- {rec.get('case_id')} ({rec.get('split')}, {_allocator(r)} allocator): "
                    f"{rec.get('model')} {rec.get('method')} {rec.get('quant')} "
                    f"s{rec.get('seq_len')} b{rec.get('batch_size')} "
                    f"ckpt={rec.get('gradient_checkpointing')} {rec.get('optimizer')}: "
                    f"{100 * r.errors[metric]:+.2f} %"
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
            "allocator",
            "model",
            "method",
            "seq_len",
            "batch_size",
            "status",
            "measured_device_total_bytes",
            "estimated_device_total_bytes",
            "error_pct_device_total_bytes",
            "measured_peak_reserved_bytes",
            "estimated_peak_reserved_bytes",
            "error_pct_peak_reserved_bytes",
            "measured_peak_allocated_bytes",
            "estimated_peak_allocated_bytes",
            "error_pct_peak_allocated_bytes",
        ]
        cells = [["" if flat.get(c) is None else str(flat.get(c)) for c in cols] for flat in cases]
        lines.append(table(cells, cols, markdown=True))
    return "\n".join(lines) + "\n"


FIGURES_FILE = "accuracy.json"


def committed_figures(out_dir: Path) -> dict[str, float] | None:
    """The summary figures of the report in ``out_dir`` (None: no report there)."""
    path = out_dir / FIGURES_FILE
    if not path.is_file():
        return None
    try:
        return {k: float(v) for k, v in json.loads(path.read_text())["figures"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise VramcalcError(f"{path}: not a vramcalc accuracy summary ({err})") from err


def write_report(report: Report, problems: list[str], out_dir: Path) -> list[Path]:
    """Write accuracy.md, accuracy.csv, accuracy.json (the gate's figures) and accuracy.png."""
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    figures = out_dir / FIGURES_FILE
    summary = {
        "comment": "Summary figures of accuracy.md. The regression gate (tests/test_report.py, "
        "vramcalc report) fails when a recomputed figure is worse than one of these by more "
        f"than {REGRESSION_TOLERANCE} (errors are fractions), or a case count drops.",
        "sources": list(report.sources),
        "figures": summary_figures(report),
        "target_problems": problems,
    }
    figures.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    written.append(figures)
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
