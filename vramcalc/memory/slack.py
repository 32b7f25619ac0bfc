"""The caching allocator's slack: a whole run replayed through the allocator model.

``simulate_run`` lays out what a harness run (and a user's Trainer run) does,
in order, as ``(op, handle, nbytes)`` events, and replays them through
``memory/allocator.py``, whose replay of recorded H200 traces gives torch's
peak reserved bytes exactly (``tests/test_allocator_traces.py``):

1. loading (transformers ``from_pretrained`` with a ``device_map``,
   ``memory/loading.py``): ``caching_allocator_warmup``'s segment, then the
   parameters one by one in checkpoint key order, k-bit weights quantized on the GPU;
2. ``prepare_model_for_kbit_training``: every non-quantized parameter gets an
   fp32 copy and loses its 16-bit original, then ``torch.cuda.empty_cache()``;
3. peft creates the adapters (fp32), then ``Trainer.train()`` empties the cache
   (``accelerator.free_memory()``);
4. the training steps, recorded from the real model code on fake tensors
   (``memory/steptrace.py``).

Sources: peft ``utils/other.py``; accelerate ``utils/memory.py``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vramcalc.memory.allocator import (
    AllocatorConfig,
    AllocatorResult,
    simulate,
)
from vramcalc.memory.loading import (
    ITEMSIZE,
    LOAD_ITEMSIZE,
    LoadEvents,
    from_pretrained_layout,
    numel,
)
from vramcalc.memory.provenance import (
    ADAPTERS,
    WEIGHTS,
    live_at_peak,
    provenance,
    run_phases,
)
from vramcalc.trace.events import StepTrace
from vramcalc.training_plan import TrainingPlan


@dataclass(frozen=True)
class RunSimulation:
    """The allocator's view of a whole run: peaks and how it got there."""

    result: AllocatorResult
    load_events: int
    step_events: int

    @property
    def slack_bytes(self) -> int:
        """Reserved beyond allocated at the reserved peak (over load and steps)."""
        return self.result.peak_reserved_bytes - self.result.peak_allocated_bytes


def load_events(
    trace: StepTrace, plan: TrainingPlan, labels: list[str] | None = None
) -> list[tuple[int, int, int]]:
    """Events of loading, k-bit preparation and adapter creation, up to the first step;
    ``labels``, when given, receives what each ALLOC holds (``WEIGHTS``, ``ADAPTERS``,
    ``LOAD_BUFFER``; "" for the other events)."""
    ev = LoadEvents(labels)
    base = [p for p in trace.params if "lora_" not in p[0]]
    adapters = [p for p in trace.params if "lora_" in p[0]]
    load_size = LOAD_ITEMSIZE[plan.dtype]
    loaded = from_pretrained_layout(ev, base, plan)
    if plan.is_kbit:
        for name, shape, dtype, _, kbit in base:
            if not kbit and name in loaded and ITEMSIZE[dtype] != load_size:
                upcast = ev.alloc(numel(shape) * ITEMSIZE[dtype], WEIGHTS)
                ev.free(loaded[name][0])
                loaded[name] = (upcast,)
        ev.empty_cache()
    for _, shape, dtype, _, _ in adapters:
        ev.alloc(numel(shape) * ITEMSIZE[dtype], ADAPTERS)
    ev.empty_cache()
    return ev.events


def simulate_run(
    trace: StepTrace, plan: TrainingPlan, config: AllocatorConfig | None = None
) -> RunSimulation:
    """Replay loading and the traced steps through the allocator model."""
    loading = load_events(trace, plan)
    result = simulate(_chain(loading, trace.events), config or _config(plan))
    return RunSimulation(result, len(loading), len(trace.events))


def _config(plan: TrainingPlan) -> AllocatorConfig:
    return AllocatorConfig(expandable_segments=plan.allocator == "expandable")


def _chain(*parts: Iterable[tuple[int, int, int]]) -> Iterable[tuple[int, int, int]]:
    for part in parts:
        yield from part


def peak_account(
    trace: StepTrace, plan: TrainingPlan, config_dict: dict, peak_allocated_bytes: int
) -> tuple[str, dict[str, int]]:
    """What is alive at the run's allocated peak, by category, and the phase it falls in
    (``trace`` labelled: its markers and layer tags tell the phases and what each
    allocation holds)."""
    labels: list[str] = []
    loading = load_events(trace, plan, labels)
    events = (*loading, *trace.events)
    phases = run_phases(len(loading), len(events), trace.markers)
    holds = provenance(events, len(loading), labels, trace.tags, phases, plan,
                       vocab_size(config_dict), trace.num_layers)  # fmt: skip
    return live_at_peak(events, _config(plan), holds, phases, peak_allocated_bytes)


