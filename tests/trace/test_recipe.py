"""One trace per recipe: a recipe's trace, instantiated for a plan, is the plan's own trace.

``memory/recipe.py`` traces a recipe once at a trace point of primes and reads every
allocation's size as an expression of batch, sequence length, rank (and INT8 outlier
columns). Here each instantiated trace must equal a direct trace of the same plan event for
event (the same allocations and frees in the same order, the same bytes), over tiny models
of every architecture family the catalog holds, the methods, quantizations, checkpointing,
dropout, DoRA, AdaLoRA, gradient accumulation, batch and rank 1, odd sequence lengths and
both sides of a sliding window; and whole runs (unrolled to more layers, three steps) must
replay through the allocator model to the same peaks as a trace of every layer and step.
"""

from __future__ import annotations

from typing import Any

import pytest

from vramcalc.memory.allocator import AllocatorConfig
from vramcalc.memory.slack import simulate_run
from vramcalc.trace import recipe, repeat, steptrace, unroll
from vramcalc.training_plan import TrainingPlan

BASE = {
    "hidden_size": 64,
    "num_hidden_layers": 7,
    "num_attention_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
    # wide enough weights that INT8's MLP output projections see |x| >= 6 outlier columns at
    # these few tokens (real models do at real token counts: memory/int8.py)
    "initializer_range": 0.5,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {**BASE, "model_type": "llama", "intermediate_size": 176, "num_key_value_heads": 2},
    "qwen2": {**BASE, "model_type": "qwen2", "intermediate_size": 176, "num_key_value_heads": 2},
    "mistral-window": {
        **BASE,
        "model_type": "mistral",
        "intermediate_size": 160,
        "num_key_value_heads": 1,
        "sliding_window": 96,
    },
    "gemma2": {
        **BASE,
        "model_type": "gemma2",
        "intermediate_size": 160,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 64,
    },
    "phi3": {
        **BASE,
        "model_type": "phi3",
        "intermediate_size": 160,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
    },
    "mixtral": {
        **BASE,
        "model_type": "mixtral",
        "intermediate_size": 128,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": None,
    },
    "qwen3_moe": {
        **BASE,
        "model_type": "qwen3_moe",
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_key_value_heads": 2,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "head_dim": 16,
    },
    "opt": {
        **BASE,
        "model_type": "opt",
        "ffn_dim": 160,
        "word_embed_proj_dim": 64,
        "do_layer_norm_before": True,
        "pad_token_id": 1,
    },
}
PLANS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora", "rank": 8},
    "lora-b1-r1": {"method": "lora", "rank": 1, "batch_size": 1},
    "qlora-ckpt-all": {"method": "qlora", "targets": ("all-linear",), "rank": 5},
    "int8-ckpt": {"method": "lora", "quant": "int8", "gradient_checkpointing": True},
    "dora-dropout": {"method": "lora", "dora": True, "dropout": 0.1, "rank": 6},
    "full-foreach": {"method": "full", "optimizer": "adamw_torch"},
    "adalora": {"method": "adalora", "init_rank": 10, "target_rank": 4, "total_step": 100},
    "ga2": {"method": "lora", "grad_accum": 2},
    "ga4-paged": {"method": "qlora", "grad_accum": 4, "optimizer": "paged_adamw_8bit"},
}


def _plan(config: str, variant: str, **sizes: int) -> TrainingPlan:
    fields = {"seq_len": 75, "batch_size": 3, **PLANS[variant], **sizes}
    return TrainingPlan(model=config, **fields)


def _numbered(events: tuple[tuple[int, int, int], ...]) -> list[tuple[int, int, int]]:
    """Events with handles renumbered in allocation order (copies made by repeating a
    micro-batch take new numbers; which tensor each free releases is what counts)."""
    names: dict[int, int] = {}
    out = []
    for op, handle, nbytes in events:
        if op == 0:
            names[handle] = len(names)
        out.append((op, names.get(handle, -handle - 1), nbytes))
    return out


def _assert_same(config: dict[str, Any], plan: TrainingPlan) -> None:
    trace = recipe.recipe_trace(config, plan, use_cache=False)
    assert trace is not None and trace.answers(plan)
    got = trace.instantiate(plan)
    layers, _ = recipe.traced_layers(config)
    want = steptrace.trace_at(config, plan, recipe.steps_to_trace(plan), layers)
    assert got.params == want.params
    assert got.markers == want.markers
    assert len(got.events) == len(want.events)
    assert _numbered(got.events) == _numbered(want.events)
    assert got.tags == want.tags  # the layer of every event: what unrolling repeats


# every variant on llama; on each other architecture what differs by architecture (attention,
# MLP / experts, norms, heads) once in 16 bit and once quantized with checkpointing
CASES = [("llama", v) for v in sorted(PLANS)] + [
    (arch, variant)
    for arch in sorted(CONFIGS)
    if arch != "llama"
    for variant in ("lora", "int8-ckpt" if arch == "opt" else "qlora-ckpt-all")
]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "variant"), CASES, ids=[f"{a}-{v}" for a, v in CASES])
def test_instantiated_recipe_is_the_plans_own_trace(arch: str, variant: str) -> None:
    _assert_same(CONFIGS[arch], _plan(arch, variant))


@pytest.mark.slow
@pytest.mark.parametrize(
    "sizes",
    [
        {"seq_len": 40},  # below the window of 96
        {"seq_len": 130},  # above it
        {"seq_len": 99, "batch_size": 2},  # just past it
        {"seq_len": 1000, "rank": 64},
        {"seq_len": 1024, "rank": 64},  # the position limit is no threshold
        {"seq_len": 1500},  # nor is a length past it
    ],
    ids=str,
)
def test_sizes_on_both_sides_of_a_sliding_window(sizes: dict[str, int]) -> None:
    _assert_same(CONFIGS["mistral-window"], _plan("mistral", "lora", **sizes))


