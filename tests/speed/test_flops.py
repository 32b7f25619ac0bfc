"""FLOP counts of a tiny llama, checked against a hand count written out here.

Tiny llama (tests/conftest.py): hidden 64, intermediate 128, 2 layers, 4 heads
of head_dim 16, 2 KV heads, vocab 256, untied head. Batch 2 x seq 32, so
T = 64 tokens per micro-batch.

Weights per layer: q 64x64 = 4096, k 64x32 = 2048, v 64x32 = 2048,
o 64x64 = 4096, gate/up/down 64x128 = 8192 each: 36,864; two layers 73,728.
Head 64 x 256 = 16,384.
"""

from __future__ import annotations

import pytest

from tests.conftest import TINY_LLAMA
from vramcalc.inventory import build_inventory
from vramcalc.speed.flops import estimate_flops, linear_input_grad_shares
from vramcalc.training_plan import TrainingPlan

T = 2 * 32
LINEAR = 73_728
HEAD = 64 * 256
LAYER0_QKV = 4096 + 2048 + 2048
# attention: 2 matmuls (QKᵀ, PV) x 2·B·heads·head_dim per (query, key) pair, per layer
PER_PAIR = 2 * 2 * 4 * 16  # 2·B·H·d = 256 FLOPs per pair per matmul
CAUSAL_PAIRS = 32 * 33 // 2  # 528
FULL_PAIRS = 32 * 32


def flops_for(config=TINY_LLAMA, **plan_fields):
    plan = TrainingPlan(
        "tiny", **{"seq_len": 32, "batch_size": 2, "gradient_checkpointing": False, **plan_fields}
    )
    return estimate_flops(build_inventory(config, plan, use_cache=False), plan)


def test_full_fine_tuning_sdpa_hand_count():
    f = flops_for(method="full")
    assert f.tokens == 64
    assert f.forward_linear == 2 * 64 * 73_728 == 9_437_184
    assert f.backward_linear == 2 * (2 * 64 * 73_728) == 18_874_368  # input grad + weight grad
    assert f.lm_head_forward == 2 * 64 * 64 * 256 == 2_097_152
    assert f.lm_head_backward == 2 * 2_097_152  # input + weight grad
    # causal kernel: 528 pairs x 256 x 2 matmuls x 2 layers forward; backward 5 matmuls
    assert f.attention_forward == 2 * 2 * 256 * 528 == 540_672
    assert f.attention_backward == 5 * 2 * 256 * 528 == 1_351_680
    assert f.lora == 0 and f.recompute == 0
    assert f.total == 9_437_184 + 18_874_368 + 3 * 2_097_152 + 540_672 + 1_351_680 == 36_495_360
    assert f.model_flops == f.total
    # without attention, full fine-tuning is exactly 6 x matmul params x tokens
    assert f.forward_linear + f.backward_linear + f.lm_head == 6 * T * (LINEAR + HEAD)


def test_lora_q_v_rank4_hand_count():
    f = flops_for(method="lora", rank=4, targets=("q_proj", "v_proj"))
    assert f.first_layer_rule
    assert f.forward_linear == 2 * 64 * 73_728
    # frozen weights: input grads only, and none for layer 0's q, k, v (no grad reaches them)
    assert f.backward_linear == 2 * 64 * (73_728 - 8_192) == 8_388_608
    assert f.lm_head_forward == 2_097_152 and f.lm_head_backward == 2_097_152  # input grad only
    # adapters: q r·(64+64) = 512, v r·(64+32) = 384 params per layer -> 1,792 in two layers
    lora_forward = 2 * 64 * 1_792  # 229,376
    weight_grads = lora_forward
    through_b = 2 * 64 * 4 * (64 + 32) * 2  # q and v B-input grads, both layers: 98,304
    through_a = 2 * 64 * 4 * (64 + 64) * 1  # q and v A-input grads, layer 1 only: 65,536
    assert f.lora_forward == lora_forward == 229_376
    assert f.lora_backward == weight_grads + through_b + through_a == 393_216
    assert f.attention == 540_672 + 1_351_680  # every layer's q and v need gradients
    assert f.recompute == 0
    assert f.total == 9_437_184 + 8_388_608 + 4_194_304 + 622_592 + 1_892_352 == 24_535_040


