"""vramcalc.budget: the one headroom parser, the budget, and the one judgement of "fits"."""

from dataclasses import replace

import pytest

from vramcalc.budget import DEFAULT_HEADROOM, budget_bytes, judge, parse_headroom
from vramcalc.catalog import find_gpu
from vramcalc.errors import InvalidPlanError
from vramcalc.training_plan import TrainingPlan


@pytest.mark.parametrize(
    ("text", "fraction"), [("5%", 0.05), ("0.05", 0.05), ("0", 0.0), (" 12.5% ", 0.125), (0.1, 0.1)]
)
def test_parse_headroom(text, fraction):
    assert parse_headroom(text) == pytest.approx(fraction)


@pytest.mark.parametrize("text", ["5", "100%", "-1%", "abc", "1", "nan"])
def test_parse_headroom_rejects_values_outside_zero_to_one(text):
    with pytest.raises(InvalidPlanError, match="--headroom must be a fraction in \\[0, 1\\)"):
        parse_headroom(text)


def test_parse_headroom_hints_at_percent_only_without_one():
    with pytest.raises(InvalidPlanError) as info:
        parse_headroom("5")
    assert info.value.problems == [
        "--headroom must be a fraction in [0, 1) or a percentage such as 5%, got '5' "
        "(did you mean 5%?)."
    ]
    with pytest.raises(InvalidPlanError) as info:
        parse_headroom("150%")
    assert info.value.problems == [
        "--headroom must be a fraction in [0, 1) or a percentage such as 5%, got '150%'."
    ]


def test_budget_is_the_floor_of_memory_times_one_minus_headroom():
    gpu = replace(find_gpu("L4"), memory_bytes=1000)
    assert (
        budget_bytes(gpu, 0.05) == 950
        and budget_bytes(gpu, 0.0555) == 944
        and budget_bytes(gpu, 0) == 1000
    )


def test_judge_is_budget_and_recipe():
    gpu = replace(find_gpu("L4"), memory_bytes=1000)
    assert DEFAULT_HEADROOM == 0.05
    assert judge(950, gpu) == judge(950, gpu, 0.05)
    verdict = judge(950, gpu)
    assert (verdict.fits, verdict.budget_bytes, verdict.margin_bytes, verdict.blocker) == (
        True,
        950,
        0,
        None,
    )
    verdict = judge(951, gpu)
    assert (verdict.fits, verdict.margin_bytes) == (False, -1)
    t4 = replace(find_gpu("T4"), memory_bytes=1000)
    bf16 = TrainingPlan("m")
    assert judge(10, t4).fits  # serving: no recipe to run
    blocked = judge(10, t4, plan=bf16)
    assert not blocked.fits and blocked.margin_bytes == 940
    assert blocked.blocker.startswith("no bf16: T4 has no bf16 tensor cores")
    assert judge(10, t4, plan=bf16.with_(dtype="fp16")).fits
