"""A world trace of 5 decoder layers, unrolled, is the trace of every layer (trace/worldunroll.py,
trace/worldrepeat.py).

Tiny Llama (tests/conftest.py) with 7 layers: rank 0 of 2 traced with ``unroll`` (5 layers;
under FSDP 2 steps, the second repeated) must equal the direct trace of all 7 layers and 3
steps event for event -- the same allocations and frees in the same order with the same
bytes, each on the same stream and made by the same op, the same phase markers, host
waits and cross-stream blocks -- and replay to the same peaks. The unrolled path must be
the one taken: ``_trace`` is never asked for all layers.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import TINY_LLAMA
from vramcalc.memory.allocator import ALLOC, FREE, AllocatorConfig
from vramcalc.memory.worldreplay import replay
from vramcalc.trace import worldtrace
from vramcalc.trace.events import UnrollError, WorldTrace
from vramcalc.trace.worldrepeat import repeat_world_step
from vramcalc.training_plan import TrainingPlan

CONFIG = {**TINY_LLAMA, "num_hidden_layers": 7}
VARIANTS: dict[str, dict[str, Any]] = {
    "fsdp-lora": {"method": "lora", "strategy": "fsdp"},
    "ddp-lora": {"method": "lora", "strategy": "ddp"},
    "fsdp-qlora": {"method": "qlora", "strategy": "fsdp"},
    "fsdp-full": {"method": "full", "strategy": "fsdp"},
    "grad-op-lora": {"method": "lora", "strategy": "fsdp-grad-op"},
    "grad-op-full": {"method": "full", "strategy": "fsdp-grad-op"},
    "offload-lora": {"method": "lora", "strategy": "fsdp", "cpu_offload": True},
    "offload-full": {"method": "full", "strategy": "fsdp", "cpu_offload": True},
    "ddp-full": {"method": "full", "strategy": "ddp"},
    "fsdp-lora-no-ckpt": {"method": "lora", "strategy": "fsdp", "gradient_checkpointing": False},
    "fsdp-lora-ga2": {"method": "lora", "strategy": "fsdp", "grad_accum": 2},
}
FAST = ("fsdp-lora", "ddp-lora")


def _plan(variant: str) -> TrainingPlan:
    fields = dict(model="tiny", seq_len=16, batch_size=2, num_gpus=2, gradient_checkpointing=True)
    return TrainingPlan(**{**fields, **VARIANTS[variant]})


def _numbered(trace: WorldTrace) -> list[tuple[int, int, int]]:
    """Events with handles renumbered in allocation order (the unrolled copies take new
    numbers; which tensor each free releases is what counts)."""
    names: dict[int, int] = {}
    out = []
    for op, handle, nbytes in trace.events:
        if op == ALLOC:
            names[handle] = len(names)
        out.append((op, names.get(handle, -handle - 1), nbytes))
    return out


def _cross_stream(trace: WorldTrace) -> set[int]:
    """Indices of the allocations whose blocks are used on another stream."""
    return {
        i
        for i, (op, handle, _) in enumerate(trace.events)
        if op == ALLOC and handle in trace.cross_stream
    }


@pytest.mark.parametrize(
    "variant",
    [v if v in FAST else pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS],
)
def test_unrolled_world_trace_is_the_trace_of_every_layer(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(variant)
    full = worldtrace.trace_world(CONFIG, plan, unroll=False)
    traced: list[tuple[int, int | None]] = []  # (steps, layers) of each trace run
    run = worldtrace._trace

    def spy(config: Any, plan: TrainingPlan, steps: int, layers: Any, total: Any) -> Any:
        traced.append((steps, layers))
        return run(config, plan, steps, layers, total)

    monkeypatch.setattr(worldtrace, "_trace", spy)
    fast = worldtrace.trace_world(CONFIG, plan)
    assert traced and all(layers == 5 for _, layers in traced)  # never all 7 layers
    if plan.strategy in worldtrace.SHARDED and not plan.cpu_offload and plan.grad_accum == 1:
        assert traced == [(2, 5)]  # two steps traced, the second repeated
    assert fast.num_layers == full.num_layers == 7
    assert len(fast.events) == len(full.events)
    assert _numbered(fast) == _numbered(full)
    assert fast.streams == full.streams
    assert fast.labels == full.labels
    assert fast.markers == full.markers
    assert fast.sync_points == full.sync_points
    assert _cross_stream(fast) == _cross_stream(full)
    expandable = AllocatorConfig(expandable_segments=True)
    for config, gpu_bound in ((AllocatorConfig(), False), (expandable, False), (None, True)):
        want, got = (
            replay(full, config, gpu_bound=gpu_bound),
            replay(fast, config, gpu_bound=gpu_bound),
        )
        assert (got.peak_allocated_bytes, got.peak_reserved_bytes) == (
            want.peak_allocated_bytes,
            want.peak_reserved_bytes,
        )


def test_repeat_world_step_needs_exactly_two_traced_steps() -> None:
    events = ((ALLOC, 1, 512), (ALLOC, 2, 512))
    three = WorldTrace(
        events, (0, 0), (("step0", 0), ("step1", 1), ("step2", 2), ("end", 2)), (), 1, "test"
    )
    with pytest.raises(UnrollError):
        repeat_world_step(three, 1)
    after = WorldTrace(events, (0, 0), (("step0", 0), ("step1", 1), ("end", 1)), (), 1, "test")
    with pytest.raises(UnrollError):  # events after the last step
        repeat_world_step(after, 1)


def test_a_wait_on_what_only_the_first_step_did_waits_after_the_twin_before_it() -> None:
    """ZeRO-3's first backward gathers at its end what the second step's prefetch gathered
    earlier: an event of step 0 with no twin in step 1. A host wait of step 1 on the point
    after it waits, in each copy, just after the twin of the event before it (the third
    step of a 1B ZeRO-3 LoRA trace repeated this way is the traced third, event for event)."""
    events = (
        (ALLOC, 1, 512),  # step 0; its twin is event 3
        (ALLOC, 2, 256),  # step 0 alone (another stream)
        (FREE, 1, 512),  # twin: event 4
        (ALLOC, 3, 512),  # step 1
        (FREE, 3, 512),
    )
    markers = (("step0", 0), ("step1", 3), ("end", 5))
    # after step 1's first event, a wait on the point after step 0's event 1
    trace = WorldTrace(events, (0, 1, 0, 0, 0), markers, ((4, 2),), 1, "test")
    repeated = repeat_world_step(trace, 2)
    assert [(op, nbytes) for op, _, nbytes in repeated.events] == [
        (op, nbytes) for op, _, nbytes in events + events[3:] * 2
    ]
    # copy 1 (events 5, 6) waits after step 1's twin of event 0 (3 + 1), copy 2 (events 7,
    # 8) after copy 1's (5 + 1)
    assert repeated.sync_points == ((4, 2), (6, 4), (8, 6))
