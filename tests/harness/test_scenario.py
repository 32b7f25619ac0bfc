"""Case files: YAML (cases, grids, defaults), CSV, validation naming the field, case ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from vramcalc.training_plan import TrainingPlan
from vramcalc_harness.caselist import (
    cases_from_csv_rows,
    cases_from_yaml_data,
    load_cases,
    select_split,
)
from vramcalc_harness.errors import CaseError
from vramcalc_harness.scenario import Case

FIXTURES = Path(__file__).parent / "cases"


def test_yaml_cases_defaults_and_grids_expand_to_the_cross_product():
    cases = load_cases(FIXTURES / "grid.yaml")
    assert len(cases) == 2 + 2 * 3 * 2 + 2 * 2
    first = cases[0]
    assert first.plan.model == "meta-llama/Llama-3.2-1B"
    assert first.plan.targets == ("q_proj", "v_proj")
    assert (first.steps, first.warmup_steps, first.split, first.recipe) == (
        3,
        2,
        "calibration",
        "trainer",
    )
    assert cases[1].recipe == "loop" and cases[1].split == "validation"
    grid = cases[2:14]
    assert {(c.plan.method, c.plan.rank, c.plan.targets) for c in grid} == {
        (m, r, t)
        for m in ("lora", "qlora")
        for r in (8, 16, 64)
        for t in (("q_proj", "v_proj"), ("all-linear",))
    }
    assert all(c.plan.seq_len == 1024 and c.split == "calibration" for c in grid)
    assert [c.plan.quant for c in grid[:6]] == ["none"] * 6
    assert [c.plan.quant for c in grid[6:]] == ["nf4"] * 6
    last = cases[14:]
    assert [(c.plan.model, c.plan.gradient_checkpointing) for c in last] == [
        ("google/gemma-2-2b", True),
        ("google/gemma-2-2b", False),
        ("Qwen/Qwen2.5-1.5B", True),
        ("Qwen/Qwen2.5-1.5B", False),
    ]
    assert len(select_split(cases, "validation")) == 1 + 4
    assert len(select_split(cases, None)) == len(cases)


def test_yaml_list_form_is_a_list_of_cases():
    cases = cases_from_yaml_data([{"model": "m", "split": "validation", "rank": 4}])
    assert cases[0].plan == TrainingPlan(model="m", rank=4)
    assert cases[0].split == "validation"


def test_csv_rows_parse_types_and_empty_cells_mean_defaults():
    cases = load_cases(FIXTURES / "cases.csv")
    assert len(cases) == 3
    one, two, three = cases
    assert one.plan.targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert (one.plan.rank, one.plan.seq_len, one.plan.batch_size) == (16, 2048, 4)
    assert one.plan.gradient_checkpointing is True
    assert two.plan.quant == "int8" and two.plan.targets is None
    assert (two.steps, two.warmup_steps, two.recipe, two.split) == (3, 2, "loop", "validation")
    assert three.plan.method == "full" and three.plan.gradient_checkpointing is False
    assert (three.steps, three.warmup_steps, three.recipe) == (2, 1, "trainer")


def test_every_problem_of_a_yaml_file_is_reported_naming_case_and_field():
    with pytest.raises(CaseError) as info:
        load_cases(FIXTURES / "bad.yaml")
    assert info.value.problems == [
        "bad.yaml grids[0]: rank has an empty list of options.",
        "bad.yaml cases[0]: unknown field 'rnak'. Did you mean 'rank'?",
        "bad.yaml cases[1]: --rank must be a positive integer, got -1.",
        "bad.yaml cases[1]: steps must be a positive integer, got 0.",
        "bad.yaml cases[1]: split 'testing' is not one of calibration, validation.",
        "bad.yaml cases[2]: split is missing; give calibration or validation "
        "(per case, per grid, or in defaults).",
    ]


def test_case_fields_are_validated_together_with_the_plan():
    with pytest.raises(CaseError) as info:
        cases_from_yaml_data(
            [
                {
                    "model": "m",
                    "split": "testing",
                    "steps": 0,
                    "rank": -1,
                    "recipe": "keras",
                    "num_gpus": 2,
                }
            ]
        )
    text = str(info.value)
    for expected in (
        "--rank must be a positive integer, got -1",
        "steps must be a positive integer, got 0",
        "split 'testing' is not one of calibration, validation",
        "recipe 'keras' is not one of trainer, loop",
    ):
        assert expected in text
    (two_gpus,) = cases_from_yaml_data(
        [{"model": "m", "split": "calibration", "num_gpus": 2, "strategy": "fsdp"}]
    )
    assert (two_gpus.plan.num_gpus, two_gpus.plan.strategy) == (2, "fsdp")


def test_multi_gpu_cases_the_harness_cannot_run_are_rejected_with_a_fix():
    with pytest.raises(CaseError) as info:
        cases_from_yaml_data(
            [
                {
                    "model": "m",
                    "split": "calibration",
                    "num_gpus": 2,
                    "strategy": "fsdp",
                    "method": "lora",
                    "quant": "int8",
                },
                {
                    "model": "m",
                    "split": "calibration",
                    "num_gpus": 2,
                    "strategy": "zero3",
                    "recipe": "loop",
                },
                {"model": "m", "split": "calibration", "strategy": "fsdp", "cpu_offload": True},
            ]
        )
    assert info.value.problems == [
        "input cases[0]: quant int8 cannot be sharded by strategy fsdp (bitsandbytes keeps int8 "
        "weights in its own tensor type); use strategy ddp, zero1 or zero2, or quant nf4.",
        "input cases[1]: recipe loop runs strategies ddp, fsdp and fsdp-grad-op; use recipe "
        "trainer for zero3.",
        "input cases[2]: --cpu-offload needs --num-gpus > 1 with --strategy fsdp, fsdp-grad-op "
        "or zero1/2/3.",
    ]


def test_csv_bad_cells_name_line_and_field():
    with pytest.raises(CaseError) as info:
        load_cases(FIXTURES / "bad.csv")
    assert info.value.problems == [
        "bad.csv line 2: rank must be an integer, got 'eight'.",
        "bad.csv line 2: gradient_checkpointing must be true or false, got 'maybe'.",
    ]


def test_yaml_booleans_must_be_booleans():
    with pytest.raises(
        CaseError, match="gradient_checkpointing must be true or false, got 'yes please'"
    ):
        cases_from_yaml_data(
            [{"model": "m", "split": "calibration", "gradient_checkpointing": "yes please"}]
        )


def test_duplicate_cases_and_empty_files_are_errors(tmp_path):
    with pytest.raises(CaseError, match=r"input cases\[1\]: repeats input cases\[0\]"):
        cases_from_yaml_data(
            {
                "cases": [
                    {"model": "m", "split": "calibration"},
                    {"model": "m", "split": "validation"},
                ]
            },
        )
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(CaseError, match="holds no cases"):
        load_cases(empty)
    with pytest.raises(CaseError, match="must end in .yaml, .yml or .csv"):
        load_cases(FIXTURES / "tiny-llama" / "config.json")
    with pytest.raises(CaseError, match="does not exist"):
        load_cases(tmp_path / "missing.yaml")
    with pytest.raises(CaseError, match="unknown top-level key 'case'"):
        cases_from_yaml_data({"case": []})


def test_case_id_is_the_hash_of_plan_steps_seed_recipe_only():
    base = Case(TrainingPlan(model="m"), steps=3, warmup_steps=2, seed=0, split="calibration")
    assert len(base.case_id) == 16
    relabelled = Case(
        TrainingPlan(model="m"), steps=3, warmup_steps=2, seed=0, split="validation", timeout_s=5
    )
    assert relabelled.case_id == base.case_id
    for other in (
        Case(TrainingPlan(model="m", rank=16)),
        Case(TrainingPlan(model="m"), steps=4),
        Case(TrainingPlan(model="m"), seed=1),
        Case(TrainingPlan(model="m"), recipe="loop"),
        Case(TrainingPlan(model="m"), simulate="oom"),
    ):
        assert other.case_id != base.case_id
    assert '"plan":{"alpha":8.0' in base.canonical_key()


def test_to_dict_round_trips():
    case = Case(
        TrainingPlan(model="m", method="qlora", targets=("q_proj", "v_proj"), alpha=32),
        steps=5,
        warmup_steps=1,
        seed=7,
        split="validation",
        recipe="loop",
        timeout_s=60.0,
    )
    assert Case.from_dict(case.to_dict()) == case
    assert case.to_dict()["targets"] == ["q_proj", "v_proj"]


def test_csv_default_words_and_extra_cells():
    rows = [{"model": "m", "targets": "default", "quant": "default", "split": "calibration"}]
    (case,) = cases_from_csv_rows(rows, source="rows.csv")
    assert case.plan.targets is None and case.plan.quant == "none"
    with pytest.raises(CaseError, match="rows.csv line 2: more cells than header columns"):
        cases_from_csv_rows(
            [{"model": "m", "split": "calibration", None: ["x"]}], source="rows.csv"
        )
