"""Run length -> optimizer steps, wall time, GPU-hours and dollars; flag-naming errors."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from tests.conftest import TINY_LLAMA
from vramcalc.catalog import Gpu, find_gpu
from vramcalc.errors import InvalidPlanError
from vramcalc.inventory import build_inventory
from vramcalc.render.plan import render_cost
from vramcalc.render.tables import format_duration
from vramcalc.speed.cost import (
    COLUMN_PREFIXES,
    RunLength,
    check_price,
    cost_table,
    estimate_cost,
    throughput_columns,
)
from vramcalc.speed.throughput import (
    PlanSpeed,
    ThroughputCalibration,
    estimate_throughput,
    plan_work,
)
from vramcalc.training_plan import TrainingPlan

GPU = Gpu(
    "Test", (), "test", 80 * 2**30, 100.0, 100.0, 1000.0, 2.5, "test cloud on-demand", "2026-01-01"
)
GPU = replace(GPU, interconnect="pcie", pcie_bidir_gbps=64.0)  # multi-GPU plans need a link
UNPRICED = replace(GPU, name="Unpriced", price_per_hour_usd=None, price_source="", price_date="")
# a card the catalog could list without a published dense TFLOP/s: its speed cannot be predicted
NO_SPEED = replace(
    GPU, name="NoSpeed", memory_bytes=24 * 2**30, bf16_dense_tflops=None, fp16_dense_tflops=None
)
CAL = ThroughputCalibration(
    compute_efficiency=0.5,
    fp32_efficiency=0.3,
    attention_efficiency=0.4,
    bandwidth_efficiency=0.5,
    kernel_seconds=1e-6,
    python_call_seconds=1e-5,
    dispatch_seconds=2e-6,
    bnb_tensor_seconds=1e-4,
    step_overhead_seconds=0.01,
)


def tiny_throughput(gpu=GPU, **fields):
    plan = TrainingPlan("tiny", **{"method": "lora", "seq_len": 32, "batch_size": 2, **fields})
    work = plan_work(TINY_LLAMA, build_inventory(TINY_LLAMA, plan, use_cache=False), plan)
    return work, plan, estimate_throughput(work, gpu, CAL)


def test_steps_from_dataset_tokens_and_epochs():
    plan = TrainingPlan("m", seq_len=512, batch_size=4, grad_accum=8, num_gpus=2)
    # 1,000,000 tokens / 512 = 1953.1 -> 1954 sequences; / (4 x 2 GPUs) -> 245 micro-batches;
    # / 8 accumulation -> 31 steps per epoch; x 2.5 epochs = 77.5 -> 78 (Trainer's ceil)
    run = RunLength(dataset_tokens=1_000_000, epochs=2.5)
    assert run.optimizer_steps(plan) == 78
    assert RunLength(dataset_tokens=1_000_000).optimizer_steps(plan) == 31  # one epoch by default
    assert RunLength(dataset_tokens=1).optimizer_steps(plan) == 1
    assert RunLength(steps=500).optimizer_steps(plan) == 500
    assert "78 optimizer steps of 32,768 tokens" in run.describe(plan)


def test_cost_arithmetic():
    _, plan, throughput = tiny_throughput(num_gpus=2)
    run = RunLength(dataset_tokens=64_000, epochs=2)
    cost = estimate_cost(throughput, run)
    # 64,000 / 32 = 2,000 sequences; / (2 x 2) = 500 micro-batches = 500 steps per epoch; x 2
    assert cost.steps == 1_000
    assert cost.tokens_per_step == 32 * 2 * 2
    assert cost.wall_seconds == pytest.approx(1_000 * throughput.step_seconds)
    assert cost.gpu_hours == pytest.approx(cost.wall_seconds / 3600 * 2)
    assert cost.price_per_hour_usd == 2.5
    assert cost.cost_usd == pytest.approx(cost.gpu_hours * 2.5)
    assert cost.price_source == "test cloud on-demand (2026-01-01)"
    data = cost.to_dict()
    assert data["cost_usd"] == cost.cost_usd
    assert data["efficiency_measured_on"] == "prior, no measurement"
    assert data["bound"] in ("compute", "memory", "host") and data["measured"] is False


def test_price_override_and_missing_price():
    _, _, throughput = tiny_throughput()
    cost = estimate_cost(throughput, RunLength(steps=3600), price_per_hour_usd=10)
    assert cost.price_source == "--price-per-hour"
    assert cost.cost_usd == pytest.approx(cost.gpu_hours * 10)
    _, _, unpriced = tiny_throughput(UNPRICED)
    cost = estimate_cost(unpriced, RunLength(steps=10))
    assert cost.cost_usd is None and cost.price_per_hour_usd is None
    assert "--price-per-hour" in cost.price_source and cost.wall_seconds > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give --dataset-tokens (with --epochs, default 1) or --steps"),
        (
            {"dataset_tokens": 10, "steps": 5},
            "--dataset-tokens and --steps both set the run length",
        ),
        (
            {"dataset_tokens": 0},
            "--dataset-tokens must be a positive whole number of tokens, got 0.",
        ),
        ({"dataset_tokens": 1.5}, "--dataset-tokens must be a positive whole number"),
        ({"dataset_tokens": True}, "--dataset-tokens must be a positive whole number"),
        ({"dataset_tokens": 10, "epochs": 0}, "--epochs must be a positive number, got 0."),
        ({"dataset_tokens": 10, "epochs": math.inf}, "--epochs must be a positive number"),
        (
            {"steps": 5, "epochs": 2},
            "--epochs counts passes over --dataset-tokens; with --steps leave it out.",
        ),
        ({"steps": -1}, "--steps must be a positive whole number, got -1."),
    ],
)
def test_run_length_errors_name_the_flag(kwargs, message):
    with pytest.raises(InvalidPlanError) as info:
        RunLength(**kwargs)
    assert any(message in problem for problem in info.value.problems)


def test_run_length_reports_every_problem_at_once():
    with pytest.raises(InvalidPlanError) as info:
        RunLength(dataset_tokens=-5, epochs=-1)
    text = str(info.value)
    assert "--dataset-tokens" in text and "--epochs" in text and len(info.value.problems) == 2


@pytest.mark.parametrize("price", [0, -1.0, math.nan, "3"])
def test_bad_price_names_the_flag(price):
    with pytest.raises(
        InvalidPlanError, match="--price-per-hour must be a positive number of USD per GPU-hour"
    ):
        check_price(price)
    _, _, throughput = tiny_throughput()
    with pytest.raises(InvalidPlanError, match="--price-per-hour"):
        estimate_cost(throughput, RunLength(steps=1), price_per_hour_usd=price)


def test_cost_table_across_gpus_with_skipped_rows_and_sweep_columns():
    work, plan, _ = tiny_throughput()
    gpus = [GPU, UNPRICED, NO_SPEED, find_gpu("H100")]
    table = cost_table(work, gpus, RunLength(steps=100), calibration=CAL)
    assert [row.gpu_name for row in table.rows] == ["Test", "Unpriced", "H100-80GB"]
    assert table.skipped[0][0] == "NoSpeed" and "no dense bf16" in table.skipped[0][1]
    columns = table.columns()
    assert columns["optimizer_steps"] == 100
    for prefix in COLUMN_PREFIXES:
        assert f"{prefix}_Test" in columns and columns[f"{prefix}_NoSpeed"] is None
    assert columns["cost_usd_Unpriced"] is None
    assert columns["cost_usd_Test"] == pytest.approx(table.rows[0].cost_usd)
    data = table.to_dict()
    assert data["run"]["optimizer_steps"] == 100 and data["skipped"][0]["gpu"] == "NoSpeed"
    text = render_cost(table)
    lines = text.splitlines()
    assert lines[0] == "run: 100 optimizer steps of 64 tokens (--steps)"
    assert lines[1].split() == [
        "GPU",
        "tokens/s",
        "step",
        "s",
        "MFU",
        "bound",
        "wall",
        "time",
        "GPU-hours",
        "$/GPU-h",
        "cost",
        "$",
    ]
    # one line per GPU, smallest memory first; every '-' is explained under the table
    assert [line.split()[0] for line in lines[3:7]] == ["H100-80GB", "Test", "Unpriced", "NoSpeed"]
    assert lines[6].split() == ["NoSpeed", "-", "-", "-", "-", "-", "-", "-", "-"]
    h100 = table.rows[2].throughput
    assert lines[3].split()[1:5] == [
        f"{h100.tokens_per_second:,.0f}",
        f"{h100.step_seconds:.2f}",
        f"{100 * h100.mfu:.0f}",
        "%",
    ]
    assert lines[3].split()[-2:] == ["4.29", f"{table.rows[2].cost_usd:,.2f}"]
    assert lines[5].split()[-2:] == ["-", "-"]
    assert lines[7:] == [
        "  Unpriced: cost '-': no price for Unpriced in data/gpus.csv; pass --price-per-hour",
        "  NoSpeed: not priced: data/gpus.csv lists no dense bf16 TFLOP/s for NoSpeed; its speed "
        "cannot be predicted.",
    ]
    verbose = render_cost(table, verbose=True)
    assert "  price Test: test cloud on-demand (2026-01-01)" in verbose.splitlines()
    assert "speed constants: prior, no measurement" in verbose
    assert "price Test" not in text and "speed constants" not in text


def test_throughput_columns_without_a_run_length():
    work, _, throughput = tiny_throughput()
    columns = throughput_columns(PlanSpeed(work.plan, work, None), [GPU, NO_SPEED], CAL)
    assert columns == {
        "tokens_per_second_Test": throughput.tokens_per_second,
        "tokens_per_second_all_gpus_Test": throughput.tokens_per_second,
        "step_seconds_Test": throughput.step_seconds,
        "mfu_Test": throughput.mfu,
        "bound_Test": throughput.bound,
        "speed_measured_Test": False,
        "tokens_per_second_NoSpeed": None,
        "tokens_per_second_all_gpus_NoSpeed": None,
        "step_seconds_NoSpeed": None,
        "mfu_NoSpeed": None,
        "bound_NoSpeed": None,
        "speed_measured_NoSpeed": None,
    }
    untraced = PlanSpeed(work.plan, None, "the step could not be traced")
    assert throughput_columns(untraced, [GPU], CAL) == dict.fromkeys(
        ("tokens_per_second_Test", "tokens_per_second_all_gpus_Test", "step_seconds_Test")
        + ("mfu_Test", "bound_Test", "speed_measured_Test")
    )


def test_format_duration():
    assert format_duration(59) == "59 s"
    assert format_duration(600) == "10.0 min"
    assert format_duration(3 * 3600) == "3.0 h"
    assert format_duration(3 * 86400) == "3.0 d"