def test_lora_with_checkpointing_hand_count():
    f = flops_for(method="lora", rank=4, targets=("q_proj", "v_proj"), gradient_checkpointing=True)
    assert (
        not f.first_layer_rule
    )  # transformers' checkpointing makes the embedding output require grad
    assert f.backward_linear == 2 * 64 * 73_728 == 9_437_184
    through_a = 2 * 64 * 4 * (64 + 64) * 2  # now in both layers: 131,072
    assert f.lora_backward == 229_376 + 98_304 + through_a == 458_752
    # recompute = decoder-layer linears + adapters + attention forward, not the head
    assert f.recompute == 9_437_184 + 229_376 + 540_672 == 10_207_232
    assert f.model_flops == f.total - f.recompute == 25_649_152
    assert f.total == 35_856_384


def test_full_eager_with_checkpointing_hand_count():
    f = flops_for(method="full", attn="eager", gradient_checkpointing=True)
    # eager multiplies the full 32 x 32 score matrix; backward = 4 gradient matmuls
    assert f.attention_forward == 2 * 2 * 256 * 1024 == 1_048_576
    assert f.attention_backward == 4 * 2 * 256 * 1024 == 2_097_152
    assert f.recompute == 9_437_184 + 1_048_576
    assert f.total == 9_437_184 + 18_874_368 + 6_291_456 + 3_145_728 + 10_485_760 == 48_234_496


def test_eager_first_layer_skips_unneeded_attention_gradients():
    f = flops_for(method="lora", rank=4, targets=("q_proj", "v_proj"), attn="eager")
    per_matmul = 256 * 1024
    # layer 1: dQ, dK, dP, dV; layer 0: k_proj is frozen with no grad input -> no dK
    assert f.attention_backward == (4 + 3) * per_matmul


def test_mlp_only_adapters_leave_first_attention_without_backward():
    f = flops_for(method="lora", rank=4, targets=("down_proj",))
    # layer 0: nothing before down_proj trains -> no input grads before it, no attention backward
    assert f.attention_backward == 5 * PER_PAIR * CAUSAL_PAIRS  # layer 1 only
    no_grad_layer0 = 4096 + 2048 + 2048 + 4096 + 8192 + 8192 + 8192  # every layer-0 linear
    assert f.backward_linear == 2 * 64 * (73_728 - no_grad_layer0)


def test_grad_accum_multiplies_every_part():
    one = flops_for(method="lora", rank=4, targets=("q_proj", "v_proj")).to_dict()
    four = flops_for(method="lora", rank=4, targets=("q_proj", "v_proj"), grad_accum=4).to_dict()
    for key, value in one.items():
        if isinstance(value, int) and not isinstance(value, bool):
            assert four[key] == 4 * value, key


def test_quantization_does_not_change_flops():
    lora = flops_for(method="lora", rank=8)
    qlora = flops_for(method="qlora", rank=8)
    assert lora.total == qlora.total


def test_input_grad_shares_follow_the_first_layer_rule():
    plan = TrainingPlan("tiny", method="lora", rank=4, targets=("q_proj", "v_proj"))
    shares = linear_input_grad_shares(build_inventory(TINY_LLAMA, plan, use_cache=False), plan)
    assert {k: float(v) for k, v in shares.items()} == {
        "q_proj": 0.5,
        "k_proj": 0.5,
        "v_proj": 0.5,
        "o_proj": 1.0,
        "gate_proj": 1.0,
        "up_proj": 1.0,
        "down_proj": 1.0,
    }


TINY_MIXTRAL = {
    "model_type": "mixtral",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
}


def test_moe_counts_top_k_experts_and_the_router():
    f = flops_for(TINY_MIXTRAL, method="full")
    attention = 4096 + 2048 + 2048 + 4096
    experts_per_layer = 4 * 3 * 64 * 128  # gate_up (256 x 64) + down (64 x 128) per expert
    router = 4 * 64
    active = 2 * (attention + experts_per_layer * 2 // 4 + router)
    assert f.forward_linear == 2 * 64 * active
    assert f.backward_linear == 2 * f.forward_linear


def test_to_dict_has_units_in_names():
    data = flops_for(method="full").to_dict()
    assert data["total_flops"] == 36_495_360
    assert {
        "forward_linear_flops",
        "backward_linear_flops",
        "attention_flops",
        "recompute_flops",
        "lm_head_flops",
        "lora_flops",
        "model_flops",
    } <= set(data)


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_fused_kernels_count_causal_pairs(attn):
    assert flops_for(method="full", attn=attn).attention_forward == 2 * 2 * PER_PAIR * CAUSAL_PAIRS
