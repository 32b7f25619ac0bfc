"""The Python API: each ``vramcalc`` command as one call that returns a typed, frozen result.

The command line is a client of these functions: it parses its options, calls one of them and
renders the result (``vramcalc.render``); ``to_dict()`` of a result is the command's
``--json``. Defaults are the commands' defaults, and so are the errors (``VramcalcError``
kinds, each naming the option it is about).

A plan is given as a ``TrainingPlan``, a model name with plan fields as keywords, a mapping of
plan fields, or a ``FilePlan`` read from a training config (``read_config``)::

    import vramcalc

    result = vramcalc.training_plan("meta-llama/Llama-2-13b", method="qlora", rank=16, gpus=["RTX-4090"])
    result.memory.device_total_bytes
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# What ``plan`` needs is imported here; every other command imports its own modules when called
# (a warm plan, issue 18's 0.3 s, loads neither the accuracy report, the speed fit, serving nor
# the other commands).
from vramcalc.budget import DEFAULT_HEADROOM, parse_headroom
from vramcalc.catalog import CatalogModel, Gpu, find_gpu, load_gpus, model_catalog
from vramcalc.configs import FilePlan, read_plan_file
from vramcalc.errors import CatalogError
from vramcalc.planner import PlanResult, choose_gpus, plan_result
from vramcalc.speed.cost import RunLength
from vramcalc.training_plan import TrainingPlan, plan_from_values

if TYPE_CHECKING:
    from vramcalc.accuracy import GatedReport
    from vramcalc.advice import Advice
    from vramcalc.checking import CheckResult
    from vramcalc.fitting import FitResult
    from vramcalc.serve_plan import ServePlan
    from vramcalc.serving.serve_planner import ServeResult
    from vramcalc.speed.links import Link
    from vramcalc.speed.speed_report import GatedSpeedReport
    from vramcalc.speed.throughput_fit import ThroughputFit
    from vramcalc.sweeps import SweepResult

PlanInput = TrainingPlan | FilePlan | Mapping[str, Any] | str
GpuInput = str | Gpu


def read_config(path: str | Path, **flags: Any) -> FilePlan:
    """The plan a training config describes (axolotl, LLaMA-Factory, TRL, HF Trainer), with
    ``flags`` (plan fields) on top of the file, and where every field came from."""
    return read_plan_file(path, flags)


def plan(
    plan: PlanInput,
    /,
    *,
    gpus: Iterable[GpuInput] | None = None,
    headroom: float | str = DEFAULT_HEADROOM,
    dataset_tokens: int | None = None,
    epochs: float | None = None,
    steps: int | None = None,
    price_per_hour: float | None = None,
    given: Iterable[str] | None = None,
    allocator_model: str | None = None,
    **fields: Any,
) -> PlanResult:
    """``vramcalc plan``: memory, the fit and speed on each of ``gpus`` (default: the whole
    catalog) and, given a run length, its cost on each GPU that fits.

    ``given``: the plan options set explicitly, which some warnings need (default: the
    keyword ``fields``; a ``FilePlan``'s flags). ``allocator_model``: ``simulate`` (the
    default: the run simulated) or ``approximate`` (a calibrated fraction, marked so)."""
    the_plan, source, named = _plan_and_source(plan, fields, given)
    wants_cost = dataset_tokens is not None or steps is not None or epochs is not None
    return plan_result(
        the_plan,
        choose_gpus(gpus),
        RunLength(dataset_tokens, epochs, steps) if wants_cost else None,
        price_per_hour,
        named,
        _headroom(headroom),
        source,
        allocator_model,
    )


def sweep(
    axes: Mapping[str, Any] | None = None,
    /,
    *,
    cases: str | Path | Sequence[Mapping[str, Any]] | None = None,
    from_file: str | Path | FilePlan | None = None,
    gpus: Iterable[GpuInput] | None = None,
    headroom: float | str = DEFAULT_HEADROOM,
    speed: bool = False,
    dataset_tokens: int | None = None,
    epochs: float | None = None,
    steps: int | None = None,
    price_per_hour: float | None = None,
    allocator_model: str | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> SweepResult:
    """``vramcalc sweep``: one row per plan of the cross product of ``axes`` (plan option ->
    a value or a list of values), per row of ``cases`` (a CSV file or mappings), around the
    plan of ``from_file``; ``fits_<GPU>`` per GPU, and with ``speed`` / a run length the
    speed and cost columns. An invalid plan gets the reason in its ``error`` column."""
    from vramcalc.sweeps import SpeedAndCost, sweep_plans

    lists = {
        name: list(value) if isinstance(value, (list, tuple)) else [value]
        for name, value in (axes or {}).items()
    }
    length = (dataset_tokens, epochs, steps)
    run = RunLength(*length) if any(v is not None for v in length) else None
    return sweep_plans(
        lists,
        choose_gpus(gpus),
        _headroom(headroom),
        cases=cases,
        source=from_file,
        extras=SpeedAndCost(speed, run, price_per_hour),
        allocator_model=allocator_model,
        progress=progress,
    )


def fit(
    plan: PlanInput,
    /,
    gpu: GpuInput,
    *,
    headroom: float | str = DEFAULT_HEADROOM,
    search: str = "batch_size",
    seq_multiple: int = 64,
    given: Iterable[str] | None = None,
    allocator_model: str | None = None,
    **fields: Any,
) -> FitResult:
    """``vramcalc fit``: the largest batch size (``search="seq_len"``: the longest sequence, a
    multiple of ``seq_multiple``) whose plan fits ``gpu``, and the estimates either side."""
    from vramcalc.fitting import fit_plan

    the_plan, source, named = _plan_and_source(plan, fields, given)
    return fit_plan(
        the_plan,
        _gpu(gpu),
        _headroom(headroom),
        search=search,
        seq_multiple=seq_multiple,
        given=named,
        source=source,
        allocator_model=allocator_model,
    )


def advise(
    plan: PlanInput,
    /,
    gpu: GpuInput,
    *,
    headroom: float | str = DEFAULT_HEADROOM,
    allocator_model: str | None = None,
    **fields: Any,
) -> Advice:
    """``vramcalc advise``: the changes that make the plan fit ``gpu``, ranked by what they
    cost, and the cheapest combination of them that fits."""
    from vramcalc.advice import advise as _advise

    the_plan, source, _ = _plan_and_source(plan, fields, None)
    return _advise(the_plan, _gpu(gpu), _headroom(headroom), source, allocator_model)


def serve(
    plan: ServePlan | str | None = None,
    /,
    *,
    gpus: Iterable[GpuInput] | None = None,
    fit: str | None = None,
    headroom: float | str = DEFAULT_HEADROOM,
    allocator_model: str | None = None,
    **options: Any,
) -> ServeResult:
    """``vramcalc serve``: the memory of serving a base model with LoRA adapters, the GPUs it
    fits with prefill and decode speed, and with ``fit`` (``batch`` or ``context``, one GPU)
    the largest batch or context that fits. ``plan``: a ``ServePlan``, or the model with the
    options of ``serve_plan.serve_plan`` as keywords (adapters, adapter_dir, rank, targets,
    context, quant, mode, batch ...). ``allocator_model``: ``simulate`` (generate traced on
    fake tensors and replayed through the caching-allocator model; the default) or
    ``approximate`` (the rules); ``ServeResult.memory.allocator_model`` says which answered."""
    from vramcalc.serve_plan import ServePlan, serve_plan
    from vramcalc.serving.serve_planner import serve_result

    if not isinstance(plan, ServePlan):
        plan = serve_plan(plan, **options)
    elif options:
        raise TypeError(f"serve() got a ServePlan and options {sorted(options)}")
    return serve_result(plan, choose_gpus(gpus), fit, _headroom(headroom), allocator_model)


def check(
    configs: str | Path | Iterable[str | Path],
    /,
    gpu: GpuInput,
    *,
    headroom: float | str = DEFAULT_HEADROOM,
    baseline: str | Path | Mapping[str, Any] | None = None,
    allocator_model: str | None = None,
    **flags: Any,
) -> CheckResult:
    """``vramcalc check``: each training config (paths or globs) read as ``--from`` reads it,
    ``flags`` (plan fields) on top, estimated and judged on ``gpu``; ``result.fits`` says
    whether every one fits. ``baseline``: an earlier ``to_dict()`` (or the file ``--json``
    wrote) to report each config's change against."""
    from vramcalc.checking import check_plans, read_baseline

    patterns = [str(configs)] if isinstance(configs, (str, Path)) else [str(c) for c in configs]
    if isinstance(baseline, (str, Path)):
        baseline = read_baseline(baseline)
    return check_plans(patterns, _gpu(gpu), _headroom(headroom), flags, baseline, allocator_model)


