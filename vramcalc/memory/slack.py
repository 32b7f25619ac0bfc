"""The caching allocator's slack: a whole run replayed through the allocator model.

``simulate_run`` lays out what a harness run (and a user's Trainer run) does,
in order, as ``(op, handle, nbytes)`` events, and replays them through
``memory/allocator.py``, whose replay of recorded H200 traces gives torch's
peak reserved bytes exactly (``tests/test_allocator_traces.py``):

1. loading (transformers ``from_pretrained`` with a ``device_map``):
   ``caching_allocator_warmup`` allocates one tensor of the model's loaded size
   and frees it (bitsandbytes weights counted at 0.5 / 1 byte per parameter), so
   one cached segment takes the weights; parameters then arrive one by one in
   checkpoint key order, k-bit weights staged in the load dtype and quantized on
   the GPU (4-bit: packed data, fp32 absmax, with double quantization a uint8
   absmax and its second-level constants; int8: an fp16 copy, then int8 data and
   one fp32 scale per row);
2. ``prepare_model_for_kbit_training``: every non-quantized parameter gets an
   fp32 copy and loses its 16-bit original, then ``torch.cuda.empty_cache()``;
3. peft creates the adapters (fp32), then ``Trainer.train()`` empties the cache
   (``accelerator.free_memory()``);
4. the training steps, recorded from the real model code on fake tensors
   (``memory/steptrace.py``).

Sources: transformers ``modeling_utils.caching_allocator_warmup``,
``integrations/bitsandbytes.py``; peft ``utils/other.py``; accelerate
``utils/memory.py``; bitsandbytes ``functional.quantize_4bit`` /
``int8_vectorwise_quant``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from vramcalc.memory.allocator import (
    ALLOC,
    EMPTY_CACHE,
    FREE,
    AllocatorConfig,
    AllocatorResult,
    simulate,
)
from vramcalc.memory.weights import DYNAMIC_MAP_ENTRIES, NESTED_BLOCKSIZE, NF4_BLOCKSIZE
from vramcalc.trace.events import StepTrace
from vramcalc.training_plan import TrainingPlan

ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "uint8": 1, "int8": 1, "int64": 8}
LOAD_ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


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


#: what a loading allocation holds (``load_events``' labels)
LOAD_BUFFER, WEIGHTS, ADAPTERS = "loading buffer", "weights", "adapters"


class _Events:
    def __init__(self, labels: list[str] | None = None) -> None:
        self.events: list[tuple[int, int, int]] = []
        self._next = -1
        self.labels = labels  # per event, when kept: what an ALLOC holds ("" for the rest)

    def alloc(self, nbytes: int, what: str = LOAD_BUFFER) -> int:
        handle = self._next
        self._next -= 1
        self.events.append((ALLOC, handle, nbytes))
        if self.labels is not None:
            self.labels.append(what)
        return handle

    def free(self, handle: int) -> None:
        self.events.append((FREE, handle, 0))
        if self.labels is not None:
            self.labels.append("")

    def empty_cache(self) -> None:
        self.events.append((EMPTY_CACHE, 0, 0))
        if self.labels is not None:
            self.labels.append("")


def checkpoint_key(name: str) -> str:
    """peft's parameter name -> the base model's state-dict key."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


class QuantizedLoad(Protocol):
    """What loading needs of a plan (a ``TrainingPlan`` or a serving plan)."""

    quant: str
    dtype: str
    double_quant: bool


