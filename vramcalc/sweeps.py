"""Sweeps: estimate many plans at once (a cross product of option values, or a
cases file with one plan per row), for capacity-planning sheets.

``expand_cases`` turns option values and/or rows into complete cases,
``run_sweep`` estimates each (an invalid case gets an ``error``, it does not
stop the sweep) and ``SweepResult.records`` flattens the rows into one flat
schema shared by every output format (``vramcalc.render.export``):

* plan columns, named like ``TrainingPlan`` fields / CLI options;
* ``trainable_params``, ``total_params``, ``peak_phase``;
* every total and component in GiB (2**30 bytes, rounded to 0.0001) as
  ``<name>_gib`` and exactly as ``<name>_bytes``, equal to ``plan --json``;
* ``fits_<GPU>`` per GPU (``device_total_bytes`` within the budget that the
  headroom leaves, see ``vramcalc.fitting``), ``smallest_fitting_gpu``;
* ``error``: why the case could not be estimated, else empty.

The model inventory is the only expensive step, and it depends only on the
model and (for adapter methods) the LoRA rank and targets, so ``EstimateCache``
builds it once per such key; each row is then arithmetic.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vramcalc.budget import DEFAULT_HEADROOM, judge
from vramcalc.catalog import Gpu, ModelSpec, find_gpu, resolve
from vramcalc.checks import plan_warnings
from vramcalc.configs import FilePlan, read_plan_file
from vramcalc.csvrows import read_csv
from vramcalc.errors import InvalidPlanError, UnknownModelError, VramcalcError
from vramcalc.estimate import (
    COMPONENTS,
    MemoryEstimate,
    Prepared,
    default_allocator_model,
    prepare,
)
from vramcalc.inventory import lora_key
from vramcalc.memory import GIB
from vramcalc.speed.cost import (
    COLUMN_PREFIXES,
    SPEED_PREFIXES,
    RunLength,
    check_price,
    run_cost,
    throughput_columns,
)
from vramcalc.speed.throughput import plan_speed
from vramcalc.training_plan import (
    PLAN_DEFAULTS,
    PLAN_FIELDS,
    TrainingPlan,
    flag,
    plan_from_values,
    suggest,
)

GIB_DECIMALS = 4
GPU_COLUMN = "gpu"  # optional cases column: GPU(s) the row is meant for
TOTALS = ("device_total", "peak_reserved", "peak_allocated")
BYTE_COLUMNS = TOTALS + COMPONENTS
RESULT_COLUMNS = (
    "trainable_params",
    "total_params",
    "peak_phase",
    "smallest_fitting_gpu",
    "fits",
    "error",
    "optimizer_steps",
)
COST_PREFIXES = COLUMN_PREFIXES[len(SPEED_PREFIXES) :]  # wall_hours, gpu_hours, cost_usd


# -- cases -----------------------------------------------------------------------------------
def read_cases(path: str | Path) -> list[dict[str, str]]:
    """Rows of a cases CSV, keyed by plan field name (dashes or underscores, any case).

    Blank cells mean "not set here". Columns that a sweep writes (``*_gib``,
    ``fits_*``, ``error``, ...) are ignored, so an estimated sheet can be edited
    and run again; any other unknown column is an ``InvalidPlanError``.
    """
    path = Path(path)
    try:
        table = read_csv(path)
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidPlanError([f"--cases {path}: cannot read it ({err})."]) from err
    if not table.headers:
        raise InvalidPlanError(
            [f"--cases {path}: the file is empty; its first row must name plan options."]
        )
    known = set(PLAN_FIELDS) | {GPU_COLUMN}
    unknown = [
        h
        for h, n in zip(table.headers, table.names, strict=True)
        if n not in known and not _is_result_column(n)
    ]
    if unknown:
        raise InvalidPlanError(
            [f"--cases {path}: unknown column {h!r}.{suggest(h, sorted(known))}" for h in unknown]
            + [f"Columns are plan options: {', '.join(PLAN_FIELDS)} (and {GPU_COLUMN})."]
        )
    rows = [{n: v for n, v in row.cells.items() if n in known} for row in table.rows]
    if not rows:
        raise InvalidPlanError([f"--cases {path}: no plan rows below the header."])
    return rows


def _is_result_column(name: str) -> bool:
    return (
        name in RESULT_COLUMNS
        or name == "model_source"
        or name.startswith(("fits_", *(f"{p.lower()}_" for p in COLUMN_PREFIXES)))
        or name.endswith(("_gib", "_bytes"))
    )


def expand_cases(
    axes: Mapping[str, Sequence[Any]],
    defaults: Mapping[str, Any],
    cases: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Complete cases: each row (or one empty row) × every combination of ``axes``
    for the fields the row leaves unset, the rest from ``defaults``.

    Axes vary in ``TrainingPlan`` field order, the last fastest.
    """
    extra = sorted(set(axes) - set(PLAN_FIELDS))
    if extra:
        raise InvalidPlanError([f"{flag(n)} is not a plan option." for n in extra])
    if cases is None:
        if not axes.get("model"):
            raise InvalidPlanError(
                ["--model is required (or --cases FILE.csv with a model column)."]
            )
        cases = [{}]
    out = []
    for case in cases:
        given = {k: v for k, v in case.items() if v not in (None, "")}
        free = [n for n in PLAN_FIELDS if n not in given and axes.get(n)]
        for combo in itertools.product(*(axes[n] for n in free)):
            out.append({**defaults, **given, **dict(zip(free, combo, strict=True))})
    return out


