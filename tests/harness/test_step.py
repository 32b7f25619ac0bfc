"""Recipes on CPU: optimizer mapping, synthetic batches, Trainer and loop step timing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.training_args import OptimizerNames

from vramcalc.training_plan import OPTIMIZERS, TrainingPlan
from vramcalc_harness.build import build_model, prepare_checkpoint
from vramcalc_harness.scenario import Case
from vramcalc_harness.step import (
    OPTIM_NAMES,
    SyntheticTokens,
    compute_dtype_for,
    cpu_bf16_works,
    run_loop,
    run_trainer,
    training_arguments,
)
from vramcalc_harness.worker import run_case

TINY_LLAMA = str(Path(__file__).parent / "cases" / "tiny-llama")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("scratch")


def lora_case(**changes):
    plan = TrainingPlan(model=TINY_LLAMA, method="lora", seq_len=16, batch_size=2, **changes)
    return Case(plan, steps=2, warmup_steps=1, split="calibration")


def test_every_plan_optimizer_maps_to_a_trainer_optim():
    assert set(OPTIM_NAMES) == set(OPTIMIZERS)
    valid = {o.value for o in OptimizerNames}
    assert all(optim in valid for optim, _ in OPTIM_NAMES.values())
    assert OPTIM_NAMES["sgd_momentum"] == ("sgd", "momentum=0.9")


def test_training_arguments_follow_the_plan(tmp_path):
    case = Case(
        TrainingPlan(
            model="m",
            batch_size=3,
            grad_accum=4,
            gradient_checkpointing=True,
            optimizer="sgd_momentum",
        ),
        steps=3,
        warmup_steps=2,
        seed=5,
    )
    args = training_arguments(case, "cpu", "fp32", str(tmp_path))
    assert (args.max_steps, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (
        5,
        3,
        4,
    )
    assert args.optim == "sgd" and args.optim_args == "momentum=0.9"
    assert args.gradient_checkpointing is True
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert args.bf16 is False and args.fp16 is False and args.seed == 5
    assert args.report_to == [] and args.save_strategy == "no"


def test_synthetic_tokens_are_exact_length_seeded_and_labelled():
    data = SyntheticTokens(num_samples=4, seq_len=12, vocab_size=50, seed=3)
    item = data[1]
    assert item["input_ids"].shape == (12,) and item["input_ids"].dtype == torch.long
    assert torch.equal(item["input_ids"], item["labels"])
    assert torch.equal(item["input_ids"], SyntheticTokens(4, 12, 50, 3)[1]["input_ids"])
    assert not torch.equal(item["input_ids"], data[2]["input_ids"])
    assert int(item["input_ids"].max()) < 50 and len(data) == 4


def test_cpu_compute_dtype_is_bf16_only_when_it_works():
    expected = "bf16" if cpu_bf16_works() else "fp32"
    assert compute_dtype_for(lora_case(), "cpu") == expected


def test_loop_recipe_times_each_step_with_momentum_sgd(scratch):
    case = lora_case(optimizer="sgd_momentum", gradient_checkpointing=True, grad_accum=2)
    built = build_model(case.plan, prepare_checkpoint(case.plan, scratch, "cpu"), "cpu")
    marks = []
    result = run_loop(
        built.model,
        case,
        "cpu",
        compute_dtype_for(case, "cpu"),
        on_warmup_end=lambda: marks.append(len(marks)),
    )
    assert marks == [0]  # the memory tracker restarts its peaks once, after warm-up
    assert len(result.step_seconds_all) == 3 and len(result.step_seconds_measured) == 2
    assert result.step_seconds > 0 and result.optimizer_class == "SGD"


def test_trainer_recipe_times_each_step(scratch):
    case = lora_case(optimizer="sgd_momentum", grad_accum=2)
    built = build_model(case.plan, prepare_checkpoint(case.plan, scratch, "cpu"), "cpu")
    marks = []
    result = run_trainer(
        built.model,
        case,
        "cpu",
        compute_dtype_for(case, "cpu"),
        on_warmup_end=lambda: marks.append(len(marks)),
    )
    assert marks == [0]
    assert len(result.step_seconds_all) == 3
    assert all(s > 0 for s in result.step_seconds_all)
    assert result.optimizer_class == "SGD"


def test_worker_records_an_ordinary_failure_as_error_in_process(scratch):
    case = Case(lora_case().plan, steps=1, warmup_steps=0, split="validation", simulate="error")
    record = run_case(case, "cpu", prepare_checkpoint(case.plan, scratch, "cpu"))
    assert record["status"] == "error"
    assert record["error"].startswith("RuntimeError: simulated failure (harness test hook)")
    assert "traceback (last lines):" in record["error"]
    assert record["trainable_params"] == 3584  # built before it failed
    assert record["step_seconds"] is None and record["peak_allocated_bytes"] is None
