"""Refit the throughput efficiencies on measured step times (calibration split only).

Once it is known for each case whether its GPU work or its host launches take
longer per micro-batch, the time model of ``throughput.py`` is linear in

    a[key] = 1 / compute_efficiency[key]   b = 1 / bandwidth_efficiency
    h = host_seconds_per_layer_pass        c = step_overhead_seconds

    GPU-bound:  step = a[key]·C + b·(M + O) + c
    host-bound: step = h·grad_accum·passes + b·O + c

(C, M, O: compute, micro-batch memory and optimizer seconds at efficiency 1).
``fit_cases`` alternates: put each case on its longer branch with the current
constants, solve least squares on the *relative* step-time error (each row
divided by the measured time), repeat until no case changes branch. A weak pull
toward the priors (``prior_weight``) keeps a constant that no case informs at
its prior and the system solvable with few cases; a constant the data would
make non-positive stays at its prior.

Records use the harness schema: plan fields at top level plus ``step_seconds``
(or ``tokens_per_second``), ``gpu_name``, ``split``, ``status``, ``case_id``.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from datetime import date
from typing import Any

from vramcalc.catalog import ModelSpec, find_gpu, resolve_model
from vramcalc.errors import VramcalcError
from vramcalc.inventory import ModelInventory, build_inventory
from vramcalc.plan import TrainingPlan
from vramcalc.throughput import (
    EFFICIENCY_KEYS,
    ThroughputCalibration,
    TimeTerms,
    load_throughput_calibration,
    time_terms,
)

PARAMS = (
    *(f"compute_efficiency_{k}" for k in EFFICIENCY_KEYS),
    "bandwidth_efficiency",
    "host_seconds_per_layer_pass",
    "step_overhead_seconds",
)
_B, _H, _C = len(EFFICIENCY_KEYS), len(EFFICIENCY_KEYS) + 1, len(EFFICIENCY_KEYS) + 2
_PLAN_FIELDS = tuple(f.name for f in fields(TrainingPlan))

InventoryFor = Callable[[TrainingPlan], ModelInventory]


@dataclass(frozen=True)
class FitCase:
    """One measured case: its plan priced at efficiency 1 and its measured step time."""

    case_id: str
    split: str
    gpu_name: str  # catalog name
    plan: TrainingPlan
    terms: TimeTerms
    measured_step_seconds: float

    @property
    def tokens_per_step(self) -> int:
        return self.plan.seq_len * self.plan.batch_size * self.plan.grad_accum


@dataclass(frozen=True)
class ThroughputFit:
    """Fitted constants, the cases behind them and how well they reproduce those cases."""

    calibration: ThroughputCalibration
    cases: tuple[FitCase, ...]
    predicted_step_seconds: tuple[float, ...]
    informed: tuple[str, ...]  # constants some case informs; the others kept their prior
    skipped: tuple[str, ...]  # records not used, with the reason

    @property
    def relative_errors(self) -> tuple[float, ...]:
        """Predicted / measured tokens per second - 1, per case."""
        return tuple(
            c.measured_step_seconds / p - 1
            for c, p in zip(self.cases, self.predicted_step_seconds, strict=True)
        )

    @property
    def median_abs_error(self) -> float:
        return statistics.median(abs(e) for e in self.relative_errors)


# -- records -> cases ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _spec(model: str) -> ModelSpec:
    return resolve_model(model)


def default_inventory_for(plan: TrainingPlan) -> ModelInventory:
    """The plan's model resolved (catalog, path, hub) and counted on meta (disk-cached)."""
    return build_inventory(_spec(plan.model).config_dict, plan)


def plan_from_record(record: Mapping[str, Any]) -> TrainingPlan:
    """The ``TrainingPlan`` of a measurement record (plan fields at top level, blanks dropped)."""
    return TrainingPlan.from_dict({k: record[k] for k in _PLAN_FIELDS if record.get(k) is not None})


def _measured_step_seconds(record: Mapping[str, Any], plan: TrainingPlan) -> float | None:
    step = record.get("step_seconds")
    if isinstance(step, (int, float)) and step > 0:
        return float(step)
    tps = record.get("tokens_per_second")
    if isinstance(tps, (int, float)) and tps > 0:
        return plan.seq_len * plan.batch_size * plan.grad_accum / float(tps)
    return None


