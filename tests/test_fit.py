"""vramcalc.fit: the headroom rule and the monotone searches, checked against estimate()."""

from dataclasses import replace

import pytest

from vramcalc.catalog import find_gpu
from vramcalc.errors import InvalidPlanError
from vramcalc.estimate import estimate, prepare
from vramcalc.fit import (
    Probe,
    budget_bytes,
    fits,
    largest_fitting,
    max_batch_size,
    max_seq_len,
    parse_headroom,
)
from vramcalc.plan import TrainingPlan


@pytest.mark.parametrize(
    ("text", "fraction"), [("5%", 0.05), ("0.05", 0.05), ("0", 0.0), (" 12.5% ", 0.125), (0.1, 0.1)]
)
def test_parse_headroom(text, fraction):
    assert parse_headroom(text) == pytest.approx(fraction)


@pytest.mark.parametrize("text", ["5", "100%", "-1%", "abc", "1", "nan"])
def test_parse_headroom_rejects_values_outside_zero_to_one(text):
    with pytest.raises(InvalidPlanError, match="--headroom must be a fraction in \\[0, 1\\)"):
        parse_headroom(text)


def test_parse_headroom_hints_at_percent():
    with pytest.raises(InvalidPlanError, match="did you mean 5%"):
        parse_headroom("5")


def test_budget_is_the_floor_of_memory_times_one_minus_headroom():
    gpu = replace(find_gpu("L4"), memory_bytes=1000)
    assert (
        budget_bytes(gpu, 0.05) == 950
        and budget_bytes(gpu, 0.0555) == 944
        and budget_bytes(gpu, 0) == 1000
    )


def _probe_for(limit_value):
    seen = []

    def probe(units):
        seen.append(units)
        return Probe(units, None, units <= limit_value)

    return probe, seen


@pytest.mark.parametrize("answer", [1, 2, 3, 5, 8, 63, 64, 65, 1000])
def test_largest_fitting_finds_the_exact_boundary_in_log_steps(answer):
    probe, seen = _probe_for(answer)
    best, too_large = largest_fitting(probe, 1 << 20)
    assert best.value == answer and too_large.value == answer + 1
    assert len(set(seen)) <= 2 * answer.bit_length() + 2


def test_largest_fitting_when_nothing_fits_and_at_the_limit():
    probe, _ = _probe_for(0)
    best, too_large = largest_fitting(probe, 100)
    assert best is None and too_large.value == 1
    probe, _ = _probe_for(10**9)
    best, too_large = largest_fitting(probe, 100)
    assert best.value == 100 and too_large is None
    probe, _ = _probe_for(99)
    best, too_large = largest_fitting(probe, 100)
    assert (best.value, too_large.value) == (99, 100)


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
    assert fits(result.best.estimate, gpu, 0.05) and not fits(
        result.first_too_large.estimate, gpu, 0.05
    )
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
