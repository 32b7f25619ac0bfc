"""``vramcalc serve``: KV cache bytes by hand and against transformers' caches, adapter counts
against peft, the memory composition, the speed model's shape, adapter dirs and errors."""

from __future__ import annotations

import json

import pytest

from vramcalc.errors import InvalidPlanError
from vramcalc.memory import alloc_bytes
from vramcalc.memory.overhead import load_calibration
from vramcalc.serve_plan import (
    ServePlan,
    context_split,
    read_adapter_dir,
    uniform_adapters,
)
from vramcalc.serving.kvcache import (
    CacheLayout,
    cache_layout,
    kv_cache_bytes,
    kv_prefill_bytes,
    kv_update_transient_bytes,
)
from vramcalc.serving.serve import estimate_serve_memory, prepare_serving

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
}


def _config(model_type: str, **extra):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **(TINY | extra))


# -- the KV cache ------------------------------------------------------------------------------
def test_kv_cache_bytes_by_hand_gqa():
    layout = cache_layout(_config("llama"), num_key_value_heads=2, head_dim=16)
    assert layout.windows == (None, None)
    # per layer: K and V of (batch 3, 2 KV heads, 100 tokens, 16) in bf16 = 19,200 bytes each,
    # rounded to 512 -> 19,456; the 4 query heads do not count (GQA)
    assert kv_cache_bytes(layout, 3, 100, "bf16") == 2 * 2 * 19_456
    assert layout.token_bytes("bf16") == 2 * 2 * 16 * 2


def test_sliding_window_caps_decoding_not_prefill():
    layout = cache_layout(_config("mistral", sliding_window=8), 2, 16)
    assert layout.windows == (8, 8)
    one = 3 * 2 * 16 * 2  # bytes of one token of 3 sequences, K or V
    assert kv_cache_bytes(layout, 3, 100, "bf16") == 2 * 2 * alloc_bytes(8 * one)
    # right after prefill a dynamic cache's sliding layers still hold the whole prompt
    assert kv_prefill_bytes(layout, 3, 12, "dynamic", 19, "bf16") == 2 * 2 * alloc_bytes(12 * one)
    assert kv_prefill_bytes(layout, 3, 12, "static", 19, "bf16") == 2 * 2 * alloc_bytes(8 * one)
    # decoding: the old window is alive next to the new one; a full static window rolls
    assert kv_update_transient_bytes(layout, 3, 100, "dynamic", "bf16") == 2 * alloc_bytes(8 * one)
    assert kv_update_transient_bytes(layout, 3, 100, "static", "bf16") == 2 * alloc_bytes(8 * one)
    full = CacheLayout((None,), 2, 16)
    assert kv_update_transient_bytes(full, 3, 100, "static", "bf16") == 0
    assert kv_update_transient_bytes(full, 3, 100, "dynamic", "bf16") == 2 * alloc_bytes(99 * one)


def test_gemma2_alternates_sliding_and_full_layers():
    config = _config("gemma2", num_hidden_layers=4, sliding_window=8, head_dim=16)
    layout = cache_layout(config, 2, 16)
    assert layout.windows == (8, None, 8, None)
    one = 2 * 16 * 2
    expected = 2 * (2 * alloc_bytes(8 * one) + 2 * alloc_bytes(50 * one))
    assert kv_cache_bytes(layout, 1, 50, "bf16") == expected


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 8})])
def test_kv_bytes_match_transformers_caches(kind, model_type, extra):
    """Feed transformers' own DynamicCache / StaticCache a prefill and decoding steps and
    compare the storage they hold with the rule, at every step."""
    import torch
    from transformers.cache_utils import DynamicCache, StaticCache

    config = _config(model_type, **extra)
    layout = cache_layout(config, 2, 16)
    batch, prompt, new = 3, 12, 8
    max_len = prompt + new - 1
    cache = DynamicCache(config=config) if kind == "dynamic" else StaticCache(config, max_len)

    def held() -> int:
        return sum(
            alloc_bytes(t.untyped_storage().nbytes())
            for layer in cache.layers
            for t in (layer.keys, layer.values)
        )

    for step in range(new):
        q = prompt if step == 0 else 1
        start = 0 if step == 0 else prompt + step - 1
        pos = torch.arange(start, start + q)
        for layer in range(2):
            kv = [torch.randn(batch, 2, q, 16, dtype=torch.bfloat16) for _ in range(2)]
            cache.update(kv[0], kv[1], layer, {"cache_position": pos})
        if step == 0:
            assert held() == kv_prefill_bytes(layout, batch, prompt, kind, max_len, "bf16")
        else:
            tokens = max_len if kind == "static" else start + 1
            assert held() == kv_cache_bytes(layout, batch, tokens, "bf16")


