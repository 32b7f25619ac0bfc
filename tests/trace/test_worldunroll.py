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
from vramcalc.memory.allocator import ALLOC, AllocatorConfig
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