def cases_from_records(
    records: Iterable[Mapping[str, Any]],
    split: str | None = None,
    inventory_for: InventoryFor | None = None,
) -> tuple[list[FitCase], list[str]]:
    """Usable cases of ``split`` (every split when None) and why the others were skipped."""
    inventory_for = inventory_for or default_inventory_for
    cases: list[FitCase] = []
    skipped: list[str] = []
    for index, record in enumerate(records):
        if split is not None and record.get("split") != split:
            continue
        case_id = str(record.get("case_id") or f"record {index}")
        if record.get("status") != "ok":
            skipped.append(f"{case_id}: status {record.get('status')!r}")
            continue
        try:
            plan = plan_from_record(record)
            step = _measured_step_seconds(record, plan)
            if step is None:
                skipped.append(f"{case_id}: no step_seconds or tokens_per_second")
                continue
            gpu = find_gpu(str(record.get("gpu_name") or ""))
            terms, _, _ = time_terms(inventory_for(plan), plan, gpu)
        except VramcalcError as err:
            skipped.append(f"{case_id}: {err}")
            continue
        cases.append(FitCase(case_id, str(record.get("split")), gpu.name, plan, terms, step))
    return cases, skipped


# -- the fit ---------------------------------------------------------------------------------------
def _theta(cal: ThroughputCalibration) -> list[float]:
    return [
        *(1 / cal.compute_efficiency[k] for k in EFFICIENCY_KEYS),
        1 / cal.bandwidth_efficiency,
        cal.host_seconds_per_layer_pass,
        cal.step_overhead_seconds,
    ]


def _with_theta(cal: ThroughputCalibration, theta: list[float]) -> ThroughputCalibration:
    return replace(
        cal,
        compute_efficiency={k: 1 / theta[i] for i, k in enumerate(EFFICIENCY_KEYS)},
        bandwidth_efficiency=1 / theta[_B],
        host_seconds_per_layer_pass=theta[_H],
        step_overhead_seconds=theta[_C],
    )


def _features(terms: TimeTerms, gpu_bound: bool) -> list[float]:
    x = [0.0] * len(PARAMS)
    if gpu_bound:
        x[EFFICIENCY_KEYS.index(terms.key)] = terms.compute_seconds
        x[_B] += terms.memory_seconds
    else:
        x[_H] = float(terms.grad_accum * terms.host_layer_passes)
    x[_B] += terms.optimizer_seconds
    x[_C] = 1.0
    return x


def _solve_least_squares(rows: list[list[float]], targets: list[float]) -> list[float]:
    """argmin ||rows·u - targets||² by the normal equations (small, well-conditioned systems)."""
    n = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(n)] for i in range(n)]
    y = [sum(r[i] * t for r, t in zip(rows, targets, strict=True)) for i in range(n)]
    for col in range(n):  # Gauss-Jordan with partial pivoting
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
    prior_weight: float = 1e-6,
    max_iterations: int = 100,
    split: str = "calibration",
) -> ThroughputFit:
    """Least-squares constants for ``cases`` (see the module docstring)."""
    if not cases:
        raise VramcalcError(
            f"no usable '{split}' measurements to fit the throughput efficiencies on"
        )
    prior = prior or load_throughput_calibration()
    theta0 = _theta(prior)
    theta = list(theta0)
    fixed: set[int] = set()
    pull = math.sqrt(prior_weight)
    branches: list[bool] | None = None
    for _ in range(max_iterations):
        current = _with_theta(prior, theta)
        new_branches = [
            c.terms.gpu_seconds(current) >= c.terms.host_seconds(current) for c in cases
        ]
        if new_branches == branches:
            break
        branches = new_branches
        while True:  # solve; pin any constant that goes non-positive to its prior and solve again
            rows, targets = [], []
            for case, gpu_bound in zip(cases, branches, strict=True):
                x = _features(case.terms, gpu_bound)
                row = [x[j] * theta0[j] / case.measured_step_seconds for j in range(len(PARAMS))]
                targets.append(1.0 - sum(row[j] for j in fixed))
                rows.append([0.0 if j in fixed else v for j, v in enumerate(row)])
            for j in range(len(PARAMS)):
                rows.append(
                    [pull if (i == j and j not in fixed) else 0.0 for i in range(len(PARAMS))]
                )
                targets.append(0.0 if j in fixed else pull)
            u = _solve_least_squares(rows, targets)
            bad = {j for j, v in enumerate(u) if j not in fixed and v <= 0}
            if not bad:
                break
            fixed |= bad
        theta = [theta0[j] if j in fixed else u[j] * theta0[j] for j in range(len(PARAMS))]
    assert branches is not None  # max_iterations >= 1
    counts = [0] * len(PARAMS)
    for case, gpu_bound in zip(cases, branches, strict=True):
        for j, v in enumerate(_features(case.terms, gpu_bound)):
            counts[j] += bool(v)
    informed = {PARAMS[j]: counts[j] for j in range(len(PARAMS)) if counts[j] and j not in fixed}
    kept = [theta[j] if PARAMS[j] in informed else theta0[j] for j in range(len(PARAMS))]
    return _result(cases, prior, _with_theta(prior, kept), informed, split)


