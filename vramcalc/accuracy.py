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

from vramcalc.errors import VramcalcError
from vramcalc.estimate import prepare
from vramcalc.measurements import (
    MULTI_GPU_PREFIX,
    SERVE_RECORD_REASON,
    Gate,
    is_multi_gpu,
    percentile,
    plan_of,
)
from vramcalc.parallel import warm_caches
from vramcalc.speed.throughput_fit import compare_records
from vramcalc.training_plan import PLAN_FIELDS

METRICS = ("device_total_bytes", "peak_reserved_bytes", "peak_allocated_bytes")
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
    def allocator(self) -> str:
        """The caching allocator's setting the record ran under (``default`` unless stated)."""
        return str(self.record.get("allocator") or "default")

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


def build_report(
    records: list[dict[str, Any]],
    sources: list[str] | None = None,
    allocator_model: str | None = None,
    progress: Any = None,
    workers: int | None = None,
) -> Report:
    """Estimate every record's plan and compute the errors.

    ``allocator_model`` as ``Prepared.estimate`` takes it (default: simulate the caching
    allocator for every plan; cached after the first run). The simulations run first in
    ``workers`` processes (``parallel.warm_caches``, default one per core up to 4), the
    estimates then read them from the cache. ``progress`` is called once per record (a
    progress bar's ``update``).
    """
    warm_caches(records, allocator_model, workers)
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
        est = as_measured(record, est)
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
    return Report(tuple(rows), tuple(sources or ()), throughput=tuple(compare_records(records)))


def as_measured(record: dict[str, Any], est: dict[str, Any]) -> dict[str, Any]:
    """The estimate of what ``record`` measured: rank 0 of a simulated world (torch's fake
    process group, ``simulated_world_size``) has no NCCL communicator, so its device total
    is the estimate's without NCCL's buffers (``memory/nccl.py``'s rule, ``components``)."""
    nccl = int(est.get("components", {}).get("nccl", 0))
    if not record.get("simulated_world_size") or not nccl:
        return est
    return {**est, "device_total_bytes": est["device_total_bytes"] - nccl}


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
    return {"n": len(errors), "median_abs_error": percentile(errors, 0.5)}


def summarize(rows: list[ReportRow], metric: str) -> dict[str, float]:
    """n, median/p90/max |error| and the worst under-estimate of ``metric``."""
    errors = [r.errors[metric] for r in rows if metric in r.errors]
    absolute = [abs(e) for e in errors]
    return {
        "n": len(errors),
        "median_abs_error": percentile(absolute, 0.5),
        "p90_abs_error": percentile(absolute, 0.9),
        "max_abs_error": max(absolute, default=math.nan),
        "worst_underestimate": -min(min(errors, default=0.0), 0.0),
    }


def summary_figures(report: Report) -> dict[str, float]:
    """Every figure the report states, by a stable name: ``SPLIT/METRIC/STAT`` over both
    allocators, ``SPLIT[ALLOCATOR]/METRIC/STAT`` per allocator, ``SPLIT/METRIC/n``, and
    ``SPLIT/tokens_per_second/median_abs_error``."""
    figures: dict[str, float] = {}
    good = report.ok_rows
    for split in sorted({r.split for r in good}):
        groups = {split: [r for r in good if r.split == split]}
        for allocator in sorted({r.allocator for r in groups[split]}):
            groups[f"{split}[{allocator}]"] = [r for r in groups[split] if r.allocator == allocator]
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


def subset_name(figures: dict[str, float], metric: str, split: str = "validation") -> str:
    """The cases a ``split/metric/...`` figure is over, in words: "validation split, 35 cases,
    default and expandable allocators" (the figures pool every allocator mode measured)."""
    n = figures.get(f"{split}/{metric}/n")
    modes = sorted(
        {key[len(split) + 1 : key.index("]")] for key in figures if key.startswith(f"{split}[")}
    )
    allocators = (
        f", {' and '.join(modes)} allocator{'s' if len(modes) > 1 else ''}"
        if modes and metric != "tokens_per_second"
        else ""
    )
    cases = f", {n:g} case{'' if n == 1 else 's'}" if n is not None else ""
    return f"{split} split{cases}{allocators}"


def target_distances(figures: dict[str, float], targets: Targets | None = None) -> list[str]:
    """How far each validation figure stands from its target, one line each, naming the
    subset it is over (``subset_name``)."""
    targets = targets or Targets()
    out = []
    for metric, _ in targets.by_metric:
        for stat, limit in targets.limits(metric).items():
            value = figures.get(f"validation/{metric}/{stat}")
            if limit is None or value is None:
                continue
            verdict = "met" if value <= limit else "NOT met"
            out.append(
                f"{metric} {stat} ({subset_name(figures, metric)}): {100 * value:.2f} % "
                f"(target {100 * limit:.1f} %, {verdict}, {100 * (value - limit):+.2f} pp)"
            )
    value = figures.get("validation/tokens_per_second/median_abs_error")
    if value is not None:
        limit = targets.tokens_per_second_median_abs_error
        verdict = "met" if value <= limit else "NOT met"
        out.append(
            f"tokens_per_second median_abs_error ({subset_name(figures, 'tokens_per_second')}): "
            f"{100 * value:.2f} % (target {100 * limit:.0f} %, {verdict}, "
            f"{100 * (value - limit):+.2f} pp)"
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


@dataclass(frozen=True)
class GatedReport:
    """``vramcalc report``: the report and its gate against the committed figures."""

    report: Report
    figures: dict[str, float]
    gate: Gate
    inputs: dict[str, Any] | None = None  # freshness.report_inputs: what it was computed from


def gated_report(
    records: list[dict[str, Any]],
    sources: list[str],
    baseline: dict[str, float] | None,
    allocator_model: str | None = None,
    progress: Any = None,
) -> GatedReport:
    """Every record estimated (``build_report``), its figures and the gate against
    ``baseline`` (``committed_figures``; None: nothing to compare with)."""
    report = build_report(records, sources, allocator_model, progress=progress)
    figures = summary_figures(report)
    regressions = check_regressions(figures, baseline) if baseline is not None else None
    gate = Gate(
        None if regressions is None else tuple(regressions),
        tuple(target_distances(figures)),
        tuple(check_targets(report)),
    )
    return GatedReport(report, figures, gate)
