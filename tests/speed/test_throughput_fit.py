"""The fit of the speed constants: recovers known constants from records they generated, uses
the calibration split only, and leaves out what the planner does not predict."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from tests.conftest import TINY_LLAMA
from vramcalc.catalog import find_gpu
from vramcalc.errors import VramcalcError
from vramcalc.inventory import build_inventory
from vramcalc.speed.throughput import CONSTANTS, Peaks, ThroughputCalibration, plan_work, price
from vramcalc.speed.throughput_fit import (
    FITTED,
    compare_records,
    excluded_reason,
    fit_throughput,
)
from vramcalc.training_plan import TrainingPlan

SMALL_LLAMA = dict(
    TINY_LLAMA,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
)
CONFIGS = {"tiny": TINY_LLAMA, "small": SMALL_LLAMA}
TRUTH = ThroughputCalibration(
    compute_efficiency=0.7,
    fp32_efficiency=0.45,
    attention_efficiency=0.35,
    bandwidth_efficiency=0.8,
    kernel_seconds=4e-6,
    python_call_seconds=1.2e-5,
    dispatch_seconds=8e-6,
    bnb_tensor_seconds=9e-5,
    step_overhead_seconds=0.012,
    measured_on=("H200",),
)
_WORK: dict = {}


def work_for(plan: TrainingPlan):
    if plan not in _WORK:
        config = CONFIGS[plan.model]
        _WORK[plan] = plan_work(config, build_inventory(config, plan, use_cache=False), plan)
    return _WORK[plan]


def synthetic_records(truth=TRUTH):
    """Records whose step times the constants ``truth`` give exactly: host-bound and GPU-bound
    sizes, int8 (fp32 matmuls), a bitsandbytes optimizer, two GPUs."""
    records = []
    recipes = [
        {"method": "full"},
        {"method": "lora", "rank": 8},
        {"method": "qlora", "rank": 8},
        {"method": "lora", "quant": "int8", "rank": 8, "gradient_checkpointing": False},
        {"method": "lora", "rank": 8, "optimizer": "adamw_8bit"},
    ]
    grid = itertools.product(CONFIGS, recipes, ((64, 1), (2048, 16)), ("H200", "A100-80GB"))
    for i, (model, recipe, (seq, batch), gpu_name) in enumerate(grid):
        plan = TrainingPlan(model, seq_len=seq, batch_size=batch, **recipe)
        work = work_for(plan)
        step = price(work.step, Peaks.of(find_gpu(gpu_name), plan, work.step), truth).step_seconds
        records.append(
            plan.to_dict()
            | {
                "case_id": f"case{i}",
                "split": "calibration",
                "status": "ok",
                "recipe": "trainer",
                "gpu_name": gpu_name,
                "step_seconds": step,
                "tokens_per_second": seq * batch / step,
                "source_file": "synthetic.jsonl",
            }
        )
    return records


@pytest.fixture(scope="module")
def records():
    return synthetic_records()


def test_fit_recovers_known_constants(records):
    start = replace(TRUTH, **{n: 1.7 * getattr(TRUTH, n) for n in FITTED}, measured_on=())
    noise = [  # none of these may move the fit
        dict(records[0], case_id="val", split="validation", step_seconds=99.0),
        dict(records[1], case_id="oom", status="oom", step_seconds=None),
        dict(records[2], case_id="loop", recipe="loop", step_seconds=99.0),
        dict(records[3], case_id="traced", record_trace=True, step_seconds=99.0),
    ]
    fit = fit_throughput(records + noise, prior=start, work_for=work_for)
    for name in CONSTANTS:
        assert getattr(fit.calibration, name) == pytest.approx(getattr(TRUTH, name), rel=2e-3), name
    assert fit.median_abs_error < 1e-3
    assert fit.calibration.measured_on == ("A100-80GB", "H200")
    assert len(fit.cases) == len(records)
    assert fit.skipped == (
        "oom: status 'oom'",
        "loop: recipe 'loop': the planner models HF Trainer",
        "traced: allocator history recording on (record_trace): host time perturbed",
    )
    assert fit.calibration.fitted_on["cases"][0].startswith("synthetic.jsonl:case")
    assert fit.calibration.sources["throughput_compute_efficiency"].startswith("fitted ")
    # the FlashAttention efficiency is not fitted: it keeps its value and source
    assert fit.calibration.attention_efficiency == start.attention_efficiency
    assert "attention_efficiency" not in FITTED


def test_fit_with_nothing_usable_raises(records):
    broken = [dict(r, status="error") for r in records[:2]]
    with pytest.raises(VramcalcError, match="no usable 'calibration' measurements"):
        fit_throughput(broken, work_for=work_for)


def test_compare_records_reports_tokens_per_second_error(records):
    rows = compare_records(records, TRUTH, work_for=work_for)
    assert len(rows) == len(records)
    assert max(abs(r["tokens_per_second_error"]) for r in rows) < 1e-9
    assert {r["bound"] for r in rows} >= {"host", "compute"}
    slow = replace(TRUTH, step_overhead_seconds=0.05)
    row = compare_records(records[:1], slow, work_for=work_for)[0]
    assert row["predicted_tokens_per_second"] < row["measured_tokens_per_second"]
    assert row["tokens_per_second_error"] == pytest.approx(
        row["predicted_tokens_per_second"] / row["measured_tokens_per_second"] - 1
    )


def test_excluded_reasons():
    ok = {"status": "ok", "step_seconds": 1.0}
    assert excluded_reason(ok) is None
    assert excluded_reason({**ok, "recipe": "trainer"}) is None
    assert excluded_reason({**ok, "status": "oom"}) == "status 'oom'"
    assert excluded_reason({"status": "ok"}) == "no step_seconds or tokens_per_second"