def compare(
    predicted: str | Path, measured: str | Path, output: str | Path, *, title: str = ""
) -> Path:
    """``vramcalc compare``: a predicted memory timeline (``plan --snapshot``) over a measured
    one (a torch memory snapshot or a harness allocator trace), written to ``output``."""
    from vramcalc.timeline import compare_timelines  # matplotlib: only when a picture is drawn

    return compare_timelines(predicted, measured, output, title)


def report_timeline(out_dir: str | Path = "reports") -> Path:
    """The report's picture: a committed allocator trace against the simulated run of its plan,
    written to ``out_dir/timeline_<case>.png``."""
    from vramcalc.timeline import report_timeline as draw  # matplotlib: only when drawn

    return draw(out_dir=out_dir)


def models() -> tuple[CatalogModel, ...]:
    """``vramcalc models``: the bundled model catalog."""
    return tuple(model_catalog())


def gpus() -> tuple[Gpu, ...]:
    """``vramcalc gpus``: the GPU catalog."""
    return tuple(load_gpus())


def gpu_links(gpus: Iterable[Gpu], num_gpus: int = 8) -> dict[str, Link | None]:
    """``vramcalc gpus``: what carries the collectives of ``num_gpus`` cards of each kind (the
    NCCL bus bandwidth the speed model assumes), None where ``data/gpus.csv`` gives no link."""
    from vramcalc.speed.links import gpu_link

    links: dict[str, Link | None] = {}
    for gpu in gpus:
        try:
            links[gpu.name] = gpu_link(gpu, num_gpus)
        except CatalogError:
            links[gpu.name] = None
    return links


