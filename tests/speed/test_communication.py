"""Collectives of multi-GPU plans: exact bytes on a tiny config (counted by hand below), their
time on a link, what the compute hides, and the link a catalog row gives."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.conftest import TINY_LLAMA
from vramcalc.inventory import build_inventory
from vramcalc.speed.communication import (
    EVERY,
    FIRST,
    LAST,
    Collective,
    CommunicationVolume,
    communication_time,
    communication_volume,
)
from vramcalc.speed.links import (
    ALL_GATHER,
    ALL_REDUCE,
    REDUCE_SCATTER,
    Link,
    collective_seconds,
)
from vramcalc.training_plan import TrainingPlan

# TINY_LLAMA: hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 KV heads, vocab 256, untied.
# A decoder layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate, up, down 64x128 = 36,864 weights,
# + 2 norms of 64 = 36,992. The root unit: embedding 256x64 + head 256x64 + final norm 64 = 32,832.
LAYER, ROOT = 36_992, 32_832
# LoRA r=8 on q_proj, v_proj (peft's default): per layer A 8x64 (q, v), B 64x8 (q), B 32x8 (v)
LORA = {512: 4, 256: 2}  # numel: tensors (the two B of q are 512 as well)
LORA_TENSORS = {(8, 64): 4, (64, 8): 2, (32, 8): 2}


def plan(**kw) -> TrainingPlan:
    return TrainingPlan("tiny", **{"num_gpus": 2, "seq_len": 16, **kw})


def inventory(p: TrainingPlan):
    return build_inventory(TINY_LLAMA, p, use_cache=False)


def volume(**kw) -> CommunicationVolume:
    p = plan(**kw)
    v = communication_volume(inventory(p), p)
    assert v is not None
    return v


def test_the_tiny_layer_and_root_counts_are_the_inventorys():
    inv = inventory(plan(method="full"))
    assert inv.decoder_layer_params == 2 * LAYER
    assert inv.total_params - inv.decoder_layer_params == ROOT
    assert dict(inventory(plan()).trainable_shapes) == LORA_TENSORS


def test_one_gpu_sends_nothing():
    p = plan(num_gpus=1)
    assert communication_volume(inventory(p), p) is None


def test_fsdp_full_shard_full_fine_tuning():
    """bf16: forward gathers the root and both layers, backward both layers again (the root
    stays gathered), every unit's gradient is reduce-scattered once; one fp32 norm."""
    v = volume(method="full", strategy="fsdp")
    assert v.bytes_per_step(ALL_GATHER) == 2 * ROOT + 2 * (2 * 2 * LAYER)
    assert v.bytes_per_step(REDUCE_SCATTER) == 2 * ROOT + 2 * 2 * LAYER
    assert v.bytes_per_step(ALL_REDUCE) == 4
    exposed = {(c.kind, c.phase, c.what) for c in v.collectives if c.exposed}
    assert exposed == {
        (ALL_GATHER, "forward", "root unit (embedding, head, final norm)"),
        (ALL_GATHER, "forward", "decoder layer"),  # the first one
        (REDUCE_SCATTER, "backward", "root unit (embedding, head, final norm)"),
        (REDUCE_SCATTER, "backward", "decoder layer"),
        (ALL_REDUCE, "step", "gradient norm (clip_grad_norm_)"),
    }


def test_fsdp_pads_each_flat_parameter_to_the_world_size():
    v = volume(method="full", strategy="fsdp", num_gpus=3)  # 36,992 = 3 x 12,330 + 2
    layer = [c for c in v.collectives if c.what == "decoder layer" and c.kind == ALL_GATHER]
    assert {c.nbytes for c in layer} == {2 * 36_993}
    root = [c for c in v.collectives if c.what.startswith("root")]
    assert {c.nbytes for c in root} == {2 * ROOT}  # 32,832 = 3 x 10,944


def test_fsdp_shard_grad_op_gathers_once_per_step():
    """SHARD_GRAD_OP keeps units gathered from forward to backward and through no_sync
    micro-batches: one forward all-gather per unit and step, one reduce-scatter."""
    v = volume(method="full", strategy="fsdp-grad-op", grad_accum=3)
    assert v.bytes_per_step(ALL_GATHER) == 2 * ROOT + 2 * 2 * LAYER
    assert v.bytes_per_step(REDUCE_SCATTER) == 2 * ROOT + 2 * 2 * LAYER
    assert {c.when for c in v.collectives if c.kind == ALL_GATHER} == {FIRST}


def test_fsdp_full_shard_with_accumulation_gathers_every_micro_batch_reduces_once():
    one, three = (
        volume(method="full", strategy="fsdp"),
        volume(method="full", strategy="fsdp", grad_accum=3),
    )
    assert three.bytes_per_step(ALL_GATHER) == 3 * one.bytes_per_step(ALL_GATHER)
    assert three.bytes_per_step(REDUCE_SCATTER) == one.bytes_per_step(REDUCE_SCATTER)