def _result(
    cases: list[FitCase],
    prior: ThroughputCalibration,
    fitted: ThroughputCalibration,
    informed: dict[str, int],
    split: str,
) -> ThroughputFit:
    gpus = tuple(sorted({c.gpu_name for c in cases}))
    previous = prior.to_json()
    sources = dict(prior.sources)
    for name, count in informed.items():
        sources[f"throughput_{name}"] = (
            f"fitted {date.today().isoformat()} by vramcalc.throughput_fit: least squares on relative "
            f"step time, {count} of {len(cases)} '{split}' cases measured on {', '.join(gpus)} "
            f"inform it (prior was {previous[f'throughput_{name}']['value']:g})"
        )
    sources["throughput_measured_on"] = (
        f"GPUs of the '{split}' cases the throughput constants were fitted on"
    )
    calibration = replace(fitted, measured_on=gpus, sources=sources)
    predicted = tuple(c.terms.step_seconds(calibration) for c in cases)
    return ThroughputFit(calibration, tuple(cases), predicted, tuple(informed), ())


def fit_efficiency(
    records: Iterable[Mapping[str, Any]],
    split: str = "calibration",
    prior: ThroughputCalibration | None = None,
    inventory_for: InventoryFor | None = None,
    prior_weight: float = 1e-6,
) -> ThroughputFit:
    """Refit the throughput constants on the ``split`` records (``status == "ok"`` only).

    ``fit.calibration.to_json()`` gives the ``throughput_*`` entries to write
    back into ``data/calibration.json``.
    """
    cases, skipped = cases_from_records(records, split, inventory_for)
    fit = fit_cases(cases, prior, prior_weight, split=split)
    return replace(fit, skipped=tuple(skipped))


def compare_records(
    records: Iterable[Mapping[str, Any]],
    calibration: ThroughputCalibration | None = None,
    split: str | None = None,
    inventory_for: InventoryFor | None = None,
) -> list[dict[str, Any]]:
    """Predicted vs measured tokens/s per record (for the accuracy report)."""
    cal = calibration or load_throughput_calibration()
    cases, _ = cases_from_records(records, split, inventory_for)
    rows = []
    for case in cases:
        predicted = case.terms.step_seconds(cal)
        rows.append(
            {
                "case_id": case.case_id,
                "split": case.split,
                "gpu": case.gpu_name,
                "efficiency_key": case.terms.key,
                "measured_step_seconds": case.measured_step_seconds,
                "predicted_step_seconds": predicted,
                "measured_tokens_per_second": case.tokens_per_step / case.measured_step_seconds,
                "predicted_tokens_per_second": case.tokens_per_step / predicted,
                "tokens_per_second_error": case.measured_step_seconds / predicted - 1,
                "efficiency_measured_on": cal.measured_on_text,
            }
        )
    return rows
