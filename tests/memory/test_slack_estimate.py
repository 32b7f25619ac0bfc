"""The estimator with the caching allocator simulated: plan, sweep and fit agree, the
simulation is cached, every sweep row is simulated (the approximation only when asked for,
and marked), multi-GPU plans take the marked approximation."""

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


def test_the_simulation_is_cached_one_entry_per_plan_each_mode_when_asked(tiny_llama_dir):
    p = TrainingPlan(str(tiny_llama_dir), method="lora", seq_len=128, batch_size=2)
    prepared = prepare(p.model, p)
    config = prepared.spec.config_dict
    assert cached_simulation(config, p) is None
    default = prepared.estimate(p)
    sim = cached_simulation(config, p)
    assert sim is not None and set(sim.peak_reserved_bytes) == {"default"}  # only what is asked
    assert cached_simulation(config, p.with_(allocator="expandable")) is None
    expandable = prepared.estimate(p.with_(allocator="expandable"))
    sim = cached_simulation(config, p.with_(allocator="expandable"))
    assert sim is not None and set(sim.peak_reserved_bytes) == {"default", "expandable"}
    assert cached_simulation(config, p) == sim  # one entry for the plan
    assert default.peak_reserved_bytes == sim.peak_reserved_bytes["default"]
    assert expandable.peak_reserved_bytes == sim.peak_reserved_bytes["expandable"]
    assert default.peak_allocated_bytes == sim.peak_allocated_bytes["default"]
    assert expandable.peak_allocated_bytes == sim.peak_allocated_bytes["expandable"]


def test_each_allocator_mode_keeps_its_own_peak_allocated_in_the_cache(tiny_llama_dir, monkeypatch):
    """torch counts an unsplit block's whole size as allocated, so the peak differs by mode
    (one H200 plan: 11,786,248,704 B default, 11,707,081,216 B expandable); a mode replayed
    later must not overwrite the other's."""
    from types import SimpleNamespace

    from vramcalc.memory import slack

    peaks = {"default": (1000, 3000), "expandable": (900, 2000)}

    def fake_run(trace, plan, config):  # noqa: ANN001, ANN202
        allocated, reserved = peaks[plan.allocator]
        return SimpleNamespace(
            result=SimpleNamespace(peak_allocated_bytes=allocated, peak_reserved_bytes=reserved)
        )

    monkeypatch.setattr(slack, "simulate_run", fake_run)
    monkeypatch.setattr(slack, "peak_account", lambda trace, plan, config, peak: ("", {}))
    monkeypatch.setattr("vramcalc.trace.recipe.plan_steps", lambda *a, **k: None)
    config = {"model_type": "llama", "hidden_size": 64}
    p = TrainingPlan(str(tiny_llama_dir), method="lora", seq_len=96, batch_size=3)
    slack.simulate_plan(config, p)
    slack.simulate_plan(config, p.with_(allocator="expandable"))
    sim = cached_simulation(config, p)
    assert sim is not None
    assert sim.peak_allocated_bytes == {"default": 1000, "expandable": 900}
    assert sim.peak_reserved_bytes == {"default": 3000, "expandable": 2000}
    assert slack.simulate_plan(config, p).slack_bytes("default") == 2000
    assert slack.simulate_plan(config, p).slack_bytes("expandable") == 1100


def test_every_sweep_row_is_simulated_unless_the_approximation_is_asked_for(tiny_llama_dir):
    cases = [
        {"model": str(tiny_llama_dir), "method": "lora", "seq_len": s, "batch_size": b}
        for s in (64, 128, 192)
        for b in (2, 3)
    ]
    cache = EstimateCache()
    result = run_sweep(cases, [], cache=cache)
    assert (cache.simulated, result.approximated) == (6, 0)
    assert {row.estimate.allocator_model for row in result.rows} == {"simulated"}
    for row in result.rows:  # each row is what plan gives
        assert row.estimate == prepare(row.plan.model, row.plan).estimate(row.plan)
    again = EstimateCache()
    run_sweep(cases, [], cache=again)
    assert again.simulated == 0  # cached
    rough = run_sweep(cases, [], allocator_model="approximate")
    assert rough.approximated == 6
    assert {row.estimate.allocator_model for row in rough.rows} == {"approximate"}
    assert all(
        any(a.startswith("APPROXIMATE allocator slack") for a in row.estimate.assumptions)
        for row in rough.rows
    )


def test_a_recipe_that_cannot_be_traced_is_an_error_naming_the_way_out(tiny_llama_dir, monkeypatch):
    from vramcalc.errors import SimulationError
    from vramcalc.memory import slack

    def broken(*args, **kwargs):
        raise RuntimeError("an op fake tensors cannot run")

    monkeypatch.setattr(slack, "plan_steps", broken, raising=False)
    monkeypatch.setattr("vramcalc.trace.recipe.plan_steps", broken)
    p = TrainingPlan(str(tiny_llama_dir), method="lora", seq_len=96, batch_size=5)
    with pytest.raises(SimulationError) as err:
        prepare(p.model, p).estimate(p)
    assert str(err.value).endswith(
        "could not be traced on fake tensors (RuntimeError: an op fake tensors cannot run); "
        "--allocator-model approximate gives the calibrated estimate instead"
    )
    assert prepare(p.model, p).estimate(p, "approximate").allocator_model == "approximate"


