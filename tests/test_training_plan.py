import pytest

from vramcalc.errors import InvalidPlanError
from vramcalc.training_plan import TrainingPlan, parse_targets


def test_defaults_are_the_recipe():
    plan = TrainingPlan("m")
    assert (plan.method, plan.quant, plan.dtype, plan.rank, plan.lora_alpha, plan.dropout) == (
        "lora",
        "none",
        "bf16",
        8,
        8.0,
        0.0,
    )
    assert plan.attn == "sdpa" and plan.gradient_checkpointing is False
    assert plan.optimizer == "adamw_torch_fused"  # Trainer default with torch >= 2.8


def test_qlora_implies_nf4_and_double_quant():
    plan = TrainingPlan("m", method="qlora")
    assert plan.quant == "nf4" and plan.double_quant and plan.is_kbit


def test_every_problem_is_reported_at_once_naming_flags():
    with pytest.raises(InvalidPlanError) as info:
        TrainingPlan(
            "m", method="qlora", quant="none", rank=0, seq_len=-1, batch_size=0, optimizer="adamw"
        )
    text = str(info.value)
    for flag in ("--method qlora", "--rank", "--seq-len", "--batch-size", "--optimizer"):
        assert flag in text
    assert len(info.value.problems) == 5
    assert "Did you mean 'adamw_8bit', 'adamw_torch'" in text


def test_full_finetuning_cannot_be_quantized():
    with pytest.raises(InvalidPlanError, match="--method full trains every weight"):
        TrainingPlan("m", method="full", quant="nf4")


def test_int8_lora_is_valid():
    assert TrainingPlan("m", method="lora", quant="int8").is_kbit


@pytest.mark.parametrize("value", [True, 1.5, "8"])
def test_rank_must_be_a_real_integer(value):
    with pytest.raises(InvalidPlanError, match="--rank must be a positive integer"):
        TrainingPlan("m", rank=value)


def test_round_trip_through_dict():
    plan = TrainingPlan("m", method="qlora", rank=16, targets=("q_proj", "v_proj"), seq_len=512)
    again = TrainingPlan.from_dict(plan.to_dict())
    assert again == plan


def test_from_dict_rejects_unknown_fields_with_suggestion():
    with pytest.raises(InvalidPlanError, match="unknown plan field 'rnk'.*'rank'"):
        TrainingPlan.from_dict({"model": "m", "rnk": 4})


def test_parse_targets():
    assert parse_targets("q_proj, v_proj") == ("q_proj", "v_proj")
    assert parse_targets("") is None and parse_targets("default") is None
    with pytest.raises(InvalidPlanError, match="all-linear cannot be combined"):
        TrainingPlan("m", targets=("all-linear", "q_proj"))
