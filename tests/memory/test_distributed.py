"""Per-GPU memory under data parallelism, against the single-GPU components."""

import pytest

from tests.conftest import TINY_LLAMA
from vramcalc.errors import InvalidPlanError
from vramcalc.estimate import estimate_from_inventory
from vramcalc.inventory import build_inventory
from vramcalc.memory.gradients import gradient_bytes
from vramcalc.memory.nccl import nccl_buffer_bytes
from vramcalc.memory.overhead import load_calibration
from vramcalc.training_plan import TrainingPlan


def run(**kwargs):
    kwargs.setdefault("dtype", "bf16")
    plan = TrainingPlan("tiny", method="full", **kwargs)
    inventory = build_inventory(TINY_LLAMA, plan, use_cache=False)
    return inventory, plan, estimate_from_inventory(inventory, plan, load_calibration())


def test_single_gpu_has_no_comm_or_nccl():
    _, _, one = run()
    assert (
        one.components["nccl"]
        == one.components["comm_buffers"]
        == one.components["gathered_weights"]
        == 0
    )


def test_ddp_replicates_and_adds_gradient_buckets():
    inventory, plan, one = run()
    _, _, ddp = run(num_gpus=2, strategy="ddp")
    c1, c2 = one.components, ddp.components
    assert c2["weights"] == c1["weights"] and c2["optimizer_states"] == c1["optimizer_states"]
    assert c2["comm_buffers"] == gradient_bytes(inventory, plan)
    assert c2["nccl"] == nccl_buffer_bytes(2)  # memory/nccl.py's rule
    assert ddp.total_device_bytes_all_gpus == 2 * ddp.device_total_bytes


@pytest.mark.parametrize("n", [2, 4, 8])
def test_fsdp_shards_weights_grads_and_states(n):
    _, _, one = run(dtype="fp32")  # FSDP1 mixed precision keeps fp32 master shards
    _, _, fsdp = run(num_gpus=n, strategy="fsdp")
    assert fsdp.components["weights"] == one.components["weights"] // n
    assert fsdp.components["optimizer_states"] == one.components["optimizer_states"] // n
    assert fsdp.components["gathered_weights"] > 0


def test_zero_stages_shard_progressively():
    _, _, one = run()
    z1, z2, z3 = (run(num_gpus=4, strategy=s)[2] for s in ("zero1", "zero2", "zero3"))
    assert z1.components["weights"] == z2.components["weights"] == one.components["weights"]
    assert z3.components["weights"] == one.components["weights"] // 4
    assert z1.components["optimizer_states"] == one.components["optimizer_states"] // 4
    assert z1.phase_allocated_bytes["optimizer_step"] > z2.phase_allocated_bytes["optimizer_step"]


def test_activations_and_logits_stay_per_gpu():
    def lora(**kw):
        plan = TrainingPlan("tiny", method="lora", seq_len=1024, batch_size=2, **kw)
        inventory = build_inventory(TINY_LLAMA, plan, use_cache=False)
        return estimate_from_inventory(inventory, plan, load_calibration())

    one, four = lora(), lora(num_gpus=4, strategy="fsdp")
    assert one.peak_phase == four.peak_phase
    assert four.components["activations"] == one.components["activations"] > 0
    assert four.components["logits"] == one.components["logits"] > 0


def test_cpu_offload_moves_optimizer_states():
    _, _, off = run(num_gpus=2, strategy="zero2", cpu_offload=True)
    assert off.components["optimizer_states"] == 0


def test_cpu_offload_needs_a_sharding_strategy():
    with pytest.raises(InvalidPlanError, match="--cpu-offload needs --num-gpus > 1"):
        TrainingPlan("m", cpu_offload=True)


def test_sharded_qlora_keeps_non_quantized_params_in_load_dtype():
    def weights(**kw):
        plan = TrainingPlan("tiny", method="qlora", rank=4, **kw)
        inventory = build_inventory(TINY_LLAMA, plan, use_cache=False)
        from vramcalc.memory.weights import estimate_weights

        return estimate_weights(inventory, plan)

    single, fsdp = weights(), weights(num_gpus=2, strategy="fsdp")
    assert single.unquantized_dtype == "fp32" and fsdp.unquantized_dtype == "bf16"
    assert fsdp.unquantized_bytes * 2 == single.unquantized_bytes


def test_fsdp_full_finetuning_keeps_fp32_master_shards():
    _, _, ddp = run(num_gpus=2, strategy="ddp")  # bf16 everywhere
    _, _, fsdp = run(num_gpus=2, strategy="fsdp")
    assert fsdp.components["weights"] == ddp.components["weights"]  # fp32 halves = bf16 whole


def test_fsdp_offload_moves_frozen_base_weights_too():
    plan = TrainingPlan("tiny", method="lora", num_gpus=2, strategy="fsdp", cpu_offload=True)
    inventory = build_inventory(TINY_LLAMA, plan, use_cache=False)
    est = estimate_from_inventory(inventory, plan, load_calibration())
    assert est.components["weights"] == 0 and est.components["gathered_weights"] > 0
