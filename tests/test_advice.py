"""``vramcalc advise``: ranked changes with memory and speed after each, the cheapest
combination that fits, for the README's plan that fits no single GPU."""

from __future__ import annotations

import json

from click.testing import CliRunner

from vramcalc.advice import COSTS, advise
from vramcalc.catalog import find_gpu
from vramcalc.cli import cli
from vramcalc.training_plan import TrainingPlan


def test_the_readme_plan_that_fits_nothing_gets_a_fitting_combination():
    plan = TrainingPlan(model="meta-llama/Llama-3.1-70B", method="full")
    advice = advise(plan, find_gpu("H200"))
    assert not advice.baseline.fits
    assert advice.combined is not None and advice.combined.fits
    assert [COSTS.index(c.cost) for c in advice.changes] == sorted(
        COSTS.index(c.cost) for c in advice.changes
    )
    assert all(
        c.option.device_total_bytes < advice.baseline.device_total_bytes for c in advice.changes
    )


def test_micro_batch_keeps_the_effective_batch_and_checkpointing_is_offered():
    plan = TrainingPlan(model="Qwen/Qwen2.5-1.5B", method="lora", seq_len=8192, batch_size=8)
    advice = advise(plan, find_gpu("RTX-4090"))
    flags = [c.flags for c in advice.changes]
    assert "--gradient-checkpointing" in flags
    batch = next(c for c in advice.changes if c.flags.startswith("--batch-size"))
    assert batch.option.plan.batch_size * batch.option.plan.grad_accum == 8
    assert batch.cost == "none" and any(f.startswith("--seq-len") for f in flags)
    cut = next(c for c in advice.changes if c.flags.startswith("--seq-len"))
    assert cut.cost == "tokens cut" and "tokens cut" in cut.description
    assert advice.combined is not None and advice.combined.fits


def test_advise_cli_table_json_and_from_file(tmp_path):
    args = ["advise", "--model", "meta-llama/Llama-3.1-70B", "--method", "full", "--gpu", "H200"]
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert "combinations that fit, cheapest first" in text.output and "tokens/s" in text.output
    data = json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)
    assert data["combined"]["fits"] and data["combination"]
    # one combination per kind of cost, the quality one (adapters on a 4-bit base, one card)
    # before the one with more GPUs
    costs = [c["cost"] for c in data["combinations"]]
    assert costs[0] == "quality" and costs == sorted(costs, key=COSTS.index)
    assert data["combinations"][0]["plan"]["num_gpus"] == 1
    assert data["combination"] == data["combinations"][0]["flags"]
    path = tmp_path / "a.yml"
    path.write_text(
        "base_model: Qwen/Qwen2.5-7B\nadapter: lora\nsequence_len: 4096\nmicro_batch_size: 8\n"
    )
    from_file = CliRunner().invoke(cli, ["advise", "--from", str(path), "--gpu", "RTX-4090"])
    assert from_file.exit_code == 0, from_file.output
    assert "plan read from" in from_file.output


def test_advise_unknown_gpu_suggests():
    result = CliRunner().invoke(cli, ["advise", "--model", "facebook/opt-125m", "--gpu", "H2000"])
    assert result.exit_code == 1 and "Did you mean" in result.output


def test_advise_has_help():
    result = CliRunner().invoke(cli, ["advise", "--help"])
    assert result.exit_code == 0 and "cheapest combination" in result.output


def test_a_practitioners_answer_comes_before_sixteen_gpus():
    """Llama-2-13b LoRA at 2048 x 4 on an RTX 4090: QLoRA (with checkpointing, as the QLoRA
    recipes run it) on the one card is the first combination; an 8-bit base and checkpointing
    with micro-batch 1 are offered; more GPUs only after the quality changes."""
    plan = TrainingPlan("meta-llama/Llama-2-13b", method="lora", seq_len=2048, batch_size=4)
    advice = advise(plan, find_gpu("RTX-4090"))
    flags = [c.flags for c in advice.changes]
    assert "--method qlora --gradient-checkpointing" in flags
    assert "--quant int8 --gradient-checkpointing" in flags
    assert "--gradient-checkpointing" in flags and "--batch-size 1 --grad-accum 4" in flags
    first = advice.combinations[0]
    assert first.cost == "quality" and first.option.plan.num_gpus == 1
    assert first.option.plan.method == "qlora" and first.option.plan.gradient_checkpointing
    assert [c.cost for c in advice.combinations] == sorted(
        (c.cost for c in advice.combinations), key=COSTS.index
    )
