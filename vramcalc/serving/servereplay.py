"""One serving plan simulated: traced, made whole (``servesim``), replayed, cached.

``simulate_serving`` returns a ``ServeSimulation``: peak allocated and reserved bytes of
the run the harness measures (``from_pretrained``, the adapters by mode, one warm-up and
three timed rounds of a prefill-only and a full ``generate``), the phase of each peak and
the peaks per phase. The entry is cached on disk (``cache.py``, kind ``serving``), keyed by
the model's config, the plan and the library versions.

A merged plan of N adapters holds N copies of the base; the harness measures one of them
decoding its share of the batch (``vramcalc_harness/serve_case.py``, ``serve_limits``).
The simulation is that run with the other copies made first in the same process, each as
the harness makes its one (``from_pretrained`` without the dynamic map bitsandbytes makes
once per process, the adapter, the merge; the cuBLAS workspace shared), and idle while
the measured copy decodes (``_with_other_copies``).

The run is held compactly (``compact_run``: each generate's decoding steps one piece) and
replayed with the allocator's two pools apart (``phasereplay.replay_run``, ``splitreplay``):
the peaks of ``replay`` of the laid-out run (``whole_run``), to the byte, in a fraction of
the time.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from operator import itemgetter
from typing import Any

from vramcalc import progress
from vramcalc.cache import cache_dir
from vramcalc.inventory import library_versions
from vramcalc.memory.allocator import ALLOC, FREE
from vramcalc.memory.loading import from_pretrained_events
from vramcalc.serve_plan import ServePlan
from vramcalc.serving.compactrun import DecodeSteps, Run
from vramcalc.serving.phasereplay import PHASES as PHASES  # (both were defined here)
from vramcalc.serving.phasereplay import replay as replay
from vramcalc.serving.phasereplay import replay_run
from vramcalc.serving.servesim import ServeSimulationError, expand_steps, repeat_last_round
from vramcalc.serving.servetrace import TIMED_ROUNDS, TRACED_STEPS, WARMUP_ROUNDS, trace_serving
from vramcalc.trace import unroll as unrolling
from vramcalc.trace.steptrace import config_layers

Event = tuple[int, int, int]

#: bump when the trace, its expansion or the replay changes what a simulation returns
#: (2: a parameter a merge replaces is freed, 4-bit bases and merged copies simulated;
#: 3: an unrolled model's parameters loaded layer by layer, as the model lists them;
#: 4: merges onto int8 weights and int8 DoRA's dequantization, serving/eightbit.py; 5:
#: the cuBLAS workspace after its first matmul's output)
SERVING_SIMULATION_VERSION = 5


@dataclass(frozen=True)
class ServeSimulation:
    """The allocator's view of a serving run of one model copy."""

    peak_allocated_bytes: int
    peak_reserved_bytes: int
    allocated_peak_phase: str  # where peak allocated was first reached
    reserved_peak_phase: str
    phase_allocated_bytes: dict[str, int]  # phasereplay.PHASES -> peak allocated within it
    phase_reserved_bytes: dict[str, int]
    loaded_allocated_bytes: int  # allocated once the adapters are ready (before the inputs)
    events: int
    trace_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def whole_run(
    config_dict: dict[str, Any],
    plan: ServePlan,
    traced_layers: int | None = None,
    traced_steps: int | None = None,
    traced_timed_rounds: int = 2,
) -> tuple[list[tuple[int, int, int]], list[tuple[str, int]], int]:
    """The plan's whole run as events (loading first), its markers (indices after the
    loading events) and the number of loading events. What is traced: ``traced_layers``
    decoder layers (default ``unroll.TRACED_LAYERS``), each full generate's first
    ``traced_steps`` loop steps (default ``servetrace.TRACED_STEPS``) and
    ``traced_timed_rounds`` timed rounds (at least 2 when there are more); the rest is
    expanded (module docstring of ``servesim``). Tracing everything gives the same run."""
    run, loading = compact_run(config_dict, plan, traced_layers, traced_steps, traced_timed_rounds)
    return run.events(), run.markers, loading