def plan_from_case(case: Mapping[str, Any]) -> TrainingPlan:
    """A ``TrainingPlan`` from a case whose values may be text (CSV cells): the plan fields
    through ``plan_from_values`` (every problem at once), the ``gpu`` column aside."""
    return plan_from_values({k: v for k, v in case.items() if k != GPU_COLUMN})


# -- estimating --------------------------------------------------------------------------------
class EstimateCache:
    """``prepare`` per model and inventory key for a whole sweep, failures included.

    ``prepare`` is memoized already; this also remembers what failed (an unknown model,
    a broken config, a missing target), so a bad model fails fast on every row.
    """

    def __init__(self, allocator_model: str | None = None) -> None:
        self._specs: dict[str, ModelSpec | VramcalcError] = {}
        self._prepared: dict[tuple[Any, ...], Prepared | VramcalcError] = {}
        self.allocator_model = allocator_model or default_allocator_model()
        self.simulated = 0  # plans this sweep simulated (not found in the cache)
        self.approximated = 0  # plans whose allocator slack is the calibrated fraction

    def spec(self, model: str) -> ModelSpec:
        if model not in self._specs:
            try:
                self._specs[model] = resolve(model)
            except VramcalcError as err:
                self._specs[model] = err
        return _value_or_raise(self._specs[model])

    def prepared(self, plan: TrainingPlan) -> Prepared:
        spec = self.spec(plan.model)
        key = (spec.source, spec.name, repr(lora_key(plan)))
        if key not in self._prepared:
            try:
                self._prepared[key] = prepare(spec, plan)
            except VramcalcError as err:
                self._prepared[key] = err
        return _value_or_raise(self._prepared[key])

    def estimate(self, plan: TrainingPlan) -> MemoryEstimate:
        """Equal to ``vramcalc.estimate.estimate(plan)``: every row simulated (one trace per
        recipe, a replay per plan, both cached) unless ``approximate`` was asked for."""
        prepared = self.prepared(plan)
        if self.allocator_model == "simulate" and not prepared.cached(plan):
            self.simulated += 1
        est = prepared.estimate(plan, self.allocator_model)
        if est.allocator_model == "approximate":
            self.approximated += 1
        return est


def _value_or_raise(value: Any) -> Any:
    if isinstance(value, VramcalcError):
        raise value
    return value


@dataclass(frozen=True)
class SpeedAndCost:
    """Optional per-GPU columns: speed (``tokens_per_second_<GPU>``, ``step_seconds_<GPU>``,
    ``mfu_<GPU>``) and, given a run length, ``optimizer_steps`` plus ``wall_hours_<GPU>``,
    ``gpu_hours_<GPU>`` and ``cost_usd_<GPU>`` on each GPU the plan fits (``vramcalc.speed.cost``)."""

    speed: bool = False
    run: RunLength | None = None
    price_per_hour_usd: float | None = None

    def __post_init__(self) -> None:
        check_price(self.price_per_hour_usd)

    def columns(self, gpus: Sequence[Gpu]) -> list[str]:
        out = [f"{p}_{g.name}" for p in SPEED_PREFIXES for g in gpus] if self.speed else []
        if self.run is not None:
            out += ["optimizer_steps"] + [f"{p}_{g.name}" for p in COST_PREFIXES for g in gpus]
        return out

    def cells(
        self,
        prepared: Prepared,
        estimate: MemoryEstimate,
        gpus: Sequence[Gpu],
        headroom: float,
    ) -> dict[str, Any]:
        plan, out = estimate.plan, {}
        speed = plan_speed(prepared.spec.config_dict, prepared.inventory, plan)
        if self.speed:
            out.update(throughput_columns(speed, gpus))
        if self.run is not None:
            fitting = [
                g for g in gpus if judge(estimate.device_total_bytes, g, headroom, plan).fits
            ]
            table = run_cost(speed, fitting, self.run, self.price_per_hour_usd)
            priced = table.columns()
            out.update(
                {
                    k: v
                    for k, v in priced.items()
                    if k == "optimizer_steps" or k.startswith(COST_PREFIXES)
                }
            )
        return out