# -- adapters ----------------------------------------------------------------------------------
def test_adapter_counts_match_peft(tiny_llama_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    plan = ServePlan(
        model=str(tiny_llama_dir),
        adapters=uniform_adapters(3, 4, None, ("q_proj", "v_proj", "down_proj")),
        mode="multi",
    )
    model = prepare_serving(plan)
    config = AutoConfig.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_config(config),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    # by hand: 2 layers x (q: 4x64 + 64x4, v: 4x64 + 32x4, down: 4x128 + 64x4)
    assert lora == 2 * ((256 + 256) + (256 + 128) + (512 + 256)) == 3328
    assert [a.params for a in model.adapters] == [lora] * 3
    assert model.adapters[0].targeted_modules == 6
    memory = estimate_serve_memory(model, plan, load_calibration())
    assert memory.components["adapters"] == 3 * sum(
        alloc_bytes(4 * s[0] * s[1], c) for s, c in model.adapters[0].tensor_shapes
    )


def _write_adapter(path, **config):
    path.mkdir(parents=True)
    data = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(data | config))


def test_adapter_dir_reads_each_subdirectory(tmp_path):
    _write_adapter(tmp_path / "b-task", r=16, target_modules=["v_proj", "q_proj"], use_dora=True)
    _write_adapter(tmp_path / "a-task", modules_to_save=["lm_head"], base_model_name_or_path="x/y")
    (tmp_path / "notes").mkdir()
    a, b = read_adapter_dir(tmp_path)
    assert (a.name, a.rank, a.targets, a.modules_to_save, a.base_model) == (
        "a-task",
        8,
        ("q_proj",),
        ("lm_head",),
        "x/y",
    )
    assert (b.name, b.rank, b.targets, b.dora, b.alpha) == (
        "b-task",
        16,
        ("q_proj", "v_proj"),
        True,
        16,
    )
    assert read_adapter_dir(tmp_path / "a-task")[0].name == "a-task"  # the dir itself


@pytest.mark.parametrize(
    "config,message",
    [
        ({"target_modules": ".*proj"}, "regular expression"),
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"r": 0}, "r must be a positive integer"),
    ],
)
def test_bad_adapter_configs_say_why(tmp_path, config, message):
    _write_adapter(tmp_path / "one", **config)
    with pytest.raises(InvalidPlanError, match=message):
        read_adapter_dir(tmp_path)


def test_adapter_dir_without_configs(tmp_path):
    with pytest.raises(InvalidPlanError, match="no adapter_config.json"):
        read_adapter_dir(tmp_path)
    with pytest.raises(InvalidPlanError, match="not a directory"):
        read_adapter_dir(tmp_path / "missing")


# -- the plan ----------------------------------------------------------------------------------
def test_plan_reports_every_problem_at_once():
    with pytest.raises(InvalidPlanError) as err:
        ServePlan(model="m", mode="merge", batch=0, cache="paged")
    text = str(err.value)
    assert "--mode 'merge' is not one of merged, unmerged, multi" in text
    assert "--batch must be a positive integer" in text
    assert "--cache 'paged'" in text


def test_context_split():
    assert context_split(4096, None, None) == (3840, 256)
    assert context_split(4096, 1000, None) == (1000, 3096)
    assert context_split(None, 100, 20) == (100, 20)
    assert context_split(64, None, None) == (60, 4)
    with pytest.raises(InvalidPlanError, match="is not --prompt-tokens"):
        context_split(100, 50, 20)


# -- the composition ---------------------------------------------------------------------------
def _memory(path, **changes):
    plan = ServePlan(model=str(path), **changes)
    return estimate_serve_memory(prepare_serving(plan), plan, load_calibration())


