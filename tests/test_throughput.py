"""Time model, memory traffic, priors, GPU transfer statements and the efficiency fit."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest

from tests.conftest import TINY_LLAMA
from vramcalc.catalog import Gpu, find_gpu
from vramcalc.errors import CatalogError, InvalidPlanError, VramcalcError
from vramcalc.inventory import build_inventory
from vramcalc.memory.overhead import CALIBRATION_JSON
from vramcalc.plan import TrainingPlan
from vramcalc.render import render_throughput
from vramcalc.throughput import (
    ThroughputCalibration,
    efficiency_key,
    estimate_throughput,
    estimate_traffic,
    load_throughput_calibration,
    time_terms,
)
from vramcalc.throughput_fit import compare_records, fit_efficiency

# 0.01 TFLOP/s and 1 GB/s: a made-up GPU that makes the tiny model GPU-bound with round numbers
SLOW_GPU = Gpu("Slow", (), "test", 80 * 2**30, 0.01, 0.01, 1.0, 2.0, "test price", "2026-01-01")
CAL = ThroughputCalibration(
    compute_efficiency={"full": 0.5, "lora": 0.25, "qlora": 0.2, "int8": 0.1},
    bandwidth_efficiency=0.5,
    host_seconds_per_layer_pass=1e-3,
    step_overhead_seconds=0.01,
)
LORA_QV = {"method": "lora", "rank": 4, "targets": ("q_proj", "v_proj"), "optimizer": "adamw_torch"}


def tiny(**fields) -> tuple:
    plan = TrainingPlan(
        "tiny", **{"seq_len": 32, "batch_size": 2, "gradient_checkpointing": False, **fields}
    )
    return build_inventory(TINY_LLAMA, plan, use_cache=False), plan


# -- priors --------------------------------------------------------------------------------------
def test_priors_are_documented_and_not_fitted():
    cal = load_throughput_calibration()
    assert not cal.fitted and cal.measured_on_text == "prior, no measurement"
    assert set(cal.compute_efficiency) == {"full", "lora", "qlora", "int8"}
    assert all(0 < v <= 1 for v in cal.compute_efficiency.values())
    assert 0 < cal.bandwidth_efficiency <= 1
    for key, source in cal.sources.items():
        assert source.startswith("prior"), key


def test_calibration_json_round_trip_keeps_every_throughput_key():
    raw = json.loads(CALIBRATION_JSON.read_text())
    cal = load_throughput_calibration()
    assert set(cal.to_json()) == {k for k in raw if k.startswith("throughput_")}
    assert ThroughputCalibration.from_json(cal.to_json()) == cal


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"method": "full"}, "full"),
        (LORA_QV, "lora"),
        ({"method": "qlora"}, "qlora"),
        ({"method": "lora", "quant": "int8"}, "int8"),
    ],
)
def test_efficiency_key(fields, key):
    assert efficiency_key(TrainingPlan("m", **fields)) == key


# -- memory traffic (hand counts) -------------------------------------------------------------------
def test_int8_dequantizes_in_backward_only():
    inventory, plan = tiny(quant="int8", **LORA_QV)
    # per module: int8 CB read (n) + fp32 SCB per row (512-byte blocks) + CB.to(bf16) write 2n
    # + mul_ read and write 2n each = n + alloc(4·out) + 6n; only backwards that need the input grad
    q = 4096 + 512 + 6 * 4096  # 29,184
    k = v = 2048 + 512 + 6 * 2048  # 14,848
    o = q
    mlp = 8192 + 512 + 6 * 8192  # 57,856 (gate, up, down)
    # layer 0's q, k, v get no input gradient (first-layer rule): one of their two modules
    expected = (q + k + v) * 1 + o * 2 + mlp * 2 * 3
    assert estimate_traffic(inventory, plan).dequant_bytes == expected == 464_384


def test_nf4_dequantizes_in_forward_and_backward():
    inventory, plan = tiny(method="qlora", rank=4, targets=("q_proj", "v_proj"))
    # stored bytes (512-rounded): packed n/2, 16-entry fp32 code, uint8 absmax per 64,
    # fp32 absmax per 256 blocks, 256-entry fp32 map, fp32 offset; + bf16 write 2n
    # + fp32 absmax written and read (8 B per block of 64)
    q = (2048 + 512 + 512 + 512 + 1024 + 512) + 2 * 4096 + 8 * 64  # 13,824
    k = v = (1024 + 512 + 512 + 512 + 1024 + 512) + 2 * 2048 + 8 * 32  # 8,448
    o = q
    mlp = (4096 + 512 + 512 + 512 + 1024 + 512) + 2 * 8192 + 8 * 128  # 24,576
    # passes: forward in both layers; backward where the input grad is needed
    expected = (q + k + v) * (2 + 1) + (o + 3 * mlp) * (2 + 2)
    assert estimate_traffic(inventory, plan).dequant_bytes == expected == 442_368


def test_eager_attention_score_traffic():
    inventory, plan = tiny(attn="eager", **LORA_QV)
    # B·H·S² score elements per layer, 2 layers, 34 B forward + 38 B backward each
    assert estimate_traffic(inventory, plan).attention_score_bytes == 2 * 4 * 32 * 32 * 2 * (
        34 + 38
    )
    inventory, plan = tiny(**LORA_QV)
    assert estimate_traffic(inventory, plan).attention_score_bytes == 0


def test_optimizer_traffic_lora_adamw():
    inventory, plan = tiny(**LORA_QV)
    # fp32 adapters per layer: q A 4x64, q B 64x4, v A 4x64, v B 32x4 = 1,792 params, 7,168 B
    params = grads = 4 * 1_792
    states = 2 * grads
    # read+write params and states, read grads, clip (norm read + scale read/write)
    assert (
        estimate_traffic(inventory, plan).optimizer_bytes
        == 2 * params + grads + 2 * states + 3 * grads
    )
    inventory, plan = tiny(grad_accum=3, **LORA_QV)
    assert (
        estimate_traffic(inventory, plan).optimizer_bytes == 71_680 + 2 * 3 * grads
    )  # accumulation


# -- the time model ---------------------------------------------------------------------------------
def test_step_time_arithmetic_gpu_bound():
    inventory, plan = tiny(**LORA_QV)
    e = estimate_throughput(inventory, plan, SLOW_GPU, CAL)
    compute = 24_535_040 / (0.01e12 * 0.25)  # exact FLOPs (test_flops) / (peak x efficiency)
    optimizer = 71_680 / (1e9 * 0.5)
    host = 1 * 3 * 2 * 1e-3  # passes x layers x seconds: shorter than the GPU work
    assert e.bound == "GPU"
    assert e.seconds["host"] == pytest.approx(host)
    assert e.step_seconds == pytest.approx(compute + optimizer + 0.01)
    assert e.tokens_per_second == pytest.approx(64 / e.step_seconds)
    assert e.mfu == pytest.approx(24_535_040 / (e.step_seconds * 0.01e12))
    assert e.hfu == e.mfu  # no recompute


def test_step_time_arithmetic_host_bound_and_accumulation():
    inventory, plan = tiny(grad_accum=2, **LORA_QV)
    fast = replace(SLOW_GPU, bf16_dense_tflops=1000.0, memory_bandwidth_gbps=1000.0)
    e = estimate_throughput(inventory, plan, fast, CAL)
    assert e.bound == "host"
    optimizer = (71_680 + 3 * 7_168) / (1000e9 * 0.5)  # one extra accumulation
    assert e.step_seconds == pytest.approx(2 * 3 * 2 * 1e-3 + optimizer + 0.01)
    assert e.tokens_per_second == pytest.approx(2 * 64 / e.step_seconds)


def test_checkpointing_counts_hardware_flops_in_hfu_not_mfu():
    inventory, plan = tiny(gradient_checkpointing=True, **LORA_QV)
    e = estimate_throughput(inventory, plan, SLOW_GPU, CAL)
    assert e.hfu / e.mfu == pytest.approx(35_856_384 / 25_649_152)


def test_gpus_scale_by_their_own_peak():
    inventory, plan = tiny(method="full", seq_len=2048, batch_size=8)
    h100 = time_terms(inventory, plan, find_gpu("H100"))[0]
    a100 = time_terms(inventory, plan, find_gpu("A100-80GB"))[0]
    assert a100.compute_seconds / h100.compute_seconds == pytest.approx(989 / 312)
    assert a100.optimizer_seconds / h100.optimizer_seconds == pytest.approx(3350 / 2039)


def test_errors_name_the_flag_or_the_catalog_gap():
    # fp32 master weights still run their matmuls under bf16 autocast
    assert estimate_throughput(*tiny(dtype="fp32", **LORA_QV), find_gpu("H100")).peak_tflops == 989
    inventory, plan = tiny(**LORA_QV)
    with pytest.raises(InvalidPlanError, match="--dtype bf16: T4 has no bf16"):
        estimate_throughput(inventory, plan, find_gpu("T4"))
    with pytest.raises(CatalogError, match="A10G"):
        estimate_throughput(inventory, plan, find_gpu("A10G"))
    fp16 = estimate_throughput(*tiny(dtype="fp16", **LORA_QV), find_gpu("T4"))
    assert fp16.peak_tflops == 65


def test_output_states_where_the_efficiency_was_measured():
    inventory, plan = tiny(**LORA_QV)
    prior = estimate_throughput(inventory, plan, find_gpu("A100-80GB"))
    assert "prior, no measurement" in prior.derivation
    assert prior.to_dict()["efficiency_measured_on"] == "prior, no measurement"
    text = render_throughput(prior)
    assert "measured on: prior, no measurement" in text and "A100-80GB" in text

    fitted = replace(load_throughput_calibration(), measured_on=("H100-80GB",))
    other = estimate_throughput(inventory, plan, find_gpu("A100-80GB"), fitted)
    assert "fitted on H100-80GB, not on A100-80GB" in other.derivation
    assert "989 -> 312 TFLOP/s" in other.derivation and "3350 -> 2039 GB/s" in other.derivation
    same = estimate_throughput(inventory, plan, find_gpu("H100"), fitted)
    assert "this GPU included" in same.derivation


def test_to_dict_uses_harness_field_names():
    data = estimate_throughput(*tiny(**LORA_QV), SLOW_GPU, CAL).to_dict()
    assert {"tokens_per_second", "step_seconds", "mfu", "flops", "seconds", "derivation"} <= set(
        data
    )
    json.dumps(data)


# -- fitting ------------------------------------------------------------------------------------------
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
    compute_efficiency={"full": 0.45, "lora": 0.25, "qlora": 0.22, "int8": 0.09},
    bandwidth_efficiency=0.8,
    host_seconds_per_layer_pass=2e-4,
    step_overhead_seconds=0.02,
)
_INVENTORIES: dict = {}


def inventory_for(plan):
    key = (plan.model, plan.method, plan.rank, plan.targets)
    if key not in _INVENTORIES:
        _INVENTORIES[key] = build_inventory(CONFIGS[plan.model], plan, use_cache=False)
    return _INVENTORIES[key]


def synthetic_records(truth=TRUTH, methods=("full", "lora", "qlora", "int8")):
    """Measurement records generated from known constants (GPU and host-bound cases)."""
    records = []
    grid = itertools.product(
        CONFIGS,
        methods,
        (128, 1024),
        (1, 4),
        ("sdpa", "eager"),
        ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"),
    )
    for i, (model, method, seq, batch, attn, gpu_name) in enumerate(grid):
        kind = {"method": "lora", "quant": "int8"} if method == "int8" else {"method": method}
        plan = TrainingPlan(
            model, seq_len=seq, batch_size=batch, grad_accum=1 + i % 2, attn=attn, **kind
        )
        step = time_terms(inventory_for(plan), plan, find_gpu(gpu_name))[0].step_seconds(truth)
        records.append(
            plan.to_dict()
            | {
                "case_id": f"case{i}",
                "split": "calibration",
                "status": "ok",
                "gpu_name": gpu_name,
                "step_seconds": step,
                "tokens_per_second": seq * batch * plan.grad_accum / step,
            }
        )
    return records


def test_fit_recovers_known_constants():
    records = synthetic_records()
    assert {r["step_seconds"] > 0 for r in records} == {True}
    # validation cases (wildly off) and failed cases must not influence the fit
    noise = [
        dict(records[0], case_id="val", split="validation", step_seconds=99.0),
        dict(records[1], case_id="oom", status="oom", step_seconds=None),
    ]
    fit = fit_efficiency(records + noise, inventory_for=inventory_for)
    cal = fit.calibration
    for key, value in TRUTH.compute_efficiency.items():
        assert cal.compute_efficiency[key] == pytest.approx(value, rel=1e-4), key
    assert cal.bandwidth_efficiency == pytest.approx(0.8, rel=1e-4)
    assert cal.host_seconds_per_layer_pass == pytest.approx(2e-4, rel=1e-4)
    assert cal.step_overhead_seconds == pytest.approx(0.02, rel=1e-4)
    assert fit.median_abs_error < 1e-5
    assert cal.measured_on == ("A100-80GB", "H100-80GB")
    assert len(fit.cases) == len(records) and fit.skipped == ("oom: status 'oom'",)
    assert cal.sources["throughput_compute_efficiency_full"].startswith("fitted ")
    assert set(cal.to_json()) == set(load_throughput_calibration().to_json())


def test_fit_keeps_priors_that_no_case_informs():
    prior = load_throughput_calibration()
    fit = fit_efficiency(synthetic_records(methods=("full", "lora")), inventory_for=inventory_for)
    cal = fit.calibration
    assert cal.compute_efficiency["full"] == pytest.approx(0.45, rel=1e-4)
    assert cal.compute_efficiency["int8"] == prior.compute_efficiency["int8"]
    assert (
        cal.sources["throughput_compute_efficiency_int8"]
        == prior.sources["throughput_compute_efficiency_int8"]
    )
    assert "compute_efficiency_int8" not in fit.informed


def test_fit_with_nothing_usable_raises():
    records = [dict(r, status="error") for r in synthetic_records(methods=("lora",))[:2]]
    with pytest.raises(VramcalcError, match="no usable 'calibration' measurements"):
        fit_efficiency(records, inventory_for=inventory_for)


def test_compare_records_reports_tokens_per_second_error():
    records = synthetic_records(methods=("lora",))
    rows = compare_records(records, TRUTH, inventory_for=inventory_for)
    assert len(rows) == len(records)
    assert max(abs(r["tokens_per_second_error"]) for r in rows) < 1e-9
    slow = replace(TRUTH, step_overhead_seconds=0.04)
    row = compare_records(records[:1], slow, inventory_for=inventory_for)[0]
    assert row["predicted_tokens_per_second"] < row["measured_tokens_per_second"]
    assert row["tokens_per_second_error"] == pytest.approx(
        row["predicted_tokens_per_second"] / row["measured_tokens_per_second"] - 1
    )
