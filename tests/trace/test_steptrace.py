"""The step trace: unrolled and step-repeated traces replay like traces of every layer and
step; the traced run's peaks agree with the memory rules on tiny configs."""

from __future__ import annotations

import pytest

from vramcalc.memory.allocator import AllocatorConfig
from vramcalc.memory.slack import simulate_run
from vramcalc.trace import unroll
from vramcalc.trace.repeat import steps_to_trace
from vramcalc.trace.steptrace import trace_at, trace_steps
from vramcalc.training_plan import TrainingPlan

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 9,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
PLANS = {
    "lora": {"method": "lora"},
    "lora-dropout-ckpt": {"method": "lora", "dropout": 0.1, "gradient_checkpointing": True},
    "qlora-paged-ckpt": {
        "method": "qlora",
        "targets": ("all-linear",),
        "optimizer": "paged_adamw_32bit",
        "gradient_checkpointing": True,
    },
    "full-foreach": {"method": "full", "optimizer": "adamw_torch"},
    "int8-ckpt": {"method": "lora", "quant": "int8", "gradient_checkpointing": True},
    "full-8bit": {"method": "full", "optimizer": "adamw_8bit"},
    "adalora-ckpt": {"method": "adalora", "gradient_checkpointing": True},
}


@pytest.mark.parametrize("variant", sorted(PLANS))
def test_fast_trace_replays_exactly_like_every_layer_and_step(variant: str) -> None:
    """5 traced layers unrolled to 9 and the last traced step repeated = all 9 layers and 3
    steps traced (no variant falls back to tracing every layer: AdaLoRA's orthogonal
    regularisation and moving averages are each adapter's layer's)."""
    plan = TrainingPlan(model="tiny", seq_len=64, batch_size=2, **PLANS[variant])
    full = trace_steps(TINY, plan, steps=3, unroll=False)
    small = trace_at(TINY, plan, steps_to_trace(plan), unroll.TRACED_LAYERS)
    fast = unroll.expand(small, 3, 9)
    assert fast.params == full.params  # the model's order: what loading allocates in

    # every allocation, gradient clipping's stack of one norm per trainable tensor included
    def sizes(trace):  # noqa: ANN001, ANN202
        return sorted((op, n) for op, _, n in trace.events)

    assert sizes(fast) == sizes(full)
    for expandable in (False, True):
        config = AllocatorConfig(expandable_segments=expandable)
        want = simulate_run(full, plan, config).result
        got = simulate_run(fast, plan, config).result
        assert (got.peak_allocated_bytes, got.peak_reserved_bytes, got.final_allocated_bytes) == (
            want.peak_allocated_bytes,
            want.peak_reserved_bytes,
            want.final_allocated_bytes,
        )
