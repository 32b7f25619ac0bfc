"""Inventory anchors on real catalog models: exact totals, roles and LoRA counts by hand."""

import pytest

from vramcalc.catalog import resolve_model
from vramcalc.errors import InvalidPlanError
from vramcalc.inventory import build_inventory
from vramcalc.training_plan import TrainingPlan


def inventory(model, **kwargs):
    return build_inventory(
        resolve_model(model).config_dict, TrainingPlan(model, **kwargs), use_cache=False
    )


def test_llama2_7b_total_and_lora_qkvo_r16():
    inv = inventory(
        "meta-llama/Llama-2-7b-hf", rank=16, targets=("q_proj", "k_proj", "v_proj", "o_proj")
    )
    assert inv.total_params == 6_738_415_616
    # 32 layers x 4 modules x r(4096 + 4096)
    assert inv.trainable_params == 32 * 4 * 16 * (4096 + 4096) == 16_777_216
    assert inv.params_by_role["lm_head"] == 32000 * 4096 and not inv.tied_embeddings


def test_llama3_8b_gqa_all_linear_r64():
    inv = inventory("meta-llama/Meta-Llama-3-8B", rank=64, targets=("all-linear",))
    assert inv.total_params == 8_030_261_248
    h, kv, inter = 4096, 1024, 14336
    per_layer = 64 * ((h + h) * 2 + (h + kv) * 2 + (h + inter) * 2 + (inter + h))
    assert inv.trainable_params == 32 * per_layer
    assert inv.lora_targets == (
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    )
    assert inv.num_key_value_heads == 8 and inv.vocab_size == 128256


def test_tied_embeddings_counted_once():
    inv = inventory("Qwen/Qwen2.5-0.5B", method="full")
    assert inv.tied_embeddings and inv.params_by_role["lm_head"] == 0
    assert inv.total_params == 494_032_768
    assert inv.params_by_role["linear_bias"] == 24 * (896 + 128 + 128)  # q, k, v biases


def test_moe_experts_are_not_plain_linear():
    inv = inventory("mistralai/Mixtral-8x7B-v0.1")
    assert inv.num_experts == 8 and inv.experts_per_token == 2
    # experts are 3-D parameters in transformers 5: 32 layers x 8 experts x 3 x 4096 x 14336
    assert inv.params_by_role["other"] >= 32 * 8 * 3 * 4096 * 14336


def test_unknown_target_lists_linear_modules():
    with pytest.raises(InvalidPlanError) as info:
        inventory("meta-llama/Llama-2-7b-hf", targets=("qproj",))
    message = str(info.value)
    assert "--targets qproj" in message
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in message


def test_architecture_without_peft_default_falls_back_to_all_linear():
    inv = inventory("microsoft/Phi-3-mini-4k-instruct")
    assert inv.lora_targets == ("down_proj", "gate_up_proj", "o_proj", "qkv_proj")


def test_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMCALC_CACHE_DIR", str(tmp_path))
    spec = resolve_model("TinyLlama/TinyLlama-1.1B")
    plan = TrainingPlan("t", rank=8)
    first = build_inventory(spec.config_dict, plan)
    # the rank-8191 structure build that every rank is derived from, and rank 8 itself
    assert len(list(tmp_path.rglob("*.json"))) == 2
    assert build_inventory(spec.config_dict, plan) == first


@pytest.mark.parametrize(
    "model, changes",
    [
        ("TinyLlama/TinyLlama-1.1B", {"rank": 8}),
        ("TinyLlama/TinyLlama-1.1B", {"rank": 64, "targets": ("all-linear",)}),
        ("TinyLlama/TinyLlama-1.1B", {"rank": 16, "dora": True}),
        ("Qwen/Qwen2.5-0.5B", {"rank": 4, "modules_to_save": ("lm_head",)}),
        ("tiiuae/falcon-7b", {"rank": 32, "targets": ("all-linear",)}),
        ("microsoft/Phi-3-mini-4k-instruct", {"rank": 128, "targets": ("lm_head", "o_proj")}),
        ("mistralai/Mixtral-8x7B-v0.1", {"rank": 8, "targets": ("all-linear",)}),
    ],
)
def test_ranks_derived_from_the_structure_build_equal_a_direct_peft_build(model, changes):
    from vramcalc.inventory import _build_on_meta

    spec = resolve_model(model)
    plan = TrainingPlan(model, **changes)
    derived = build_inventory(spec.config_dict, plan, use_cache=False)
    direct = _build_on_meta(spec.config_dict, plan, model)
    assert derived == direct
    assert derived.adapter_params > 0
