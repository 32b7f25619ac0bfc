"""The estimator with the caching allocator simulated: plan, sweep and fit agree, the
simulation is cached, sweeps fall back past their budget, multi-GPU plans take the
fallback."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from vramcalc.cli import cli
from vramcalc.estimate import forget_prepared, prepare
from vramcalc.memory.slack import cached_simulation
from vramcalc.sweeps import EstimateCache, run_sweep
from vramcalc.training_plan import TrainingPlan


@pytest.fixture(autouse=True)
def simulate(monkeypatch, tmp_path):
    monkeypatch.setenv("VRAMCALC_ALLOCATOR_MODEL", "simulate")
    monkeypatch.setenv("VRAMCALC_CACHE_DIR", str(tmp_path / "cache"))
    forget_prepared()
    yield
    forget_prepared()


def test_plan_sweep_and_fit_give_the_same_simulated_bytes(tiny_llama_dir):
    args = ["--model", str(tiny_llama_dir), "--method", "lora", "--seq-len", "128"]
    plan = CliRunner().invoke(cli, ["plan", *args, "--batch-size", "4", "--json"])
    assert plan.exit_code == 0, plan.output
    est = json.loads(plan.output)
    assert any(
        "replayed through a model of the default caching allocator" in a for a in est["assumptions"]
    )
    reserve = est["peak_reserved_bytes"] - est["peak_allocated_bytes"]
    assert reserve > 0 and est["components"]["allocator_reserve"] == reserve
    assert sum(est["components"].values()) == est["device_total_bytes"]
    case = {"model": str(tiny_llama_dir), "method": "lora", "seq_len": 128, "batch_size": 4}
    (row,) = run_sweep([case], [], allocator_model="simulate").rows
    swept = row.estimate.to_dict()
    assert {k: est[k] for k in swept} == swept  # every estimate field, bytes included
    assert (row.estimate.peak_reserved_bytes, row.estimate.device_total_bytes) == (
        est["peak_reserved_bytes"],
        est["device_total_bytes"],
    )
    # fit settles on a batch whose bytes are what plan gives for it
    fit = CliRunner().invoke(cli, ["fit", *args, "--gpu", "RTX-4090", "--json"])
    assert fit.exit_code == 0, fit.output
    at = json.loads(fit.output)["at_value"]
    p = TrainingPlan(str(tiny_llama_dir), method="lora", seq_len=128, batch_size=at["batch_size"])
    assert prepare(p.model, p).estimate(p).device_total_bytes == at["device_total_bytes"]


def test_the_simulation_is_cached_and_both_allocator_modes_come_from_one_trace(tiny_llama_dir):
    p = TrainingPlan(str(tiny_llama_dir), method="lora", seq_len=128, batch_size=2)
    prepared = prepare(p.model, p)
    config = prepared.spec.config_dict
    assert cached_simulation(config, p) is None
    default = prepared.estimate(p)
    sim = cached_simulation(config, p)
    assert sim is not None and set(sim.peak_reserved_bytes) == {"default", "expandable"}
    expandable = prepared.estimate(p.with_(allocator="expandable"), "cached")
    assert default.peak_reserved_bytes == sim.peak_reserved_bytes["default"]
    assert expandable.peak_reserved_bytes == sim.peak_reserved_bytes["expandable"]
    assert (
        default.peak_allocated_bytes == expandable.peak_allocated_bytes == sim.peak_allocated_bytes
    )


def test_a_short_sweep_simulates_every_plan_a_long_one_takes_cache_or_fallback(
    tiny_llama_dir,
):
    cases = [
        {"model": str(tiny_llama_dir), "method": "lora", "seq_len": s, "batch_size": 1}
        for s in (64, 128, 192)
    ]
    # longer than the budget: nothing is traced, the calibrated slack for every row
    cache = EstimateCache("auto", simulation_budget=2)
    result = run_sweep(cases, [], cache=cache)
    assert (cache.simulated, result.approximated) == (0, 3)
    assert all(
        any(a.startswith("APPROXIMATE allocator slack") for a in row.estimate.assumptions)
        for row in result.rows
    )
    # within the budget: every plan simulated, as plan does
    short = EstimateCache("auto", simulation_budget=2)
    result = run_sweep(cases[:2], [], cache=short)
    assert (short.simulated, result.approximated) == (2, 0)
    # the long sweep then finds those two cached, and the third once plan has traced it
    third = TrainingPlan(str(tiny_llama_dir), method="lora", seq_len=192, batch_size=1)
    prepare(third.model, third).estimate(third)
    again = run_sweep(cases, [], cache=EstimateCache("auto", simulation_budget=2))
    assert again.approximated == 0


def test_multi_gpu_plans_take_the_fallback_slack(tiny_llama_dir):
    p = TrainingPlan(str(tiny_llama_dir), method="lora", num_gpus=2, strategy="fsdp")
    est = prepare(p.model, p).estimate(p)
    assert est.components["allocator_reserve"] == max(
        int(est.peak_allocated_bytes * 0.0863), 41943040
    )
    assert cached_simulation(prepare(p.model, p).spec.config_dict, p) is None
