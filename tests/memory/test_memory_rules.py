"""Each static memory rule on tiny configs, against bytes computed by hand.

Tiny llama (conftest.TINY_LLAMA): hidden 64, intermediate 128, 2 layers,
4 heads, 2 KV heads (head_dim 16 → k/v out 32), vocab 256, untied head.
Per layer: q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128.
"""

import pytest

from tests.conftest import TINY_LLAMA
from vramcalc.inventory import build_inventory
from vramcalc.memory import alloc_bytes
from vramcalc.memory.gradients import gradient_bytes
from vramcalc.memory.optimizer import estimate_optimizer
from vramcalc.memory.weights import estimate_weights, four_bit_linear_bytes, int8_linear_bytes
from vramcalc.training_plan import TrainingPlan

LINEAR_PER_LAYER = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 128 * 64  # 36,864
EMBED = 256 * 64
NORMS = 2 * 2 * 64 + 64
TOTAL = 2 * LINEAR_PER_LAYER + 2 * EMBED + NORMS  # 106,816


def inv(**plan_kwargs):
    plan = TrainingPlan("tiny", **plan_kwargs)
    return build_inventory(TINY_LLAMA, plan, use_cache=False), plan


def test_alloc_rounding():
    assert alloc_bytes(1) == 512 and alloc_bytes(512) == 512 and alloc_bytes(513) == 1024
    assert alloc_bytes(0) == 0 and alloc_bytes(100, tensors=3) == 1536


def test_inventory_roles_are_exact():
    inventory, _ = inv(method="full")
    assert inventory.total_params == TOTAL == 106_816
    assert inventory.params_by_role == {
        "linear": 2 * LINEAR_PER_LAYER,
        "linear_bias": 0,
        "lm_head": EMBED,
        "embedding": EMBED,
        "norm": NORMS,
        "other": 0,
        "adapter": 0,
    }
    assert inventory.trainable_params == TOTAL
    assert not inventory.tied_embeddings
    assert (inventory.num_layers, inventory.num_key_value_heads, inventory.head_dim) == (2, 2, 16)


def test_lora_default_targets_and_counts():
    inventory, _ = inv(rank=4)
    assert inventory.lora_targets == ("q_proj", "v_proj")
    # per layer: q: A 4x64 + B 64x4; v: A 4x64 + B 32x4
    assert inventory.adapter_params == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4) == 1792
    assert inventory.trainable_params == 1792


def test_bf16_weights_and_fp32_adapters():
    inventory, plan = inv(rank=4)
    weights = estimate_weights(inventory, plan)
    assert weights.weights_bytes == TOTAL * 2
    assert weights.adapter_bytes == 1792 * 4


def test_nf4_double_quant_storage_by_hand():
    # q_proj: 4096 elements → packed 2048 B; 64 blocks of 64 → uint8 absmax 64 B (→512);
    # 1 second-level block → fp32 absmax 4 B (→512); dynamic map 256 fp32 = 1024 B;
    # offset 4 B (→512); 4-bit code 16 fp32 = 64 B (→512)
    assert four_bit_linear_bytes(64, 64, double_quant=True) == 2048 + 512 + 512 + 512 + 1024 + 512
    # without double quant: fp32 absmax 64 x 4 = 256 B (→512)
    assert four_bit_linear_bytes(64, 64, double_quant=False) == 2048 + 512 + 512
    # a 7B-sized q_proj: 4096x4096 → 8 MiB packed, 262,144 blocks, 1,024 second-level blocks
    n = 4096 * 4096
    assert four_bit_linear_bytes(4096, 4096, True) == n // 2 + 512 + 262_144 + 4096 + 1024 + 512


def test_int8_storage_by_hand():
    assert int8_linear_bytes(64, 64) == 4096 + 512  # int8 CB + SCB 64 fp32 (256 B → 512)
    assert int8_linear_bytes(4096, 4096) == 4096 * 4096 + 4096 * 4


def test_qlora_weights_upcast_everything_else_to_fp32():
    inventory, plan = inv(method="qlora", rank=4)
    weights = estimate_weights(inventory, plan)
    per_layer = (
        2 * four_bit_linear_bytes(64, 64, True)
        + 2 * four_bit_linear_bytes(32, 64, True)
        + 2 * four_bit_linear_bytes(128, 64, True)
        + four_bit_linear_bytes(64, 128, True)
    )
    assert weights.quantized_linear_bytes == 2 * per_layer
    assert weights.unquantized_bytes == (2 * EMBED + NORMS) * 4
    assert weights.unquantized_dtype == "fp32"