def compact_run(
    config_dict: dict[str, Any],
    plan: ServePlan,
    traced_layers: int | None = None,
    traced_steps: int | None = None,
    traced_timed_rounds: int = 2,
) -> tuple[Run, int]:
    """``whole_run`` held as pieces (``compactrun``): the run (loading first; its markers
    indices after the loading events, as ``whole_run``'s) and the number of loading
    events. ``Run.events()`` is ``whole_run``'s list."""
    layers = config_layers(config_dict)
    traced_layers = min(layers, traced_layers or unrolling.TRACED_LAYERS)
    rounds = (WARMUP_ROUNDS, min(TIMED_ROUNDS, max(traced_timed_rounds, 2)))
    trace = trace_serving(
        config_dict,
        plan,
        rounds=rounds,
        traced_steps=traced_steps or TRACED_STEPS,
        num_layers=traced_layers,
    )
    events, tags, markers = trace.events, trace.tags, trace.markers
    if layers > traced_layers:  # layers first: the traced run is the short one
        out_tags: list[int] = []
        positions: list[int] = []
        events = unrolling.unroll(events, tags, layers, out_tags, positions)
        markers = tuple((m, positions[i]) for m, i in markers)
        tags = tuple(out_tags)
    stand_ins = dict(markers)["loaded"]
    stand_in_tags = list(tags[:stand_ins])
    run, outputs = expand_steps(events, tags, markers, trace.generates)
    run = repeat_last_round(run, WARMUP_ROUNDS + TIMED_ROUNDS, outputs)
    params = _full_params(trace, layers)

    def loaded(first: bool) -> tuple[list[Event], Run]:
        """One copy's loading, and the run with the stand-ins made its handles."""
        loading, handles = from_pretrained_events(params, plan, first_in_process=first)
        body = _with_loading_handles(run, stand_in_tags, stand_ins, trace, layers, handles)
        return loading, body

    loading, body = loaded(first=True)

    def copy_made(copy: int) -> tuple[list[Event], list[tuple[str, int]]]:
        """Copy ``copy``'s loading, adapters and merge (handles as the first copy's)."""
        again, made = loaded(first=False)
        ready = dict(made.markers)["inputs"]
        return again + made.events_before(ready), [
            (f"copy{copy}.{m}", len(again) + i) for m, i in made.markers if i < ready
        ]

    if plan.model_copies > 1:
        span = 1 + max(
            max((abs(h) for _, h, _ in loading), default=0),
            max((abs(h) for _, (_, h, _) in body.literal_events()), default=0),
            max((p.top for p in body.pieces_of_steps()), default=0),
        )
        body = _with_other_copies(body, plan.model_copies, copy_made, trace, span)
    whole = Run()
    whole.extend([list(loading)])
    whole.extend(body.pieces)
    whole.markers = body.markers
    return whole, len(loading)


def _with_other_copies(
    body: Run,
    copies: int,
    copy_made: Callable[[int], tuple[list[Event], list[tuple[str, int]]]],
    trace: Any,
    span: int,
) -> Run:
    """The run of ``copies`` merged copies of the base in one process: before the inputs,
    copies 2.. loaded, given their adapter and merged as the first one was
    (``copy_made(k)``: its events and markers, handles as the first copy's, below ``span``
    in size: copy k's moved ``(k - 1) * span`` away), the cuBLAS workspace the first
    copy's merge made shared by all; then the first copy's generate rounds."""
    marks = body.markers
    ready = dict(marks)["inputs"]
    first = body.events_before(ready)
    made_at = {h: i for i, (op, h, _) in enumerate(first) if op == ALLOC}
    later = itertools.chain(
        (event for _, event in body.literal_events(ready)),
        ((FREE, h, 0) for p in body.pieces_of_steps() for hs in p.traced_allocs.values()
         for h in hs),
    )  # fmt: skip
    for op, handle, _ in later:
        if op == FREE and handle in made_at:
            raise ServeSimulationError(
                "a merged copy frees after the inputs what was made with it (loaded, "
                "adapters, merge): its other copies would keep it"
            )
    workspaces = set(trace.workspaces)
    block: list[tuple[int, int, int]] = []
    block_marks: list[tuple[str, int]] = []
    for copy in range(2, copies + 1):
        events, markers = copy_made(copy)
        shift = (copy - 1) * span
        block_marks.append((f"copy{copy}", len(block)))
        position = []  # a copy's event -> its index in the block
        for op, handle, nbytes in events:
            position.append(len(block))
            if op == ALLOC and handle in workspaces:
                continue
            moved = handle + shift if handle > 0 else handle - shift if handle < 0 else 0
            block.append((op, moved, nbytes))
        position.append(len(block))
        block_marks.extend((m, position[i]) for m, i in markers)
    out = Run()
    out.extend([first, block])
    out.extend(body.slice(ready))
    out.markers = [(m, i) for m, i in marks if i < ready]
    out.markers += [(m, ready + i) for m, i in block_marks]
    out.markers += [(m, i + len(block)) for m, i in marks if i >= ready]
    return out


def _full_params(trace: Any, layers: int) -> list[tuple[str, tuple[int, ...], str, bool, bool]]:
    """The loaded parameters of the ``layers``-layer model (names renumbered)."""
    if layers <= trace.num_layers:
        return list(trace.params)
    return list(unrolling.unroll_params(trace.params, trace.param_layers, layers))