def test_fsdp_lora_gathers_frozen_units_and_reduces_only_adapters():
    """peft's wrap policy: each adapter tensor a unit of its own (fp32, gathered and reduced
    in bf16); decoder layers and root frozen: gathered, never reduced."""
    v = volume(strategy="fsdp")
    adapters = 2 * (4 * 512 + 2 * 512 + 2 * 256)  # bf16 bytes of every adapter tensor
    assert v.bytes_per_step(ALL_GATHER) == 2 * ROOT + 2 * (2 * 2 * LAYER) + 2 * adapters
    assert v.bytes_per_step(REDUCE_SCATTER) == adapters
    assert all(c.what == "adapter tensor" for c in v.collectives if c.kind == REDUCE_SCATTER)
    first_layer = [c for c in v.collectives if c.what == "adapter tensor" and c.exposed]
    assert sum(c.count for c in first_layer if c.kind == ALL_GATHER) == 4  # one layer's


def test_fsdp_qlora_gathers_the_packed_4bit_storage():
    """bnb_4bit_quant_storage = bf16: n weights are (n + 1) // 4 bf16 elements; the norms stay."""
    v = volume(method="qlora", strategy="fsdp")
    packed = (4096 + 2 * 2048 + 4096 + 3 * 8192) // 4 + 128
    layer = [c for c in v.collectives if c.what == "decoder layer"]
    assert {c.nbytes for c in layer} == {2 * packed}


def test_ddp_all_reduces_every_trainable_gradient_in_its_dtype():
    full = volume(method="full", strategy="ddp")
    assert [(c.kind, c.nbytes, c.count, c.when, c.exposed) for c in full.collectives] == [
        (ALL_REDUCE, 2 * (2 * LAYER + ROOT), 1, LAST, True)  # bf16, under 1 MiB: one bucket
    ]
    lora = volume(strategy="ddp")
    assert lora.bytes_per_step() == 4 * 3584  # fp32 adapters


def test_ddp_buckets_first_one_mib_then_25_mib():
    p = plan(strategy="ddp")
    inv = replace(inventory(p), trainable_shapes=(((1024, 1024), 30),))  # 30 x 4 MiB fp32
    v = communication_volume(inv, p)
    MiB = 2**20
    assert [(c.nbytes, c.count, c.exposed) for c in v.collectives] == [
        (1 * MiB, 1, False),
        (25 * MiB, 4, False),
        (19 * MiB, 1, True),  # the last bucket: nothing left to compute after it
    ]
    assert v.bytes_per_step() == 120 * MiB


def test_zero1_and_zero2_reduce_scatter_then_gather_updated_parameters():
    """hidden^2 = 4,096-element reduce buckets; 106,816 = 26 x 4,096 + 320; bf16."""
    total = 2 * LAYER + ROOT
    for strategy, phase, when in (("zero1", "step", LAST), ("zero2", "backward", EVERY)):
        v = volume(method="full", strategy=strategy, grad_accum=2)
        reduce = [c for c in v.collectives if c.kind == REDUCE_SCATTER]
        assert [(c.nbytes, c.count) for c in reduce] == [(2 * 4096, 26), (2 * 320, 1)]
        assert {(c.phase, c.when, c.exposed) for c in reduce} == {(phase, when, True)}
        gather = [c for c in v.collectives if c.kind == ALL_GATHER]
        assert [(c.phase, c.nbytes, c.count) for c in gather] == [("step", 2 * total, 1)]
        factor = 2 if strategy == "zero2" else 1  # ZeRO-2 reduces in every micro-batch
        assert v.bytes_per_step(REDUCE_SCATTER) == factor * 2 * total


def test_zero3_gathers_partitioned_modules_twice_persistent_ones_never():
    """Threshold 10 x hidden = 640 elements: every linear weight, the embedding and the head
    are partitioned; LoRA's 512- and 256-element tensors stay whole, reduced and re-gathered."""
    v = volume(strategy="zero3")
    partitioned = 2 * 36_864 + 2 * 16_384
    assert v.bytes_per_step(ALL_GATHER) == 2 * 2 * partitioned + 2 * 3584
    assert v.bytes_per_step(REDUCE_SCATTER) == 2 * 3584
    per_pass = sum(c.count for c in v.collectives if c.kind == ALL_GATHER and c.phase == "forward")
    assert per_pass == 2 * 7 + 2  # one collective per module
    step = [c for c in v.collectives if c.phase == "step" and c.kind == ALL_GATHER]
    assert [(c.what, c.nbytes) for c in step] == [("updated persistent parameters", 2 * 3584)]


# -- what the compute hides ----------------------------------------------------------------------
PCIE = Link("test", 100.0, "pcie", 1, "")


def _volume(collectives, grad_accum=1):
    return CommunicationVolume(plan(grad_accum=grad_accum), tuple(collectives), "test")