@dataclass(frozen=True)
class SweepRow:
    """One case: its inputs, and either its plan and estimate or the error."""

    case: dict[str, Any]
    plan: TrainingPlan | None
    estimate: MemoryEstimate | None
    gpus: tuple[Gpu, ...]  # the GPU(s) the case's own ``gpu`` cell names
    error: str | None
    cells: dict[str, Any] = field(default_factory=dict)  # ``SpeedAndCost`` columns
    warnings: tuple[str, ...] = ()  # vramcalc.checks.plan_warnings


@dataclass(frozen=True)
class SweepResult:
    rows: tuple[SweepRow, ...]
    gpus: tuple[Gpu, ...]  # one ``fits_<name>`` column each
    headroom: float
    extras: SpeedAndCost = SpeedAndCost()
    given: frozenset[str] = frozenset()  # plan options set explicitly: they define the rows
    approximated: int = 0  # rows whose allocator slack is the calibrated fallback
    source: FilePlan | None = None  # the config file the plans vary around (--from)

    @property
    def errors(self) -> int:
        return sum(1 for row in self.rows if row.error)

    @property
    def warnings(self) -> dict[str, int]:
        """Each distinct warning with the number of rows it concerns."""
        out: dict[str, int] = {}
        for row in self.rows:
            for warning in row.warnings:
                out[warning] = out.get(warning, 0) + 1
        return out

    @property
    def columns(self) -> list[str]:
        with_gpu = any(row.case.get(GPU_COLUMN) for row in self.rows)
        return (
            list(PLAN_FIELDS)
            + ([GPU_COLUMN, "fits"] if with_gpu else [])
            + ["trainable_params", "total_params", "peak_phase"]
            + [f"{name}_gib" for name in BYTE_COLUMNS]
            + [f"{name}_bytes" for name in BYTE_COLUMNS]
            + [f"fits_{gpu.name}" for gpu in self.gpus]
            + self.extras.columns(self.gpus)
            + ["smallest_fitting_gpu", "error"]
        )

    def records(self) -> list[dict[str, Any]]:
        """One flat dict per row, keys ``columns``; blanks are ``None``."""
        by_memory = sorted(self.gpus, key=lambda gpu: gpu.memory_bytes)
        columns = self.columns
        return [_record(row, columns, self.gpus, by_memory, self.headroom) for row in self.rows]


def _record(
    row: SweepRow,
    columns: list[str],
    gpus: Sequence[Gpu],
    by_memory: Sequence[Gpu],
    headroom: float,
) -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys(columns)
    for name in PLAN_FIELDS:
        out[name] = getattr(row.plan, name) if row.plan else row.case.get(name)
    out["targets"] = _targets_text(out["targets"])
    saved = out.get("modules_to_save")
    out["modules_to_save"] = saved if isinstance(saved, str) or not saved else ",".join(saved)
    if GPU_COLUMN in out:
        out[GPU_COLUMN] = row.case.get(GPU_COLUMN)
    est = row.estimate
    if est is None:
        out["error"] = row.error
        return out
    out["model"] = est.model_name
    out["trainable_params"] = est.trainable_params
    out["total_params"] = est.total_params
    out["peak_phase"] = est.peak_phase
    values = {
        "device_total": est.device_total_bytes,
        "peak_reserved": est.peak_reserved_bytes,
        "peak_allocated": est.peak_allocated_bytes,
        **est.components,
    }
    for name, nbytes in values.items():
        out[f"{name}_bytes"] = nbytes
        out[f"{name}_gib"] = round(nbytes / GIB, GIB_DECIMALS)
    total, plan = est.device_total_bytes, est.plan

    fits = {gpu.name: judge(total, gpu, headroom, plan).fits for gpu in {*gpus, *row.gpus}}
    for gpu in gpus:
        out[f"fits_{gpu.name}"] = fits[gpu.name]
    out["smallest_fitting_gpu"] = next((g.name for g in by_memory if fits[g.name]), None)
    if row.gpus:
        out["fits"] = all(fits[g.name] for g in row.gpus)
    out.update(row.cells)
    return out