def vocab_size(config_dict: dict) -> int | None:
    """The vocabulary of a ``config.json`` (a multimodal one's ``text_config``), if it says."""
    for config in (config_dict, config_dict.get("text_config") or {}):
        if isinstance(config, dict) and isinstance(config.get("vocab_size"), int):
            return int(config["vocab_size"])
    return None


# -- one plan, cached ------------------------------------------------------------------------
#: bump when the trace or the load layout changes what a simulation returns
#: (12: an unrolled model's parameters loaded layer by layer, as the model lists them;
#: 13: the cuBLAS workspace after its first matmul's output; 14: MatMul8bitLt frees its int32
#: result after its conversion to A's dtype)
SIMULATION_VERSION = 14
#: optimizer steps simulated: the first creates the optimizer states; segments stop growing
#: by the second or third (every traced H200 run: peaks reached within three steps)
SIMULATED_STEPS = 3
ALLOCATOR_MODES = ("default", "expandable")
#: micro-batches of a step simulated: the later ones allocate and free as these do, and the
#: allocator's state repeats with them (the peaks of 2 to 40 micro-batches are equal, byte
#: for byte): a plan of more is simulated with this many (its run would be as long)
MAX_SIMULATED_MICRO_BATCHES = 8


def simulated_plan(plan: TrainingPlan) -> TrainingPlan:
    """The plan whose run is simulated for ``plan``: at most ``MAX_SIMULATED_MICRO_BATCHES``
    micro-batches per step."""
    if plan.grad_accum <= MAX_SIMULATED_MICRO_BATCHES:
        return plan
    return plan.with_(grad_accum=MAX_SIMULATED_MICRO_BATCHES)


@dataclass(frozen=True)
class AllocatorSimulation:
    """Peaks of a plan's whole run under each allocator mode, from one step trace.

    Both peaks are per mode: torch counts a block's whole size as allocated, and a block
    left unsplit (a remainder too small to keep) is larger in one mode than the other, so
    ``max_memory_allocated`` differs between modes by up to a few blocks (H200 records of one
    plan in both modes: 11,786,248,704 vs 11,707,081,216 B)."""

    peak_allocated_bytes: dict[str, int]  # allocator mode -> bytes
    peak_reserved_bytes: dict[str, int]  # allocator mode -> bytes
    trace_seconds: float
    # per mode, what is alive at the allocated peak: bytes by category
    # (``memory/provenance.py``), summing to that mode's peak_allocated_bytes, and the phase
    # of the run it falls in ("step 2 backward"); no entry where a run was not observed
    # category by category (the world simulation)
    peak_categories: dict[str, dict[str, int]] = field(default_factory=dict)
    peak_phase: dict[str, str] = field(default_factory=dict)

    def slack_bytes(self, allocator: str) -> int:
        return self.peak_reserved_bytes[allocator] - self.peak_allocated_bytes[allocator]

    def with_mode(
        self,
        allocator: str,
        allocated: int,
        reserved: int,
        categories: dict[str, int] | None = None,
        phase: str = "",
    ) -> AllocatorSimulation:
        """This simulation with ``allocator``'s peaks (and what is alive at the allocated
        one) added or replaced."""
        return AllocatorSimulation(
            {**self.peak_allocated_bytes, allocator: allocated},
            {**self.peak_reserved_bytes, allocator: reserved},
            self.trace_seconds,
            {**self.peak_categories, **({allocator: categories} if categories else {})},
            {**self.peak_phase, **({allocator: phase} if phase else {})},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "trace_seconds": self.trace_seconds,
            "peak_categories": self.peak_categories,
            "peak_phase": self.peak_phase,
        }