def test_hidden_collectives_cost_only_what_the_phase_cannot_cover():
    """Each 1 GB all-gather on 2 GPUs is 5 ms (+14.1 us); the forward computes 12 ms."""
    t = collective_seconds(ALL_GATHER, 10**9, 2, PCIE)
    forward = [
        Collective(ALL_GATHER, "forward", "first", 10**9, 1, EVERY, True),
        Collective(ALL_GATHER, "forward", "others", 10**9, 3, EVERY),
    ]
    result = communication_time(_volume(forward), PCIE, {"forward": 0.012, "backward": 1.0})
    assert result.seconds["forward"] == pytest.approx(4 * t)
    assert result.exposed["forward"] == pytest.approx(t + (3 * t - 0.012))
    covered = communication_time(_volume(forward), PCIE, {"forward": 1.0})
    assert covered.exposed_seconds == pytest.approx(t)  # only the first


def test_overlap_is_per_micro_batch_and_step_collectives_are_exposed():
    t = collective_seconds(REDUCE_SCATTER, 10**9, 2, PCIE)
    collectives = [
        Collective(REDUCE_SCATTER, "backward", "grads", 10**9, 2, LAST),  # last micro-batch only
        Collective(ALL_REDUCE, "step", "norm", 4, 1, LAST, True),
    ]
    result = communication_time(_volume(collectives, 3), PCIE, {"backward": 0.004})
    assert result.seconds["backward"] == pytest.approx(2 * t)  # once per step
    assert result.exposed["backward"] == pytest.approx(2 * t - 0.004)
    assert result.exposed["step"] == pytest.approx(collective_seconds(ALL_REDUCE, 4, 2, PCIE))


# -- against the real model class and torch's own bucket rule ------------------------------------
MEDIUM_LLAMA = {  # big enough for several DDP buckets: 4 layers of 1024 / 2816, vocab 8192
    **TINY_LLAMA,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 8192,
}


def _meta_model(config: dict):
    """The model class built empty on the meta device, in bf16 (the recipe's load dtype)."""
    import torch
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(
            transformers.LlamaConfig(**config), dtype=torch.bfloat16
        )


@pytest.mark.parametrize("num_gpus", [2, 4, 8])
def test_fsdp_unit_bytes_are_the_model_classes_parameter_bytes(num_gpus):
    """Each FSDP1 unit's all-gather and reduce-scatter is its modules' parameters, counted on
    the real model class, padded to the world size, in bf16: decoder layers and the root."""
    model = _meta_model(TINY_LLAMA)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - layer * len(model.model.layers)
    v = volume(method="full", strategy="fsdp", num_gpus=num_gpus)
    units = {(c.kind, c.what): c.nbytes for c in v.collectives if c.kind != ALL_REDUCE}
    pad = -num_gpus
    assert units == {
        (ALL_GATHER, "decoder layer"): 2 * (-(layer // pad) * num_gpus),
        (REDUCE_SCATTER, "decoder layer"): 2 * (-(layer // pad) * num_gpus),
        (ALL_GATHER, "root unit (embedding, head, final norm)"): 2 * (-(root // pad) * num_gpus),
        (REDUCE_SCATTER, "root unit (embedding, head, final norm)"): 2
        * (-(root // pad) * num_gpus),
    }
    per_pass = sum(c.count for c in v.collectives if c.kind == ALL_GATHER and c.phase == "forward")
    assert per_pass == len(model.model.layers) + 1


def test_ddp_buckets_against_torchs_own_bucket_assignment():
    """torch's ``_compute_bucket_assignment_by_size`` (what DDP's Reducer runs) on the real
    model's trainable parameters, reverse order, 1 MiB then 25 MiB: the bytes all-reduced per
    step are exactly the gradients'; the rule counts buckets by bytes, torch closes one at a
    tensor boundary past the cap, so the count may differ by one (module docstring)."""
    import torch.distributed as dist

    model = _meta_model(MEDIUM_LLAMA)
    params = [p for p in model.parameters() if p.requires_grad][::-1]
    limits = [dist._DEFAULT_FIRST_BUCKET_BYTES, 25 * 2**20]
    buckets, _ = dist._compute_bucket_assignment_by_size(params, limits, [False] * len(params))
    torch_bytes = [sum(params[i].numel() * params[i].element_size() for i in b) for b in buckets]
    p = plan(method="full", strategy="ddp")
    v = communication_volume(build_inventory(MEDIUM_LLAMA, p, use_cache=False), p)
    assert v is not None
    assert v.bytes_per_step(ALL_REDUCE) == sum(torch_bytes)  # 2 x 63,972,352 parameters, bf16
    assert sum(torch_bytes) == 2 * sum(x.numel() for x in params)
    assert abs(sum(c.count for c in v.collectives) - len(torch_bytes)) <= 1
    assert {c.kind for c in v.collectives} == {ALL_REDUCE}
