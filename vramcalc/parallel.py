"""Simulations of many records at once, in several processes (``vramcalc report``).

Each recipe (a plan less its batch, sequence, accumulation and allocator mode) is one task:
a worker traces it once and simulates its records; every answer lands in the disk caches
(``cache.py``). The tasks are handed out one at a time, the costliest first (``trace_cost``),
so that the workers end together. The caller then estimates the records in one pass that
reads them back: the same bytes as a serial run.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from vramcalc import progress
from vramcalc.catalog import resolve
from vramcalc.collector import tune
from vramcalc.errors import VramcalcError
from vramcalc.estimate import default_allocator_model, prepare
from vramcalc.measurements import plan_of
from vramcalc.memory.slack import cached_simulation
from vramcalc.memory.worldsim import cached_world_simulation, simulates_world
from vramcalc.speed.opprofile import profile_cached
from vramcalc.speed.throughput_fit import compare_records, excluded_reason
from vramcalc.trace.steptrace import config_layers
from vramcalc.trace.unroll import TRACED_LAYERS
from vramcalc.trace.worldtrace import ZERO


def default_workers() -> int:
    """``$VRAMCALC_WORKERS``, else one per CPU core up to 4 (each holds a model's trace)."""
    value = os.environ.get("VRAMCALC_WORKERS")
    if value and value.isdigit():
        return max(1, int(value))
    return max(1, min(os.cpu_count() or 1, 4))


def profile_pending(record: dict[str, Any]) -> bool:
    """Whether ``record`` is a speed case whose step's ops are not profiled in the cache yet."""
    try:
        plan = plan_of(record)
        config = resolve(plan.model).config_dict  # the config as read: no model is built
    except VramcalcError:
        return False
    return excluded_reason(record) is None and not profile_cached(config, plan)


def simulation_pending(record: dict[str, Any], allocator_model: str | None) -> bool:
    """Whether ``record``'s simulation under ``allocator_model`` is not in the cache yet."""
    if allocator_model == "approximate":
        return False
    try:
        plan = plan_of(record)
        config = resolve(plan.model).config_dict
    except VramcalcError:
        return False
    if plan.num_gpus > 1:
        return simulates_world(plan) and cached_world_simulation(config, plan) is None
    return cached_simulation(config, plan) is None


def trace_cost(record: dict[str, Any]) -> int:
    """A rough measure of what simulating ``record`` costs, to order the work: the decoder
    layers traced (all of them under ZeRO, whose traces are not unrolled; else at most
    ``unroll.TRACED_LAYERS``) times the micro-batches of a step, twice for ZeRO-3 (its
    gathers and releases around every module); 0 for what cannot be planned."""
    try:
        plan = plan_of(record)
        layers = config_layers(resolve(plan.model).config_dict)
    except VramcalcError:
        return 0
    traced = layers if plan.strategy in ZERO else min(layers, TRACED_LAYERS)
    return traced * plan.grad_accum * (2 if plan.strategy == "zero3" else 1)


def recipe_groups(records: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The training records grouped by recipe, largest group first."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record.get("kind") == "serve":
            continue
        try:
            plan = plan_of(record)
        except VramcalcError:
            continue
        sizes = ("batch_size", "seq_len", "grad_accum", "allocator")
        recipe = {k: v for k, v in plan.to_dict().items() if k not in sizes}
        groups.setdefault(repr(sorted(recipe.items())), []).append(record)
    return sorted(groups.values(), key=len, reverse=True)


def warm_caches(
    records: list[dict[str, Any]],
    allocator_model: str | None,
    workers: int | None = None,
    memory: bool = True,
) -> int:
    """Simulate ``records`` (with ``memory``) and profile their steps' ops in ``workers``
    processes, each recipe a task of its own, handed out costliest first (``trace_cost``)
    to whichever process is free; returns how many processes ran (0: not worth it, fewer
    than two recipes or one worker). With ``memory``, the recipes whose ops are not profiled
    yet are handed out first for their profiles alone (seconds each): a speed report that
    runs beside this one (the test suite's two gates) finds them in the cache."""
    workers = default_workers() if workers is None else workers
    if workers < 2:
        return 0
    model = allocator_model or default_allocator_model()
    groups = sorted(recipe_groups(records), key=lambda g: sum(map(trace_cost, g)), reverse=True)
    # each recipe's profile alone first, then its simulation: what is not in the caches yet
    tasks: list[tuple[list[dict[str, Any]], str | None]] = [
        (group, None) for group in groups if any(map(profile_pending, group))
    ]
    if memory:
        tasks += [
            (group, model)
            for group in groups
            if any(simulation_pending(record, model) for record in group)
        ]
    recipes = {id(group): group for group, _ in tasks}
    if len(recipes) < 2:
        return 0
    processes = min(workers, len(recipes))
    progress.note(
        f"{'simulating' if memory else 'profiling'} {len(recipes)} recipes of "
        f"{sum(map(len, recipes.values()))} records in {processes} processes"
    )
    context = multiprocessing.get_context("spawn")  # torch is not fork-safe
    with ProcessPoolExecutor(processes, mp_context=context, initializer=tune) as pool:
        list(pool.map(_warm, *zip(*tasks, strict=True)))
    return processes


def _warm(records: list[dict[str, Any]], allocator_model: str | None) -> None:
    """One worker: its records' simulations (``allocator_model`` None: none), then their ops."""
    for record in records if allocator_model is not None else ():
        try:
            plan = plan_of(record)
            prepare(plan.model, plan).estimate(plan, allocator_model)
        except Exception:  # noqa: BLE001 - the serial pass reports every failure itself
            continue
    try:
        compare_records(records)
    except Exception:  # noqa: BLE001 - as above
        return
