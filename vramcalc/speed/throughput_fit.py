"""Fit the speed constants on measured step times (calibration split only), and compare.

A measurement record (harness schema: the plan fields at top level, ``step_seconds``
or ``tokens_per_second``, ``gpu_name``, ``split``, ``status``, ``case_id``) becomes a
``FitCase``: the plan's work (``throughput.plan_work``) with the peaks of the GPU it
ran on, and the measured step time. Records that do not measure what the planner
predicts are left out, with the reason (``excluded_reason``): failed cases, the
harness's plain-loop recipe (the planner models HF Trainer), and cases run with the
CUDA allocator's history recording on (``record_trace``: it records a stack trace
per allocation on the host, which perturbs the speed).

``fit_cases`` finds the constants named in ``FITTED`` (the others keep their
values: the FlashAttention efficiency, which no calibration case at 2k tokens or
less informs, stays a sourced prior) by Levenberg–Marquardt on the logs of the
constants, minimizing a robust (soft-L1, scale 0.1) sum over
``log(predicted / measured step time)``: a few noisy host-bound cases cannot pull
the rest. Everything is pure Python (no SciPy).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

from vramcalc.catalog import find_gpu
from vramcalc.errors import VramcalcError
from vramcalc.estimate import prepare
from vramcalc.measurements import SERVE_RECORD_REASON, plan_of
from vramcalc.speed.throughput import (
    CONSTANTS,
    Peaks,
    ThroughputCalibration,
    Work,
    load_throughput_calibration,
    plan_speed,
    price,
)
from vramcalc.trace.optrace import ProfileError
from vramcalc.training_plan import TrainingPlan

FITTED = tuple(c for c in CONSTANTS if c != "attention_efficiency")
SOFT_L1_SCALE = 0.1  # on log(predicted / measured): errors beyond ~10 % count less than squared

WorkFor = Callable[[TrainingPlan], Work]


@dataclass(frozen=True)
class FitCase:
    """One measured case: its work priced at efficiency 1 on its GPU, and its step time."""

    case_id: str
    split: str
    gpu_name: str  # catalog name
    work: Work
    peaks: Peaks
    measured_step_seconds: float
    record: Mapping[str, Any]

    @property
    def tokens_per_step(self) -> int:
        return self.work.step.tokens

    def predicted_step_seconds(self, cal: ThroughputCalibration) -> float:
        return price(self.work.step, self.peaks, cal).step_seconds

    def error(self, cal: ThroughputCalibration) -> float:
        """Predicted / measured tokens per second - 1 (positive: speed over-predicted)."""
        return self.measured_step_seconds / self.predicted_step_seconds(cal) - 1


# -- records -> cases ------------------------------------------------------------------------------
def default_work_for(plan: TrainingPlan) -> Work:
    """The plan's work as every command composes it (``estimate.prepare``, ``plan_speed``):
    the model resolved, counted and traced (both disk-cached)."""
    prepared = prepare(plan.model, plan)
    speed = plan_speed(prepared.spec.config_dict, prepared.inventory, plan)
    if speed.work is None:
        raise ProfileError(speed.problem or "the recipe's step could not be traced")
    return speed.work


def measured_step_seconds(record: Mapping[str, Any]) -> float | None:
    """The record's median step time (or the one its tokens/s implies), None without one."""
    step = record.get("step_seconds")
    if isinstance(step, (int, float)) and step > 0:
        return float(step)
    tps = record.get("tokens_per_second")
    if isinstance(tps, (int, float)) and tps > 0:
        plan = plan_of(record)
        return plan.seq_len * plan.batch_size * plan.grad_accum / float(tps)
    return None


def excluded_reason(record: Mapping[str, Any]) -> str | None:
    """Why a record does not measure what the planner predicts, or None."""
    if record.get("kind") == "serve":
        return SERVE_RECORD_REASON
    if record.get("status") != "ok":
        return f"status {record.get('status')!r}"
    if record.get("simulated_world_size"):
        return "simulated world (rank 0 alone on a fake process group): not a speed measurement"
    if (record.get("recipe") or "trainer") != "trainer":
        return f"recipe {record.get('recipe')!r}: the planner models HF Trainer"
    if record.get("record_trace"):
        return "allocator history recording on (record_trace): host time perturbed"
    if measured_step_seconds(record) is None:
        return "no step_seconds or tokens_per_second"
    return None