def test_components_add_up_and_merging_copies_the_base(tiny_llama_dir):
    adapters = uniform_adapters(4, 8, None, None)
    multi = _memory(tiny_llama_dir, adapters=adapters, mode="multi", batch=4)
    merged = _memory(tiny_llama_dir, adapters=adapters, mode="merged", batch=4)
    assert sum(multi.components.values()) == multi.device_total_bytes
    assert (
        multi.peak_reserved_bytes - multi.peak_allocated_bytes
        == multi.components["allocator_reserve"]
    )
    assert merged.components["weights"] == 4 * multi.components["weights"]
    assert merged.components["adapters"] == 0 < multi.components["adapters"]
    # tiny llama: 2 layers x 2 x (batch 4, 2 KV heads, 4,095 tokens, 16) bf16
    assert multi.kv_cache_bytes == 4 * alloc_bytes(4 * 2 * 4095 * 16 * 2)


def test_merged_kbit_stays_kbit(tiny_llama_dir):
    """peft 0.21 Linear4bit.merge quantizes the merged weight again: same bytes as unmerged."""
    one = uniform_adapters(1, 8, None, None)
    merged = _memory(tiny_llama_dir, quant="nf4", adapters=one, mode="merged")
    unmerged = _memory(tiny_llama_dir, quant="nf4", adapters=one, mode="unmerged")
    bf16 = _memory(tiny_llama_dir, adapters=one, mode="merged")
    assert merged.components["weights"] == unmerged.components["weights"]
    assert merged.components["weights"] < bf16.components["weights"]
    assert merged.disk.merged_checkpoint_bytes == bf16.disk.merged_checkpoint_bytes


def test_static_cache_is_sized_for_the_context_from_the_start(tiny_llama_dir):
    dynamic = _memory(tiny_llama_dir, prompt_tokens=100, new_tokens=400, batch=8)
    static = _memory(tiny_llama_dir, prompt_tokens=100, new_tokens=400, batch=8, cache="static")
    assert static.phase_allocated_bytes["prefill"] > dynamic.phase_allocated_bytes["prefill"]
    assert static.kv_cache_bytes == dynamic.kv_cache_bytes


def test_all_position_logits_cost_more_than_the_last(tmp_path):
    from tests.conftest import TINY_LLAMA

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA | {"vocab_size": 4096}))
    last = _memory(tmp_path, prompt_tokens=2000, new_tokens=8, batch=8)
    every = _memory(tmp_path, prompt_tokens=2000, new_tokens=8, batch=8, logits="all")
    assert every.phase_allocated_bytes["prefill"] > last.phase_allocated_bytes["prefill"]


def test_disk_sizes(tiny_llama_dir):
    memory = _memory(tiny_llama_dir, adapters=uniform_adapters(2, 4, None, ("q_proj",)))
    # adapter: 2 layers x (4x64 + 64x4) fp32 = 4,096 B of data, 4 tensors, + header
    assert memory.disk.adapter_bytes == (8 + 4 * 160 + 4096,) * 2


# -- speed -------------------------------------------------------------------------------------
def test_decode_speed_shape(tiny_llama_dir):
    from vramcalc.catalog import find_gpu
    from vramcalc.serving.serve_speed import estimate_serve_speed
    from vramcalc.speed.throughput import load_throughput_calibration

    cal, gpu = load_throughput_calibration(), find_gpu("H200")

    def speed(**changes):
        plan = ServePlan(model=str(tiny_llama_dir), **changes)
        return estimate_serve_speed(prepare_serving(plan), plan, gpu, cal)

    one = uniform_adapters(1, 8, None, None)
    unmerged, merged = speed(adapters=one), speed(adapters=one, mode="merged")
    assert unmerged.adapter_overhead_fraction > 0 == merged.adapter_overhead_fraction
    assert unmerged.decode_tokens_per_second < merged.decode_tokens_per_second
    assert speed(batch=8).decode_tokens_per_second > speed(batch=1).decode_tokens_per_second
    many = speed(adapters=uniform_adapters(8, 8, None, None), mode="multi", batch=8)
    assert many.adapter_overhead_fraction > speed(adapters=one, batch=8).adapter_overhead_fraction
    assert unmerged.to_dict()["speed_measured"] is False
