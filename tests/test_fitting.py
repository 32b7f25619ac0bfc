"""vramcalc.fitting: the largest batch and sequence that fit, checked against estimate()."""

from dataclasses import replace

import pytest

from vramcalc.budget import budget_bytes, judge
from vramcalc.catalog import find_gpu
from vramcalc.errors import InvalidPlanError
from vramcalc.estimate import estimate, prepare
from vramcalc.fitting import max_batch_size, max_seq_len
from vramcalc.training_plan import TrainingPlan


def _gpu_holding(plan, headroom=0.05):
    """A GPU whose budget is exactly the estimate of ``plan`` (it just fits)."""
    total = estimate(plan).device_total_bytes
    gpu = replace(find_gpu("L4"), name="test-gpu", memory_bytes=int(total / (1 - headroom)) - 2)
    while budget_bytes(gpu, headroom) < total:
        gpu = replace(gpu, memory_bytes=gpu.memory_bytes + 1)
    assert budget_bytes(gpu, headroom) == total
    return gpu


def test_max_batch_size_at_the_boundary(tiny_llama_dir):
    plan = TrainingPlan(str(tiny_llama_dir), method="qlora", seq_len=512)
    gpu = _gpu_holding(plan.with_(batch_size=37))
    result = max_batch_size(plan, gpu, headroom=0.05)
    assert result.found and result.value == 37 and result.field == "batch_size"
    assert result.best.estimate == estimate(plan.with_(batch_size=37))
    assert result.first_too_large.estimate == estimate(plan.with_(batch_size=38))
    assert judge(result.best.estimate.device_total_bytes, gpu, 0.05).fits
    assert not judge(result.first_too_large.estimate.device_total_bytes, gpu, 0.05).fits
    assert result.estimates_made <= 14
    data = result.to_dict()
    assert (
        data["value"] == 37
        and data["at_value"]["batch_size"] == 37
        and data["at_next_step"]["batch_size"] == 38
    )
    assert (
        data["at_value"]["device_total_bytes"]
        <= data["budget_bytes"]
        < data["at_next_step"]["device_total_bytes"]
    )


def test_max_seq_len_in_multiples(tiny_opt_dir):
    plan = TrainingPlan(str(tiny_opt_dir), method="lora", batch_size=2)
    gpu = _gpu_holding(plan.with_(seq_len=320), headroom=0.1)
    result = max_seq_len(plan, gpu, headroom=0.1, multiple=32)
    assert (result.value, result.first_too_large.value, result.step) == (320, 352, 32)
    assert result.best.estimate.plan.batch_size == 2


def test_max_seq_len_stops_at_the_context_length(tiny_llama_dir):
    plan = TrainingPlan(str(tiny_llama_dir), batch_size=1)
    assert (
        prepare(str(tiny_llama_dir), TrainingPlan(str(tiny_llama_dir))).inventory.context_length
        == 512
    )
    result = max_seq_len(plan, find_gpu("H100-80GB"), multiple=64)
    assert result.value == 512 and result.limit_reached and result.first_too_large is None
    with pytest.raises(
        InvalidPlanError, match="--seq-multiple 1024 exceeds the model's context length 512"
    ):
        max_seq_len(plan, find_gpu("H100-80GB"), multiple=1024)
    with pytest.raises(InvalidPlanError, match="--seq-multiple must be a positive integer"):
        max_seq_len(plan, find_gpu("H100-80GB"), multiple=0)


def test_nothing_fits(tiny_llama_dir):
    plan = TrainingPlan(str(tiny_llama_dir))
    gpu = replace(find_gpu("L4"), memory_bytes=estimate(plan).device_total_bytes - 1)
    result = max_batch_size(plan, gpu, headroom=0.0)
    assert not result.found and result.value is None and result.first_too_large.value == 1
    assert result.to_dict()["at_value"] is None