def cases_from_records(
    records: Iterable[Mapping[str, Any]],
    split: str | None = None,
    work_for: WorkFor | None = None,
) -> tuple[list[FitCase], list[str]]:
    """Usable cases of ``split`` (every split when None) and why the others were left out."""
    work_for = work_for or default_work_for
    cases: list[FitCase] = []
    skipped: list[str] = []
    for index, record in enumerate(records):
        if split is not None and record.get("split") != split:
            continue
        case_id = str(record.get("case_id") or f"record {index}")
        reason = excluded_reason(record)
        if reason is not None:
            skipped.append(f"{case_id}: {reason}")
            continue
        try:
            plan = plan_of(record)
            gpu = find_gpu(str(record.get("gpu_name") or ""))
            work = work_for(plan)
            peaks = Peaks.of(gpu, plan, work.step)
        except VramcalcError as err:
            skipped.append(f"{case_id}: {err}")
            continue
        step = measured_step_seconds(record)
        assert step is not None  # excluded_reason checked it
        cases.append(
            FitCase(case_id, str(record.get("split")), gpu.name, work, peaks, step, record)
        )
    return cases, skipped


# -- the fit ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThroughputFit:
    """Fitted constants, the cases behind them and how well they reproduce those cases."""

    calibration: ThroughputCalibration
    cases: tuple[FitCase, ...]
    skipped: tuple[str, ...]  # records not used, with the reason
    iterations: int
    prior: ThroughputCalibration | None = None  # the constants the fit started from

    @property
    def relative_errors(self) -> tuple[float, ...]:
        return tuple(c.error(self.calibration) for c in self.cases)

    @property
    def median_abs_error(self) -> float:
        return statistics.median(abs(e) for e in self.relative_errors)


def _with(
    cal: ThroughputCalibration, names: tuple[str, ...], logs: list[float]
) -> ThroughputCalibration:
    values: dict[str, Any] = {n: math.exp(v) for n, v in zip(names, logs, strict=True)}
    return replace(cal, **values)


def _robust_residuals(cases: list[FitCase], cal: ThroughputCalibration) -> list[float]:
    """sign(r)·sqrt(2·s²·(sqrt(1 + (r/s)²) - 1)) for r = log(predicted / measured): their
    squares sum to the soft-L1 cost."""
    out = []
    for case in cases:
        r = math.log(case.predicted_step_seconds(cal) / case.measured_step_seconds)
        cost = 2 * SOFT_L1_SCALE**2 * (math.sqrt(1 + (r / SOFT_L1_SCALE) ** 2) - 1)
        out.append(math.copysign(math.sqrt(cost), r))
    return out


def _solve(a: list[list[float]], y: list[float]) -> list[float]:
    """Solve a·x = y (small, symmetric positive definite) by Gauss-Jordan with pivoting."""
    n = len(y)
    a = [row[:] for row in a]
    y = y[:]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot], y[col], y[pivot] = a[pivot], a[col], y[pivot], y[col]
        for r in range(n):
            if r != col and a[r][col]:
                factor = a[r][col] / a[col][col]
                a[r] = [v - factor * w for v, w in zip(a[r], a[col], strict=True)]
                y[r] -= factor * y[col]
    return [y[i] / a[i][i] for i in range(n)]