def report(
    measurements: str | Path | None = None,
    *,
    baseline: str | Path | None = None,
    allocator_model: str | None = "simulate",
    progress: Callable[[int], Any] | None = None,
) -> GatedReport:
    """``vramcalc report``: every GPU measurement of ``measurements`` (default
    ``data/measurements/``) joined with its estimate, the summary figures, and the gate
    against the ``accuracy.json`` in ``baseline`` (a report folder; None: no comparison)."""
    from vramcalc.accuracy import committed_figures, gated_report
    from vramcalc.freshness import report_inputs
    from vramcalc.measurements import MEASUREMENTS_DIR, load_measurements

    directory = Path(measurements or MEASUREMENTS_DIR)
    records, sources = load_measurements(directory)
    committed = committed_figures(Path(baseline)) if baseline is not None else None
    result = gated_report(records, sources, committed, allocator_model, progress)
    return dataclasses.replace(result, inputs=report_inputs(directory))


def stale_reports(
    reports: str | Path | None = None, measurements: str | Path | None = None
) -> list[str]:
    """How the accuracy report in ``reports`` differs from what ``report`` writes on today's
    code and data (an older estimator, other data, other columns), one sentence each."""
    from vramcalc.freshness import REPORTS_DIR, stale_report_problems
    from vramcalc.measurements import MEASUREMENTS_DIR

    return stale_report_problems(
        Path(reports or REPORTS_DIR), Path(measurements or MEASUREMENTS_DIR)
    )


def speed_report(
    measurements: str | Path | None = None, *, baseline: str | Path | None = None
) -> GatedSpeedReport:
    """``vramcalc speed-report``: predicted against measured tokens/s, and the gate against
    the ``throughput.json`` in ``baseline`` (a report folder; None: no comparison)."""
    from vramcalc.measurements import MEASUREMENTS_DIR, load_measurements
    from vramcalc.speed.speed_report import committed_splits, gated_speed_report

    records, _ = load_measurements(Path(measurements or MEASUREMENTS_DIR))
    committed = committed_splits(Path(baseline)) if baseline is not None else None
    return gated_speed_report(records, committed)


def speed_fit(measurements: str | Path | None = None) -> ThroughputFit:
    """``vramcalc speed-fit``: the speed constants fitted on the calibration split (the
    constants in use are ``ThroughputFit``'s prior: ``load_throughput_calibration()``)."""
    from vramcalc.measurements import MEASUREMENTS_DIR, load_measurements
    from vramcalc.speed.throughput import load_throughput_calibration
    from vramcalc.speed.throughput_fit import fit_throughput

    records, _ = load_measurements(Path(measurements or MEASUREMENTS_DIR))
    return fit_throughput(records, prior=load_throughput_calibration())


# -- inputs ------------------------------------------------------------------------------------
def _plan_and_source(
    plan: PlanInput, fields: Mapping[str, Any], given: Iterable[str] | None
) -> tuple[TrainingPlan, FilePlan | None, frozenset[str]]:
    """The plan, the config file it came from, and the options named explicitly."""
    if isinstance(plan, FilePlan):
        if fields:
            raise TypeError(
                f"plan fields {sorted(fields)} next to a FilePlan: give them to read_config"
            )
        flags = {name for name, source in plan.sources.items() if source.origin == "flag"}
        return plan.plan, plan, frozenset(flags if given is None else given)
    if isinstance(plan, TrainingPlan):
        the_plan = plan.with_(**fields) if fields else plan
    elif isinstance(plan, str):
        the_plan = plan_from_values({"model": plan, **fields})
    else:
        the_plan = plan_from_values({**plan, **fields})
    return the_plan, None, frozenset(fields if given is None else given)


def _gpu(gpu: GpuInput) -> Gpu:
    return gpu if isinstance(gpu, Gpu) else find_gpu(gpu)


def _headroom(headroom: float | str) -> float:
    return parse_headroom(headroom)