def test_a_recipe_answers_every_size_of_its_regime_from_one_trace() -> None:
    config = CONFIGS["llama"]
    first = recipe.recipe_trace(config, _plan("llama", "qlora-ckpt-all"), use_cache=False)
    keys = {
        recipe.recipe_key(config, plan, recipe.trace_point(config, plan))  # type: ignore[arg-type]
        for plan in (
            _plan("llama", "qlora-ckpt-all", seq_len=s, batch_size=b, rank=r)
            for s, b, r in ((75, 3, 5), (900, 4, 64), (513, 16, 8))
        )
    }
    assert len(keys) == 1
    assert first is not None and first.point.batch > 1 and first.point.rank > 1
    one = _plan("llama", "qlora-ckpt-all", batch_size=1)
    assert recipe.recipe_key(config, one, recipe.trace_point(config, one)) not in keys  # type: ignore[arg-type]


def test_sizes_read_as_expressions() -> None:
    point = recipe.TracePoint(batch=211, seq=709, rank=223, outliers=0)
    # B x (S + 1) int64: the loss's padded labels
    padded = recipe.decode_size((8, (211, 710), ()), 8 * 211 * 710, point)
    assert recipe.evaluate(padded, {"B": 4, "S": 2048, "r": 16, "c": 0}) == 8 * 4 * 2049
    # B x S x hidden bf16, flattened tokens
    flat = recipe.decode_size((2, (211 * 709, 5120), ()), 2 * 211 * 709 * 5120, point)
    assert recipe.evaluate(flat, {"B": 2, "S": 100, "r": 1, "c": 0}) == 2 * 200 * 5120
    # FlashAttention-2's workspace: the sequence rounded up to 128
    rounded = recipe.decode_size((4, (211, 40, 768), ((2, 128),)), 4 * 211 * 40 * 768, point)
    assert recipe.evaluate(rounded, {"B": 1, "S": 2049, "r": 1, "c": 0}) == 4 * 40 * 2176
    # a LoRA weight
    lora = recipe.decode_size((4, (223, 5120), ()), 4 * 223 * 5120, point)
    assert recipe.evaluate(lora, {"B": 9, "S": 9, "r": 16, "c": 0}) == 4 * 16 * 5120


def test_trace_points_avoid_the_configs_numbers_and_thresholds() -> None:
    config = {**CONFIGS["mistral-window"], "intermediate_size": 211 * 2}
    below = recipe.trace_point(config, _plan("mistral", "lora", seq_len=40))
    above = recipe.trace_point(config, _plan("mistral", "lora", seq_len=500))
    assert below is not None and above is not None
    assert below.batch != 211 and below.seq < 96 - recipe.MAX_SHIFT
    assert above.seq > 96 + recipe.MAX_SHIFT
    for on_the_threshold in (95, 96, 97):  # traced for the plan itself
        assert (
            recipe.trace_point(config, _plan("mistral", "lora", seq_len=on_the_threshold)) is None
        )


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["qlora-ckpt-all", "ga4-paged", "adalora"])
def test_whole_runs_replay_like_every_layer_and_step_traced(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instantiated, step-repeated and unrolled to 7 layers = all 7 layers and 3 steps (from
    the recipe's trace: the plan is not traced for itself)."""
    config = CONFIGS["llama"]
    plan = _plan("llama", variant, seq_len=64, batch_size=2)
    full = steptrace.trace_steps(config, plan, steps=3, unroll=False)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the plan was traced for itself")

    monkeypatch.setattr(steptrace, "trace_steps", refuse)
    fast = recipe.plan_steps(config, plan, 3)
    for expandable in (False, True):
        allocator = AllocatorConfig(expandable_segments=expandable)
        want = simulate_run(full, plan, allocator).result
        got = simulate_run(fast, plan, allocator).result
        assert (got.peak_allocated_bytes, got.peak_reserved_bytes) == (
            want.peak_allocated_bytes,
            want.peak_reserved_bytes,
        )


def test_repeat_micro_refuses_a_trace_without_three_micro_batches() -> None:
    events = ((0, 1, 8), (1, 1, 8))
    with pytest.raises(unroll.UnrollError):
        repeat.repeat_micro(events, (0, 0), (("step0", 0), ("step0_optimizer", 2)), 2)


def test_int8_without_outlier_columns_is_traced_for_the_plan_itself() -> None:
    config = {**CONFIGS["llama"], "initializer_range": 0.02}
    plan = _plan("llama", "int8-ckpt", seq_len=16, batch_size=2)
    trace = recipe.recipe_trace(config, plan, use_cache=False)
    assert trace is not None and not trace.answers(plan)
    with pytest.raises(recipe.RecipeTraceError):
        trace.instantiate(plan)
    direct = steptrace.trace_steps(config, plan, steps=3)
    assert recipe.plan_steps(config, plan, 3).events == direct.events


def test_a_recipe_trace_survives_its_disk_format() -> None:
    config = CONFIGS["qwen2"]
    plan = _plan("qwen2", "int8-ckpt")
    trace = recipe.recipe_trace(config, plan, use_cache=False)
    assert trace is not None
    again = recipe.RecipeTrace.from_json(trace.to_json())
    assert again == trace
    assert again.instantiate(plan).events == trace.instantiate(plan).events