def fit_cases(
    cases: list[FitCase],
    prior: ThroughputCalibration | None = None,
    names: tuple[str, ...] = FITTED,
    max_iterations: int = 200,
    split: str = "calibration",
) -> ThroughputFit:
    """Levenberg–Marquardt on the logs of ``names`` (module docstring), from ``prior``."""
    if not cases:
        raise VramcalcError(f"no usable '{split}' measurements to fit the throughput constants on")
    prior = prior or load_throughput_calibration()
    x = [math.log(getattr(prior, n)) for n in names]
    r = _robust_residuals(cases, _with(prior, names, x))
    cost, damping, iterations = sum(v * v for v in r), 1e-3, 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007 - reported
        step = 1e-4
        jacobian = []  # columns: d residuals / d log(constant), central differences
        for i in range(len(names)):
            up, down = x[:], x[:]
            up[i] += step
            down[i] -= step
            above = _robust_residuals(cases, _with(prior, names, up))
            below = _robust_residuals(cases, _with(prior, names, down))
            jacobian.append([(a - b) / (2 * step) for a, b in zip(above, below, strict=True)])
        jtj = [
            [sum(a * b for a, b in zip(ci, cj, strict=True)) for cj in jacobian] for ci in jacobian
        ]
        jtr = [sum(a * b for a, b in zip(ci, r, strict=True)) for ci in jacobian]
        improved = False
        while damping < 1e10:
            lhs = [  # Marquardt's scaled damping; a constant no case moves gets a unit diagonal
                [(v or 1.0) * (1 + damping) if i == j else v for j, v in enumerate(row)]
                for i, row in enumerate(jtj)
            ]
            delta = _solve(lhs, [-v for v in jtr])
            trial = [a + d for a, d in zip(x, delta, strict=True)]
            trial_r = _robust_residuals(cases, _with(prior, names, trial))
            trial_cost = sum(v * v for v in trial_r)
            if trial_cost < cost:  # go on while the constants still move by 1e-6 or more
                improved = max(abs(d) for d in delta) > 1e-6
                x, r, cost, damping = trial, trial_r, trial_cost, max(damping / 10, 1e-9)
                break
            damping *= 10
        if not improved:
            break
    fitted = _with(prior, names, x)
    return ThroughputFit(
        _sourced(fitted, prior, names, cases, split), tuple(cases), (), iterations, prior
    )


def _sourced(
    fitted: ThroughputCalibration,
    prior: ThroughputCalibration,
    names: tuple[str, ...],
    cases: list[FitCase],
    split: str,
) -> ThroughputCalibration:
    gpus = tuple(sorted({c.gpu_name for c in cases}))
    files = sorted({str(c.record.get("source_file", "")) for c in cases} - {""})
    sources = dict(prior.sources)
    for name in names:
        sources[f"throughput_{name}"] = (
            f"fitted {date.today().isoformat()} by vramcalc.speed.throughput_fit (robust least squares "
            f"on log step time) on the {len(cases)} '{split}' cases measured on {', '.join(gpus)} "
            "listed in throughput_fitted_on"
        )
    sources["throughput_measured_on"] = f"GPUs of the '{split}' cases the constants were fitted on"
    sources["throughput_fitted_on"] = (
        "the measurement files and cases (file:case_id) the fitted constants come from "
        "(data/measurements/)"
    )
    cases_used = sorted(f"{c.record.get('source_file', '')}:{c.case_id}" for c in cases)
    fitted_on = {"split": split, "files": files, "cases": cases_used}
    # 4 digits: the data's noise
    rounded: dict[str, Any] = {n: float(f"{getattr(fitted, n):.4g}") for n in names}
    return replace(fitted, **rounded, measured_on=gpus, sources=sources, fitted_on=fitted_on)


def fit_throughput(
    records: Iterable[Mapping[str, Any]],
    split: str = "calibration",
    prior: ThroughputCalibration | None = None,
    work_for: WorkFor | None = None,
) -> ThroughputFit:
    """Refit the constants on the ``split`` records; ``fit.calibration.to_json()`` gives the
    ``throughput_*`` entries for ``data/calibration.json``."""
    cases, skipped = cases_from_records(records, split, work_for)
    fit = fit_cases(cases, prior, split=split)
    return replace(fit, skipped=tuple(skipped))


def compare_records(
    records: Iterable[Mapping[str, Any]],
    calibration: ThroughputCalibration | None = None,
    split: str | None = None,
    work_for: WorkFor | None = None,
) -> list[dict[str, Any]]:
    """Predicted vs measured tokens/s per usable record (for the accuracy reports)."""
    cal = calibration or load_throughput_calibration()
    cases, _ = cases_from_records(records, split, work_for)
    rows = []
    for case in cases:
        time = price(case.work.step, case.peaks, cal)
        rows.append(
            {
                "case_id": case.case_id,
                "split": case.split,
                "gpu": case.gpu_name,
                "source_file": case.record.get("source_file"),
                "bound": time.bound,
                "measured_step_seconds": case.measured_step_seconds,
                "predicted_step_seconds": time.step_seconds,
                "measured_tokens_per_second": case.tokens_per_step / case.measured_step_seconds,
                "predicted_tokens_per_second": case.tokens_per_step / time.step_seconds,
                "tokens_per_second_error": case.measured_step_seconds / time.step_seconds - 1,
                "efficiency_measured_on": cal.measured_on_text,
            }
        )
    return rows