def test_gradients_follow_trainable_dtype():
    inventory, plan = inv(rank=4)
    # LoRA: fp32 adapters; tensors: A(4x64)x4 = 1024 B each, B(64x4) 1024 B x2, B(32x4) 512 B x2
    assert gradient_bytes(inventory, plan) == 4 * 1024 + 2 * 1024 + 2 * 512
    full, full_plan = inv(method="full", dtype="bf16")
    assert gradient_bytes(full, full_plan) == sum(
        alloc_bytes(n * 2)
        for n in [64 * 64] * 4 + [32 * 64] * 4 + [128 * 64] * 6 + [EMBED] * 2 + [64] * 5
    )


@pytest.mark.parametrize(
    "optimizer,state,transient,paged",
    [
        ("adamw_torch", 2 * 7168, 7168, 0),
        ("adamw_torch_fused", 2 * 7168 + 8 * 512, 0, 0),
        ("sgd", 0, 0, 0),
        ("sgd_momentum", 7168, 0, 0),
        # every adapter tensor < 4096 elements → 32-bit states in bnb
        ("adamw_8bit", 2 * 7168, 0, 0),
        ("paged_adamw_32bit", 2 * 7168, 0, 0),  # all < 1e5 elements → not paged
    ],
)
def test_optimizer_states_on_adapters(optimizer, state, transient, paged):
    inventory, plan = inv(rank=4, optimizer=optimizer)
    est = estimate_optimizer(inventory, plan)
    assert (est.state_bytes, est.step_transient_bytes, est.paged_state_bytes) == (
        state,
        transient,
        paged,
    )


def test_bnb_8bit_and_paged_thresholds_on_a_large_tensor():
    # Llama-2-7B-sized LoRA r=16 on q,v: A 16x4096 (65,536 ≥ 4096 → 8-bit, < 1e5 → not paged)
    cfg = dict(
        TINY_LLAMA,
        hidden_size=4096,
        intermediate_size=128,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=1,
    )
    plan = TrainingPlan("x", rank=16, optimizer="paged_adamw_8bit")
    inventory = build_inventory(cfg, plan, use_cache=False)
    est = estimate_optimizer(inventory, plan)
    per_tensor = 2 * 65_536 + 2 * alloc_bytes(
        256 * 4
    )  # two uint8 states + two fp32 absmax of 256 blocks
    assert est.state_bytes == 4 * per_tensor and est.paged_state_bytes == 0
    plan32 = plan.with_(optimizer="paged_adamw_32bit", rank=32)  # 131,072 elements ≥ 1e5 → paged
    inventory32 = build_inventory(cfg, plan32, use_cache=False)
    est32 = estimate_optimizer(inventory32, plan32)
    assert est32.state_bytes == 0 and est32.paged_state_bytes == 4 * 2 * 131_072 * 4


def test_adafactor_factored_states():
    inventory, plan = inv(rank=4, optimizer="adafactor")
    est = estimate_optimizer(inventory, plan)
    # A (4x64): row 4 + col 64 fp32 → 512 + 512; B (64x4) → 512 + 512; B (32x4) → 512 + 512; + RMS scalar
    assert est.state_bytes == 8 * (512 + 512 + 512)


def test_dora_magnitudes_and_modules_to_save_copies():
    inventory, plan = inv(rank=4, dora=True, modules_to_save=("lm_head",))
    # DoRA: one fp32 magnitude per output row of each adapted module (q 64, v 32 per layer)
    assert inventory.adapter_params == 1792 + 2 * (64 + 32)
    # modules_to_save: a trainable copy of the 256 x 64 head, in the load dtype (bf16)
    assert inventory.saved_copy_params == 256 * 64
    assert inventory.trainable_params == 1792 + 192 + 16384
    weights = estimate_weights(inventory, plan)
    assert weights.adapter_bytes == (1792 + 192) * 4 + 16384 * 2
    # gradients: adapter tensors as before + 4 magnitudes (256 B / 128 B → 512 each) + bf16 head copy
    assert gradient_bytes(inventory, plan) == 4 * 1024 + 2 * 1024 + 2 * 512 + 4 * 512 + 16384 * 2
    qlora, qplan = inv(method="qlora", rank=4, modules_to_save=("lm_head",))
    assert (
        estimate_weights(qlora, qplan).adapter_bytes == 1792 * 4 + 16384 * 4
    )  # fp32 after k-bit prep


def test_lora_only_options_are_rejected_for_full():
    from vramcalc.errors import InvalidPlanError

    with pytest.raises(InvalidPlanError, match="--dora and --modules-to-save are LoRA options"):
        TrainingPlan("m", method="full", dora=True)
