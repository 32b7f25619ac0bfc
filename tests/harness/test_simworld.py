"""A simulated world on CPU: rank 0 of an N-GPU FSDP / DDP run alone on a fake process group.

One ``vramcalc measure`` run (one random-init checkpoint, one process per case) of the tiny
Llama: FSDP at N = 2 and 4 (FSDP2 ``fully_shard`` in the loop: accelerate runs no FSDP on
CPU) and DDP at N = 2 through HF Trainer with the pass-through comm hook. The tiny model's
rows divide by 4, so rank 0's shards are exactly 1/N of every parameter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from vramcalc.measurements import plan_of
from vramcalc.speed.throughput_fit import excluded_reason
from vramcalc.training_plan import TrainingPlan
from vramcalc_harness import distributed
from vramcalc_harness.caselist import load_cases
from vramcalc_harness.cli import measure
from vramcalc_harness.errors import CaseError, HarnessError, MissingDependencyError
from vramcalc_harness.record import RECORD_FIELDS, read_records
from vramcalc_harness.scenario import SIMULATED_WORLD_LIMITS, Case, simulated
from vramcalc_harness.simworld import check_simulated_machine, wrapper_name

TINY_LLAMA = str(Path(__file__).parent / "cases" / "tiny-llama")
TINY_PARAMS = 106816  # tiny-llama, every weight trained
BF16 = 2
SMALL = {
    "model": TINY_LLAMA,
    "method": "full",
    "optimizer": "adamw_torch",
    "seq_len": 16,
    "batch_size": 2,
    "steps": 1,
    "warmup_steps": 1,
    "split": "calibration",
}
CASES = [
    {**SMALL, "strategy": "fsdp", "simulate_world": 2, "recipe": "loop"},
    {**SMALL, "strategy": "fsdp", "simulate_world": 4, "recipe": "loop"},
    {**SMALL, "strategy": "ddp", "simulate_world": 2},  # HF Trainer
    {**SMALL, "strategy": "fsdp", "simulate_world": 2},  # Trainer + FSDP: needs CUDA
]


# -- the case field ---------------------------------------------------------------------------------
def test_simulate_world_sets_num_gpus_and_is_part_of_the_case_id():
    case = Case.from_dict({**SMALL, "strategy": "fsdp", "simulate_world": 4})
    assert (case.plan.num_gpus, case.simulate_world) == (4, 4)
    real = Case.from_dict({**SMALL, "strategy": "fsdp", "num_gpus": 4})
    assert real.simulate_world is None and real.case_id != case.case_id
    assert Case.from_dict(case.to_dict()) == case
    assert simulated(Case.from_dict(SMALL), 4) == Case.from_dict(
        {**SMALL, "strategy": "ddp", "simulate_world": 4}
    )


def test_a_zero_case_runs_in_a_simulated_world_on_cuda_only(monkeypatch):
    case = Case.from_dict({**SMALL, "strategy": "zero3", "simulate_world": 2})
    assert (case.plan.strategy, case.plan.num_gpus, case.simulate_world) == ("zero3", 2, 2)
    assert wrapper_name(case, "cuda") == "DeepSpeed ZeRO-3 (accelerate DeepSpeedPlugin, Trainer)"
    monkeypatch.setattr(distributed, "has_deepspeed", lambda: True)
    with pytest.raises(HarnessError, match=r"^simulate_world with strategy zero3 needs a CUDA GPU"):
        check_simulated_machine(case, "cpu")
    check_simulated_machine(case, "cuda")  # no error: DeepSpeed is there
    monkeypatch.setattr(distributed, "has_deepspeed", lambda: False)
    with pytest.raises(MissingDependencyError, match=r"^--strategy zero3 needs deepspeed"):
        check_simulated_machine(case, "cuda")


def test_simulate_world_problems_name_the_field():
    with pytest.raises(CaseError) as err:
        Case.from_dict({**SMALL, "num_gpus": 2, "simulate_world": 4})
    assert err.value.problems == [
        "case: simulate_world 4 needs num_gpus 4 (the plan it measures), got num_gpus 2."
    ]
    with pytest.raises(CaseError) as err:
        Case.from_dict({**SMALL, "simulate_world": 1})
    assert err.value.problems == [
        "case: simulate_world must be an integer >= 2 (GPUs in the world), got 1."
    ]


def test_simulate_world_option_turns_every_case_into_rank_0_of_n(tmp_path):
    cases_path = tmp_path / "c.yaml"
    cases_path.write_text(yaml.safe_dump({"cases": [SMALL]}))
    args = [str(cases_path), "-o", str(tmp_path / "o.jsonl"), "--device", "cpu", "--dry-run"]
    result = CliRunner().invoke(measure, [*args, "--simulate-world", "4"])
    assert result.exit_code == 0, result.output
    assert "gpus 4 ddp simulated" in result.output
    result = CliRunner().invoke(measure, [*args, "--simulate-world", "1"])
    assert result.exit_code == 2 and "--simulate-world" in result.output


# -- a run on CPU -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def records(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("simworld")
    cases_path = scratch / "cases.yaml"
    cases_path.write_text(yaml.safe_dump({"cases": CASES}))
    output = scratch / "out.jsonl"
    args = [str(cases_path), "-o", str(output), "--device", "cpu", "--scratch", str(scratch)]
    result = CliRunner().invoke(measure, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    by_id = {r["case_id"]: r for r in read_records(output)}
    return [by_id[case.case_id] for case in load_cases(cases_path)]


def test_every_record_says_it_is_a_simulated_world(records):
    for record, case in zip(records, CASES, strict=True):
        assert list(record)[: len(RECORD_FIELDS)] == list(RECORD_FIELDS)
        assert record["simulated_world_size"] == record["num_gpus"] == case["simulate_world"]
        assert record["simulated_world_limits"] == list(SIMULATED_WORLD_LIMITS)
        assert record["strategy"] == case["strategy"]
        assert record["per_rank"] is None and record["tokens_per_second_all_gpus"] is None
        # the memory report estimates the plan of N GPUs; the speed fit leaves it out
        plan = plan_of(record)
        assert (plan.num_gpus, plan.strategy) == (case["simulate_world"], case["strategy"])
        assert excluded_reason(record) in (
            "simulated world (rank 0 alone on a fake process group): not a speed measurement",
            "status 'error'",
        )


@pytest.mark.parametrize("index, world", [(0, 2), (1, 4)])
def test_fsdp_rank_0_holds_1_over_n_of_parameters_gradients_and_optimizer_states(
    records, index, world
):
    record = records[index]
    assert (record["status"], record["error"]) == ("ok", None)
    assert record["simulated_world_wrapper"] == "FSDP2 (torch fully_shard, CPU)"
    assert record["trainable_params"] == record["total_params"] == TINY_PARAMS
    full = TINY_PARAMS * BF16
    assert record["rank_parameter_bytes"] == full // world
    assert record["rank_gradient_bytes"] == full // world
    assert record["rank_optimizer_state_bytes"] == 2 * full // world  # AdamW: 2 states
    assert record["distributed_config"] is None  # no accelerate on CPU for FSDP


def test_ddp_runs_trainer_with_the_pass_through_hook_and_replicates_everything(records):
    record = records[2]
    assert (record["status"], record["error"]) == ("ok", None)
    assert record["simulated_world_wrapper"] == "DDP (accelerate) + pass-through comm hook"
    full = TINY_PARAMS * BF16
    assert (record["rank_parameter_bytes"], record["rank_gradient_bytes"]) == (full, full)
    assert record["rank_optimizer_state_bytes"] == 2 * full
    assert record["distributed_config"]["accelerate"]["distributed_type"] == "MULTI_GPU"
    assert record["tokens_per_second"] > 0  # rank 0's own; not a speed measurement


def test_fsdp_under_trainer_on_cpu_is_refused_before_any_process_starts(records):
    record = records[3]
    assert record["status"] == "error"
    assert record["error"] == (
        "simulate_world on CPU runs strategy fsdp as FSDP2 fully_shard in recipe loop "
        "(accelerate runs no FSDP on CPU); use recipe loop or --device cuda."
    )


def test_multi_gpu_plans_say_what_backs_their_per_gpu_memory():
    from vramcalc.estimate import MULTI_GPU_EVIDENCE, prepare

    plan = TrainingPlan(model=TINY_LLAMA, num_gpus=2, strategy="fsdp")
    assert MULTI_GPU_EVIDENCE in prepare(plan.model, plan).estimate(plan).assumptions
    single = TrainingPlan(model=TINY_LLAMA)
    assert MULTI_GPU_EVIDENCE not in prepare(single.model, single).estimate(single).assumptions