def _with_loading_handles(
    run: Run,
    tags: list[int],
    cut: int,
    trace: Any,
    layers: int,
    handles: dict[str, tuple[int, ...]],
) -> Run:
    """The run without the recorder's stand-ins for loaded parameters (its first ``cut``
    events, ``tags`` their layers), each FREE of one made the FREEs of what its loading
    keeps (a k-bit weight: its data and quantization state); and its markers moved along.
    A ``DecodeSteps`` piece frees loop steps' tensors only: no stand-in (else laid out)."""
    by_tag: dict[int, list[str]] = {}
    for name in trace.loaded.values():
        by_tag.setdefault(trace.param_layers[trace.param_index[name]], []).append(name)
    traced = trace.num_layers
    source = {0: 0, 1: 1, layers - 2: traced - 2, layers - 1: traced - 1} if layers > traced else {}
    seen: dict[int, int] = {}
    stand_in: dict[int, tuple[int, ...]] = {}
    for k, (op, handle, _) in enumerate(run.events_before(cut)):
        if op != ALLOC:
            continue
        layer = tags[k]
        tag = layer if layer < 0 or not source else source.get(layer, unrolling.TEMPLATE)
        names = by_tag[tag]
        name = names[seen.get(layer, 0)]
        seen[layer] = seen.get(layer, 0) + 1
        if layer >= 0 and layer != tag:
            name = name.replace(f".{tag}.", f".{layer}.", 1)
        stand_in[handle] = handles[name]
    out = Run()
    extra_at: list[int] = []  # where (from ``cut``) a FREE of a stand-in became more FREEs
    extra: list[int] = []  # the events added up to and with it
    for piece in run.slice(cut):
        if isinstance(piece, DecodeSteps):
            if stand_in.keys().isdisjoint(h for hs in piece.traced_allocs.values() for h in hs):
                out.extend([piece])
                continue
            piece = piece.events()
        if stand_in.keys().isdisjoint(map(itemgetter(1), piece)):  # at C speed
            out.extend([piece])
            continue
        events: list[Event] = []
        for op, handle, nbytes in piece:
            kept = stand_in.get(handle) if op == FREE else None
            if kept is None:
                events.append((op, handle, nbytes))
                continue
            extra_at.append(len(out) + len(events) - (extra[-1] if extra else 0))
            events.extend((FREE, h, 0) for h in kept)
            extra.append((extra[-1] if extra else 0) + len(kept) - 1)
        out.extend([events])

    def moved(k: int) -> int:
        before = bisect.bisect_left(extra_at, k)
        return k + (extra[before - 1] if before else 0)

    out.markers = [(m, moved(max(i - cut, 0))) for m, i in run.markers]
    return out


# -- one plan, cached ------------------------------------------------------------------------
def serving_key(config_dict: dict[str, Any], plan: ServePlan) -> str:
    """What changes a serving simulation, hashed."""
    plan_fields = plan.to_dict()
    for adapter in plan_fields["adapters"]:
        adapter.pop("path", None)
        adapter.pop("base_model", None)
    payload = {
        "v": SERVING_SIMULATION_VERSION,
        "config": config_dict,
        "plan": plan_fields,
        "libs": library_versions(),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@functools.lru_cache(maxsize=64)
def _memo(key: str) -> ServeSimulation | None:
    path = cache_dir("serving") / f"{key}.json"
    try:
        return ServeSimulation(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def simulate_serving(
    config_dict: dict[str, Any], plan: ServePlan, use_cache: bool = True
) -> ServeSimulation:
    """The plan's serving run, simulated (module docstring); cached on disk."""
    key = serving_key(config_dict, plan)
    if use_cache:
        known = _memo(key)
        if known is not None:
            return known
    progress.note(
        f"tracing generate on fake tensors and replaying it through the caching-allocator "
        f"model (batch {plan.batch} x {plan.prompt_tokens} + {plan.new_tokens} tokens, "
        f"{plan.mode} adapters)"
    )
    started = time.perf_counter()
    run, loading = compact_run(config_dict, plan)
    observed = replay_run(run, loading)
    result = ServeSimulation(
        **observed, events=len(run), trace_seconds=time.perf_counter() - started
    )
    if use_cache:
        folder = cache_dir("serving")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"{key}.tmp{os.getpid()}"
            tmp.write_text(json.dumps(result.to_dict()))
            tmp.replace(folder / f"{key}.json")
            _memo.cache_clear()
        except OSError:
            pass  # a read-only cache only costs time
    return result