def _targets_text(targets: Any) -> str:
    if targets is None or targets == "":
        return "default"
    return targets if isinstance(targets, str) else ",".join(targets)


def run_sweep(
    cases: Sequence[Mapping[str, Any]],
    gpus: Sequence[Gpu],
    headroom: float = DEFAULT_HEADROOM,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    cache: EstimateCache | None = None,
    extras: SpeedAndCost = SpeedAndCost(),
    given: Set[str] = frozenset(),
    allocator_model: str | None = None,
) -> SweepResult:
    """Estimate every case; an invalid one gets an ``error`` instead of stopping the sweep.

    GPUs named in a case's ``gpu`` cell get a ``fits_<name>`` column too.
    ``progress`` wraps the iteration (e.g. a tqdm bar); ``extras`` adds speed/cost columns;
    ``given`` names the plan options set explicitly (for ``vramcalc.checks.plan_warnings``).
    """
    cache = cache or EstimateCache(allocator_model)
    wants_cells = extras.speed or extras.run is not None
    columns: dict[str, Gpu] = {gpu.name: gpu for gpu in gpus}
    rows = []
    for case in progress(cases) if progress else cases:
        plan = est = None
        row_gpus: tuple[Gpu, ...] = ()
        cells: dict[str, Any] = {}
        warnings: tuple[str, ...] = ()
        try:
            row_gpus = tuple(
                find_gpu(n) for n in str(case.get(GPU_COLUMN) or "").split(",") if n.strip()
            )
            columns.update((gpu.name, gpu) for gpu in row_gpus)
            plan = plan_from_case(case)
            est = cache.estimate(plan)
            warnings = plan_warnings(plan, cache.prepared(plan).inventory, given)
            if wants_cells:
                cells = extras.cells(cache.prepared(plan), est, list(columns.values()), headroom)
            error = None
        except VramcalcError as err:
            error = str(err)
        rows.append(SweepRow(dict(case), plan, est, row_gpus, error, cells, warnings))
    return SweepResult(
        tuple(rows),
        tuple(columns.values()),
        headroom,
        extras,
        frozenset(given),
        cache.approximated,
    )


def sweep_plans(
    axes: Mapping[str, Sequence[Any]] | None = None,
    gpus: Sequence[Gpu] = (),
    headroom: float = DEFAULT_HEADROOM,
    *,
    cases: str | Path | Sequence[Mapping[str, Any]] | None = None,
    source: FilePlan | str | Path | None = None,
    extras: SpeedAndCost = SpeedAndCost(),
    allocator_model: str | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> SweepResult:
    """``vramcalc sweep``: every combination of the ``axes`` (plan option -> values), for each
    row of ``cases`` (a CSV file or mappings; blank cells take the axes), around the plan of a
    config file (``source``: its values are the defaults, the first value of each axis is a
    flag on top of it), estimated on ``gpus``.

    A model that resolves nowhere is a typo: an ``UnknownModelError`` before any row is made
    (a broken config only fails its rows)."""
    axes = {name: list(values) for name, values in (axes or {}).items()}
    for model in axes.get("model", ()):
        try:
            resolve(model)
        except UnknownModelError:
            raise
        except VramcalcError:
            pass  # a broken config: its rows get the error column, the others are written
    rows = read_cases(cases) if isinstance(cases, (str, Path)) else cases
    defaults = dict(PLAN_DEFAULTS)  # the plan's own defaults: what the CLI's options are
    if source is not None:
        if not isinstance(source, FilePlan):
            source = read_plan_file(source, {name: values[0] for name, values in axes.items()})
        defaults = source.plan.to_dict()
        if "method" in axes and "quant" not in axes:
            defaults["quant"] = None
        axes.setdefault("model", [source.plan.model])
    todo = expand_cases(axes, defaults, rows)
    given = set(axes).union(*(row.keys() for row in rows or ()))
    result = run_sweep(
        todo,
        list(gpus),
        headroom,
        progress,
        extras=extras,
        given=given,
        allocator_model=allocator_model,
    )
    return replace(result, source=source)