def _estimate_is_the_world_simulation(p: TrainingPlan):  # type: ignore[no-untyped-def]
    """The default estimate of multi-GPU plan ``p``, checked to be its world simulation's
    peaks (simulated, cached); returns (prepared, estimate, simulation)."""
    from vramcalc.memory.worldsim import simulate_world

    prepared = prepare(p.model, p)
    est = prepared.estimate(p)
    world = simulate_world(prepared.spec.config_dict, p)  # cached by the estimate
    assert prepared.cached(p)
    assert est.allocator_model == "simulated"
    assert est.peak_allocated_bytes == world.peak_allocated_bytes["default"]
    assert est.peak_reserved_bytes == world.peak_reserved_bytes["default"]
    return prepared, est, world


def test_multi_gpu_fsdp_and_ddp_plans_simulate_rank_0_of_the_world(tiny_llama_dir):
    from vramcalc.memory.nccl import nccl_buffer_bytes
    from vramcalc.memory.overhead import load_calibration
    from vramcalc.memory.worldsim import world_device_total_bytes

    for strategy in ("fsdp", "ddp"):
        p = TrainingPlan(str(tiny_llama_dir), method="lora", num_gpus=2, strategy=strategy)
        _, est, world = _estimate_is_the_world_simulation(p)
        assert est.components["nccl"] == nccl_buffer_bytes(2)
        total = world_device_total_bytes(world, p, load_calibration())["device_total"]
        assert est.device_total_bytes == total
        assert any("rank 0's whole run" in line for line in est.assumptions)


def test_zero_plans_simulate_rank_0_with_deepspeeds_code_and_say_so(tiny_llama_dir):
    pytest.importorskip("deepspeed")
    from vramcalc.estimate import MULTI_GPU_EVIDENCE, ZERO_EVIDENCE, prepare
    from vramcalc.memory.worldsim import simulate_world

    p = TrainingPlan(
        str(tiny_llama_dir), method="lora", num_gpus=2, strategy="zero2", seq_len=16, batch_size=2
    )
    prepared = prepare(p.model, p)
    est = prepared.estimate(p, "simulate")
    world = simulate_world(prepared.spec.config_dict, p)  # cached by the estimate
    assert est.allocator_model == "simulated"
    assert est.peak_allocated_bytes == world.peak_allocated_bytes["default"]
    assert ZERO_EVIDENCE in est.assumptions and MULTI_GPU_EVIDENCE not in est.assumptions
    assert any("DeepSpeed's own ZeRO code" in line for line in est.assumptions)


def test_int8_zero3_plans_simulate_rank_0_too(tiny_llama_dir):
    """int8 weights under ZeRO-3 are simulated like every other ZeRO plan (no rule-based
    fallback): the estimate's peaks are the world simulation's, and it says so."""
    pytest.importorskip("deepspeed")
    from vramcalc.estimate import ZERO_EVIDENCE

    p = TrainingPlan(
        str(tiny_llama_dir),
        method="lora",
        quant="int8",
        num_gpus=2,
        strategy="zero3",
        seq_len=16,
        batch_size=2,
    )
    prepared, est, _ = _estimate_is_the_world_simulation(p)
    assert ZERO_EVIDENCE in est.assumptions
    assert not any("APPROXIMATE allocator slack" in line for line in est.assumptions)
    approximate = prepared.estimate(p, "approximate")  # only when asked for
    assert approximate.allocator_model == "approximate"
    assert "(--allocator-model approximate)" in approximate.assumptions[-1]


def test_the_zero_evidence_lines_quote_the_committed_world_report():
    """ZERO_EVIDENCE says what reports/world_memory.csv says of the ZeRO records (python -m
    vramcalc.worldcompare rewrites it): every one of them simulated, int8 ZeRO-3 included."""
    import csv
    import re
    from pathlib import Path

    from vramcalc.estimate import ZERO_EVIDENCE

    report = Path(__file__).resolve().parents[2] / "reports" / "world_memory.csv"
    rows = [r for r in csv.DictReader(report.open()) if r["strategy"].startswith("zero")]
    simulated = [r for r in rows if r["world_simulated"] == "True"]
    assert simulated == rows
    assert "7f23c407cdd50e38" in {r["case_id"] for r in rows}  # int8 LoRA under ZeRO-3
    total = [100 * float(r["world_error_device_total_bytes"]) for r in simulated]
    allocated = [100 * abs(float(r["world_error_peak_allocated_bytes"])) for r in simulated]
    quoted = re.search(r"against (\d+) simulated-world .* within \+([\d.]+) / -([\d.]+) %, "
                       r"peak allocated within ([\d.]+) %", ZERO_EVIDENCE)  # fmt: skip
    assert quoted is not None
    assert int(quoted[1]) == len(simulated)
    assert (float(quoted[2]), float(quoted[3])) == (round(max(total), 1), round(-min(total), 1))
    assert max(allocated) <= float(quoted[4])
