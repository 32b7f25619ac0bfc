"""The time model: stretches between syncs, the price of each op, the step's bound, how a GPU
without measurements gets its speed, and the constants' file entries."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tests.conftest import TINY_LLAMA
from vramcalc.calibration import CALIBRATION_JSON, write_throughput_entries
from vramcalc.catalog import Gpu, find_gpu
from vramcalc.errors import CatalogError, InvalidPlanError
from vramcalc.inventory import build_inventory
from vramcalc.memory.gradients import gradient_bytes
from vramcalc.render.plan import render_throughput
from vramcalc.speed.opprofile import BnbOptimizerParam, Op, OpProfile, Run, op_profile
from vramcalc.speed.stepwork import Kernel, StepWork, Stretch, step_work
from vramcalc.speed.throughput import (
    CONSTANTS,
    Peaks,
    ThroughputCalibration,
    estimate_throughput,
    load_throughput_calibration,
    plan_work,
    price,
)
from vramcalc.training_plan import TrainingPlan

CAL = ThroughputCalibration(
    compute_efficiency=0.5,
    fp32_efficiency=0.25,
    attention_efficiency=0.4,
    bandwidth_efficiency=0.5,
    kernel_seconds=1e-6,
    python_call_seconds=1e-5,
    dispatch_seconds=2e-6,
    bnb_tensor_seconds=1e-4,
    step_overhead_seconds=0.01,
)
# 100 TFLOP/s dense, 10 TFLOP/s fp32, 1000 GB/s
GPU = Gpu("Test", (), "test", 80 * 2**30, 100.0, 100.0, 1000.0, 2.0, "test", "2026-01-01")
GPU = replace(GPU, fp32_tflops=10.0)
PEAKS = Peaks(
    {"matmul": 100e12, "attention": 100e12, "int8_matmul": 200e12, "matmul_fp32": 10e12}, 1e12
)
ZERO = (0.0,) * 5


def op(name, kind="memory", flops=ZERO, nbytes=ZERO, sync=False, python=1.0, count=1):
    return Op(name, kind, "forward", count, flops, nbytes, 1.0, python, 0.0, 0, sync)


def _vec(const=0.0, token=0.0, token_seq=0.0):
    return (float(const), float(token), float(token_seq), 0.0, 0.0)


# -- laying out the work ------------------------------------------------------------------------------
def test_layers_repeat_and_syncs_cut_stretches():
    """4 layers: the second traced layer's run is done 3 times; a sync in it cuts the stretch
    once per layer, and the seam between two layers is its own stretch."""
    profile = OpProfile(
        micro_batch=(
            Run("once", (op("embed", nbytes=_vec(0, 10)),)),
            Run(
                "layers", (op("a", nbytes=_vec(0, 1)), op("s", sync=True), op("b", nbytes=_vec(5)))
            ),
            Run("once", (op("head", "matmul", flops=_vec(0, 100), nbytes=_vec(0, 2)),)),
        ),
        optimizer=(Run("once", (op("adam", nbytes=_vec(1000)),)),),
        bnb_params=(),
        params_total=(1, 1, 1),
        params_trainable=(0, 1, 1),
    )
    inventory = build_inventory(TINY_LLAMA, TrainingPlan("tiny"), use_cache=False)
    inventory = replace(inventory, num_layers=4)
    p = TrainingPlan("tiny", seq_len=10, batch_size=2, method="full")  # T = 20
    work = step_work(profile, inventory, p)
    shape = [(s.times, s.dispatches, s.memory_bytes) for s in work.stretches]
    assert shape == [
        (1, 3, 10 * 20 + 1 * 20),  # embed, layer 1 up to its sync
        (2, 3, 5 + 1 * 20),  # b of one layer, a and the sync of the next: 2 seams
        (1, 3, 5 + 1000),  # b of the last layer, the head, the optimizer step
    ]
    assert work.stretches[-1].compute == (Kernel("matmul", 1, 100 * 20, 2 * 20),)
    assert work.syncs == 1 + 2 + 1  # the first layer's, the seams', the step's end


def test_gradient_accumulation_adds_into_the_gradients():
    """Each micro-batch after the first adds its gradients into .grad: one in-place add per
    trainable tensor (read 2, write 1 gradient); the optimizer steps once."""
    p = TrainingPlan("tiny", seq_len=32, batch_size=2, method="full", gradient_checkpointing=False)
    inventory = build_inventory(TINY_LLAMA, p, use_cache=False)
    profile = op_profile(TINY_LLAMA, p)
    one = step_work(profile, inventory, p)
    three = step_work(profile, inventory, p.with_(grad_accum=3))
    micro = step_work(replace(profile, optimizer=()), inventory, p)
    trainable = profile.tensor_count(2, trainable=True)
    grads = gradient_bytes(inventory, p)
    assert three.tokens == 3 * one.tokens and three.syncs == 3 * 2 + 1
    assert three.total("dispatches") == one.total("dispatches") + 2 * (
        micro.total("dispatches") + trainable
    )
    assert three.memory_bytes == pytest.approx(
        one.memory_bytes + 2 * (micro.memory_bytes + 3 * grads)
    )


# -- pricing -----------------------------------------------------------------------------------------
def _work(*stretches, bnb_tensors=0.0, bnb_bytes=0.0):
    return StepWork(TrainingPlan("tiny"), tuple(stretches), bnb_tensors, bnb_bytes, 1.0)


def test_a_stretch_takes_the_longer_of_host_and_gpu():
    gpu_bound = Stretch(1, 10, 100, 4e9, 10, (Kernel("matmul", 2, 4e12, 1e9),))
    # host 10 x 10 us + 100 x 2 us = 0.3 ms; GPU: bytes 4e9 / 5e11 = 8 ms + 10 kernels x 1 us;
    # matmul max(4e12 / 5e13, 1e9 / 5e11) = 80 ms + 2 x 1 us
    time = price(_work(gpu_bound), PEAKS, CAL)
    assert time.seconds["compute"] == pytest.approx(0.080 + 2e-6)
    assert time.seconds["memory"] == pytest.approx(0.008 + 10e-6)
    assert time.seconds["host"] == pytest.approx(0.01)  # the fixed step part only
    assert time.step_seconds == pytest.approx(0.01 + 0.080002 + 0.00801)
    assert time.bound == "compute" and time.host_seconds == pytest.approx(0.01 + 0.0003)

    host_bound = replace(gpu_bound, python_calls=10_000, times=3)
    time = price(_work(host_bound), PEAKS, CAL)
    host = 10_000 * 1e-5 + 100 * 2e-6  # 0.1002 s > 0.08802 s of GPU work
    assert time.seconds["host"] == pytest.approx(0.01 + 3 * host)
    assert time.step_seconds == pytest.approx(0.01 + 3 * host) and time.bound == "host"


def test_each_kernel_kind_has_its_peak_and_efficiency():
    kinds = {
        "matmul": 1e12 / (100e12 * 0.5),
        "int8_matmul": 1e12 / (200e12 * 0.5),
        "matmul_fp32": 1e12 / (10e12 * 0.25),
        "attention": 1e12 / (100e12 * 0.4),
    }
    for kind, seconds in kinds.items():
        work = _work(Stretch(1, 0, 0, 0.0, 0, (Kernel(kind, 1, 1e12, 0.0),)))
        assert price(work, PEAKS, CAL).seconds["compute"] == pytest.approx(seconds + 1e-6), kind
    # a thin matmul is bandwidth-bound: 1 GFLOP, 1 GB
    thin = _work(Stretch(1, 0, 0, 0.0, 0, (Kernel("matmul", 1, 1e9, 1e9),)))
    assert price(thin, PEAKS, CAL).seconds["compute"] == pytest.approx(1e9 / 5e11 + 1e-6)


def test_bitsandbytes_optimizer_tensors_are_serial():
    work = _work(bnb_tensors=100, bnb_bytes=5e9)
    time = price(work, PEAKS, CAL)
    assert time.seconds["host"] == pytest.approx(0.01 + 100 * 1e-4)
    assert time.seconds["memory"] == pytest.approx(5e9 / 5e11 + 100 * 1e-6)
    assert time.step_seconds == pytest.approx(sum(time.seconds.values()))


# -- the estimate ------------------------------------------------------------------------------------
LORA_QV = {"method": "lora", "rank": 4, "targets": ("q_proj", "v_proj")}


def tiny_work(**fields):
    p = TrainingPlan("tiny", **{"seq_len": 32, "batch_size": 2, **fields})
    return plan_work(TINY_LLAMA, build_inventory(TINY_LLAMA, p, use_cache=False), p)


def test_estimate_fields_agree():
    work = tiny_work(gradient_checkpointing=True, **LORA_QV)
    e = estimate_throughput(work, GPU, CAL)
    assert e.tokens_per_second == pytest.approx(64 / e.step_seconds)
    assert e.step_seconds == pytest.approx(sum(e.seconds.values()))
    assert e.mfu == pytest.approx(work.flops.model_flops / (e.step_seconds * 100e12))
    assert e.hfu > e.mfu  # the recompute
    assert e.bound == "host"  # 64 tokens of a tiny model: launch-bound
    data = e.to_dict()
    assert set(data["seconds"]) == {"compute", "memory", "host"}
    assert set(data["constants"]) == set(CONSTANTS)
    assert data["work"]["syncs"] == 3 and data["measured"] is False
    json.dumps(data)


def test_gpus_scale_by_their_own_peaks():
    """With no host and launch terms, half the peak and half the bandwidth: twice the time."""
    work = tiny_work(method="full", seq_len=4096, batch_size=64, gradient_checkpointing=False)
    gpu_only = replace(CAL, kernel_seconds=0.0, python_call_seconds=0.0, dispatch_seconds=0.0)
    gpu_only = replace(gpu_only, step_overhead_seconds=0.0)
    fast = estimate_throughput(work, GPU, gpu_only)
    half = replace(GPU, bf16_dense_tflops=50.0, memory_bandwidth_gbps=500.0, fp32_tflops=5.0)
    slow = estimate_throughput(work, half, gpu_only)
    assert slow.step_seconds == pytest.approx(2 * fast.step_seconds, rel=1e-12)
    assert slow.mfu == pytest.approx(fast.mfu, rel=1e-12)


def test_errors_name_the_flag_or_the_catalog_gap():
    work = tiny_work(**LORA_QV)
    assert (
        estimate_throughput(tiny_work(dtype="fp32", **LORA_QV), find_gpu("H100")).peak_tflops == 989
    )
    with pytest.raises(InvalidPlanError, match="--dtype bf16: T4 has no bf16"):
        estimate_throughput(work, find_gpu("T4"))
    no_speed = replace(GPU, name="NoSpeed", bf16_dense_tflops=None, fp16_dense_tflops=None)
    with pytest.raises(CatalogError, match="NoSpeed"):
        estimate_throughput(work, no_speed)
    assert estimate_throughput(tiny_work(dtype="fp16", **LORA_QV), find_gpu("T4")).peak_tflops == 65
    # int8 LoRA runs fp32 matmuls in backward: a GPU needs an fp32 peak for them
    int8 = tiny_work(quant="int8", gradient_checkpointing=False, **LORA_QV)
    with pytest.raises(CatalogError, match="no fp32 TFLOP/s for Test"):
        estimate_throughput(int8, replace(GPU, fp32_tflops=None), CAL)
    assert estimate_throughput(int8, GPU, CAL).step_seconds > 0


def test_output_says_which_gpus_no_measurement_backs():
    work = tiny_work(**LORA_QV)
    committed = load_throughput_calibration()
    assert "H200" in committed.measured_on
    assert estimate_throughput(work, find_gpu("H200")).measured
    cal = replace(committed, measured_on=("H200",))  # the text of one measured GPU
    h200 = estimate_throughput(work, find_gpu("H200"), cal)
    a100 = estimate_throughput(work, find_gpu("A100-80GB"), cal)
    assert h200.measured and "this GPU included" in h200.derivation
    assert not a100.measured
    assert a100.derivation.startswith("no measurement on A100-80GB: constants fitted on H200")
    assert "989 -> 312 TFLOP/s" in a100.derivation and "4800 -> 2039 GB/s" in a100.derivation
    text = render_throughput(a100)
    assert "no measurement on A100-80GB" in text and "measured on: H200" in text
    prior = replace(cal, measured_on=())
    assert "prior, no measurement" in estimate_throughput(work, find_gpu("H200"), prior).derivation


# -- the constants' file --------------------------------------------------------------------------------
def test_calibration_entries_round_trip_and_are_sourced():
    raw = json.loads(CALIBRATION_JSON.read_text())
    cal = load_throughput_calibration()
    assert set(cal.to_json()) == {k for k in raw if k.startswith("throughput_")}
    assert ThroughputCalibration.from_json(cal.to_json()) == cal
    for name in CONSTANTS:
        source = cal.sources[f"throughput_{name}"]
        assert source.startswith("fitted " if name != "attention_efficiency" else "prior"), name
    assert cal.fitted_on["split"] == "calibration"
    assert all(":" in case for case in cal.fitted_on["cases"])


def test_writing_the_entries_keeps_every_other_entry(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(
        json.dumps({"cuda_context_bytes": {"value": 1}, "throughput_old": {"value": 2}})
    )
    write_throughput_entries({"throughput_new": {"value": 3, "source": "s"}}, path)
    assert json.loads(path.read_text()) == {
        "cuda_context_bytes": {"value": 1},
        "throughput_new": {"value": 3, "source": "s"},
    }
    assert BnbOptimizerParam(1, 2.0, "once").numel == 1


def test_plan_table_shows_speed_columns_and_marks_unmeasured_gpus(tiny_llama_dir):
    from vramcalc.planner import plan_result
    from vramcalc.render.plan import render_gpu_fits

    p = TrainingPlan(str(tiny_llama_dir), method="lora", seq_len=64, batch_size=2)
    result = plan_result(p, [find_gpu("H200"), find_gpu("A100-80GB")])
    lines = render_gpu_fits(result.fits).splitlines()
    assert lines[0].split() == [
        "GPU",
        "memory",
        "fits",
        "margin",
        "tokens/s",
        "step",
        "s",
        "MFU",
        "bound",
    ]
    a100, h200 = lines[2].split(), lines[3].split()
    assert a100[0] == "A100-80GB" and a100[-1] == "host*"  # derived from the H200
    assert h200[0] == "H200" and h200[-1] == "host"  # measured there
    assert lines[4] == (
        "fits: the device total within each GPU's memory less 5% headroom (--headroom); "
        "margin: what is left of that budget"
    )
    measured = ", ".join(load_throughput_calibration().measured_on)
    assert lines[-1] == (
        f"  * no measurement backs A100-80GB: speed derived from {measured} (plan --verbose says how)"
    )
    gpus = {g["name"]: g for g in result.to_dict()["gpus"]}
    assert gpus["H200"]["speed_measured"] is True and gpus["A100-80GB"]["speed_measured"] is False
    assert gpus["H200"]["bound"] == "host"