def read_simulation(path: Path) -> AllocatorSimulation | None:
    """A cached simulation (``AllocatorSimulation.to_json``), or None where it is missing or
    unreadable (a cache entry of another version is never read: the version is in its key)."""
    try:
        raw = json.loads(path.read_text())
        return AllocatorSimulation(
            {k: int(v) for k, v in raw["peak_allocated_bytes"].items()},
            {k: int(v) for k, v in raw["peak_reserved_bytes"].items()},
            float(raw["trace_seconds"]),
            {m: {k: int(v) for k, v in c.items()} for m, c in raw["peak_categories"].items()},
            {m: str(p) for m, p in raw["peak_phase"].items()},
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_simulation(path: Path, simulation: AllocatorSimulation) -> None:
    """Store ``simulation`` at ``path`` atomically; a read-only cache only costs time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(simulation.to_json()))
        tmp.replace(path)
        _LISTINGS.pop(str(path.parent), None)
    except OSError:
        pass


_CONFIG_JSON: dict[int, tuple[dict, str]] = {}  # id -> (the config, kept alive; its JSON)


def _config_json(config_dict: dict) -> str:
    """``config_dict`` as sorted JSON, once per config object (a sweep's rows share one)."""
    import json

    held = _CONFIG_JSON.get(id(config_dict))
    if held is None or held[0] is not config_dict:
        held = (config_dict, json.dumps(config_dict, sort_keys=True, default=str))
        _CONFIG_JSON[id(config_dict)] = held
    return held[1]


def simulation_key(config_dict: dict, plan: TrainingPlan) -> str:
    """What changes a single-GPU step trace, hashed (the allocator mode is simulated apart).

    The hash of ``json.dumps({"v", "config", "plan", "libs"}, sort_keys=True)``, written out
    part by part so that a long sweep serializes each config once."""
    import hashlib
    import json
    from dataclasses import fields as dataclass_fields

    from vramcalc.inventory import library_versions

    # a shallow copy (plan.to_dict deep-copies: a third of a cached sweep row); tuples
    # serialize as the lists to_dict makes of them, so the key is the same
    skip = ("num_gpus", "strategy", "cpu_offload", "allocator")
    plan = simulated_plan(plan)
    fields = {f.name: getattr(plan, f.name) for f in dataclass_fields(plan) if f.name not in skip}
    dumps = functools.partial(json.dumps, sort_keys=True, default=str)
    payload = (
        f'{{"config": {_config_json(config_dict)}, "libs": {dumps(library_versions())}, '
        f'"plan": {dumps(fields)}, "v": {dumps(SIMULATION_VERSION)}}}'
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=8)
def _allocator_folder(cache_root: str | None, xdg: str | None) -> str:
    from vramcalc.cache import cache_dir

    return str(cache_dir("allocator"))


def simulation_path(key: str):  # type: ignore[no-untyped-def]
    import os
    from pathlib import Path

    folder = _allocator_folder(
        os.environ.get("VRAMCALC_CACHE_DIR"), os.environ.get("XDG_CACHE_HOME")
    )
    return Path(folder, f"{key}.json")


_LISTINGS: dict[str, tuple[float, frozenset[str]]] = {}


def _cached_names(folder: str) -> frozenset[str]:
    """The file names in ``folder``, listed again only when it changed (its mtime): a long
    sweep asks for a thousand simulations that mostly are not there."""
    import os

    try:
        mtime = os.stat(folder).st_mtime
    except OSError:
        return frozenset()
    listed = _LISTINGS.get(folder)
    if listed is None or listed[0] != mtime:
        listed = (mtime, frozenset(os.listdir(folder)))
        _LISTINGS[folder] = listed
    return listed[1]


def cached_simulation(config_dict: dict, plan: TrainingPlan) -> AllocatorSimulation | None:
    """The cached simulation of ``plan`` under its allocator mode, or None (no torch
    import); the entry holds each mode simulated so far."""
    hit = _read_cached(config_dict, plan)
    return hit if hit is not None and plan.allocator in hit.peak_reserved_bytes else None


def _read_cached(config_dict: dict, plan: TrainingPlan) -> AllocatorSimulation | None:
    path = simulation_path(simulation_key(config_dict, plan))
    if path.name not in _cached_names(str(path.parent)):
        return None
    return read_simulation(path)


def simulate_plan(
    config_dict: dict, plan: TrainingPlan, use_cache: bool = True
) -> AllocatorSimulation:
    """The plan's run replayed through the allocator model in the plan's allocator mode (its
    recipe traced once, the run instantiated and unrolled, a fraction of a second); cached on
    disk, one entry per plan holding each mode replayed so far."""
    import time

    from vramcalc.trace.recipe import plan_steps

    known = _read_cached(config_dict, plan) if use_cache else None
    if known is not None and plan.allocator in known.peak_reserved_bytes:
        return known
    plan = simulated_plan(plan)
    started = time.perf_counter()
    trace = plan_steps(config_dict, plan, SIMULATED_STEPS, labelled=True)
    from vramcalc import progress

    progress.note(
        f"replaying loading and {SIMULATED_STEPS} steps through the caching-allocator model "
        f"(batch {plan.batch_size} x {plan.seq_len}, rank {plan.adapter_rank})"
    )
    run = simulate_run(trace, plan, _config(plan))
    phase, categories = peak_account(trace, plan, config_dict, run.result.peak_allocated_bytes)
    result = (known or AllocatorSimulation({}, {}, 0.0)).with_mode(
        plan.allocator,
        run.result.peak_allocated_bytes,
        run.result.peak_reserved_bytes,
        categories,
        phase,
    )
    result = replace(result, trace_seconds=time.perf_counter() - started)
    if use_cache:
        write_simulation(simulation_path(simulation_key(config_dict, plan)), result)
    return result