def _quantized_tensors(shape: tuple[int, ...], plan: QuantizedLoad, ev: _Events) -> None:
    """Allocate what bitsandbytes keeps for one quantized weight (staging freed)."""
    n = 1
    for d in shape:
        n *= d
    staging = ev.alloc(n * LOAD_ITEMSIZE[plan.dtype])
    if plan.quant == "int8":
        fp16 = ev.alloc(2 * n)
        ev.alloc(n, WEIGHTS)  # CB, int8
        ev.alloc(4 * shape[0], WEIGHTS)  # SCB, fp32 per output row
        ev.free(fp16)
    else:
        blocks = -(-n // NF4_BLOCKSIZE)
        ev.alloc((n + 1) // 2, WEIGHTS)  # packed
        absmax = ev.alloc(4 * blocks, WEIGHTS)  # fp32 absmax
        ev.alloc(16 * 4, WEIGHTS)  # the 4-bit code
        if plan.double_quant:
            ev.alloc(blocks, WEIGHTS)  # absmax quantized to uint8
            ev.alloc(4 * -(-blocks // NESTED_BLOCKSIZE), WEIGHTS)  # second-level absmax
            ev.alloc(4 * DYNAMIC_MAP_ENTRIES, WEIGHTS)  # dynamic map copy
            ev.alloc(4, WEIGHTS)  # offset
            ev.free(absmax)
    ev.free(staging)


def load_events(
    trace: StepTrace, plan: TrainingPlan, labels: list[str] | None = None
) -> list[tuple[int, int, int]]:
    """Events of loading, k-bit preparation and adapter creation, up to the first step;
    ``labels``, when given, receives what each ALLOC holds (``WEIGHTS``, ``ADAPTERS``,
    ``LOAD_BUFFER``; "" for the other events)."""
    ev = _Events(labels)
    base = [p for p in trace.params if "lora_" not in p[0]]
    adapters = [p for p in trace.params if "lora_" in p[0]]
    load_size = LOAD_ITEMSIZE[plan.dtype]
    loaded = _from_pretrained(ev, base, plan)
    if plan.is_kbit:
        for name, shape, dtype, _, kbit in base:
            if not kbit and name in loaded and ITEMSIZE[dtype] != load_size:
                upcast = ev.alloc(_numel(shape) * ITEMSIZE[dtype], WEIGHTS)
                ev.free(loaded[name])
                loaded[name] = upcast
        ev.empty_cache()
    for _, shape, dtype, _, _ in adapters:
        ev.alloc(_numel(shape) * ITEMSIZE[dtype], ADAPTERS)
    ev.empty_cache()
    return ev.events


def from_pretrained_events(
    params: Iterable[tuple[str, tuple[int, ...], str, bool, bool]],
    plan: QuantizedLoad,
    labels: list[str] | None = None,
) -> tuple[list[tuple[int, int, int]], dict[str, int]]:
    """Events of ``from_pretrained`` alone (the warm-up segment, then each parameter in
    checkpoint key order, k-bit weights quantized on the GPU), as a serving process loads
    its base; and the handle of each non-quantized parameter's allocation, by name."""
    ev = _Events(labels)
    loaded = _from_pretrained(ev, list(params), plan)
    return ev.events, loaded


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _from_pretrained(
    ev: _Events, base: list[tuple[str, tuple[int, ...], str, bool, bool]], plan: QuantizedLoad
) -> dict[str, int]:
    """``caching_allocator_warmup``'s segment, then every parameter in checkpoint key order;
    returns the handles of the non-quantized ones."""
    load_size = LOAD_ITEMSIZE[plan.dtype]
    warmup = 0
    for _, shape, _, _, kbit in base:
        per = (1 if plan.quant == "int8" else 0.5) if kbit else load_size
        warmup += int(_numel(shape) * per)
    ev.free(ev.alloc(warmup // 2 * 2))  # torch.empty(byte_count // 2, dtype=float16)
    loaded: dict[str, int] = {}
    for name, shape, _, _, kbit in sorted(base, key=lambda p: checkpoint_key(p[0])):
        if kbit:
            _quantized_tensors(shape, plan, ev)
        else:
            loaded[name] = ev.alloc(_numel(shape) * load_size, WEIGHTS)
    return loaded


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


# -- one plan, cached ------------------------------------------------------------------------
#: bump when the trace or the load layout changes what a simulation returns
SIMULATION_VERSION = 10
#: optimizer steps simulated: the first creates the optimizer states; segments stop growing
#: by the second or third (every traced H200 run: peaks reached within three steps)
SIMULATED_STEPS = 3
ALLOCATOR_MODES = ("default", "expandable")


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

    def slack_bytes(self, allocator: str) -> int:
        return self.peak_reserved_bytes[allocator] - self.peak_allocated_bytes[allocator]

    def with_mode(self, allocator: str, allocated: int, reserved: int) -> AllocatorSimulation:
        """This simulation with ``allocator``'s peaks added (or replaced)."""
        return AllocatorSimulation(
            {**self.peak_allocated_bytes, allocator: allocated},
            {**self.peak_reserved_bytes, allocator: reserved},
            self.trace_seconds,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "trace_seconds": self.trace_seconds,
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
    started = time.perf_counter()
    trace = plan_steps(config_dict, plan, SIMULATED_STEPS)
    from vramcalc import progress

    progress.note(
        f"replaying loading and {SIMULATED_STEPS} steps through the caching-allocator model "
        f"(batch {plan.batch_size} x {plan.seq_len}, rank {plan.adapter_rank})"
    )
    run = simulate_run(trace, plan, _config(plan))
    result = (known or AllocatorSimulation({}, {}, 0.0)).with_mode(
        plan.allocator, run.result.peak_allocated_bytes, run.result.peak_reserved_bytes
    )
    result = replace(result, trace_seconds=time.perf_counter() - started)
    if use_cache:
        write_simulation(simulation_path(simulation_key(config_dict, plan)), result)
    return result
