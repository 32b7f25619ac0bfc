"""One answer everywhere: for plans drawn at random, ``plan``, a ``sweep`` row, ``fit``'s
boundary estimates, ``advise``'s rows and the plan read from an equivalent training config
(``--from``) give the same bytes, every one of them simulated.

The plans are drawn from a seeded generator (the draw is part of the test, so a failure
names the plan) over a tiny Llama config on disk: methods, quantizations, ranks, targets,
sequence lengths, batch sizes, gradient accumulation, checkpointing and optimizers.
"""

from __future__ import annotations

import json
import random

import pytest
import yaml

import vramcalc
from vramcalc.estimate import forget_prepared, prepare
from vramcalc.training_plan import TrainingPlan

SEED = 20261206
DRAWS = 4


def _draw(rng: random.Random, model: str) -> TrainingPlan:
    method = rng.choice(["lora", "qlora", "full"])
    quant = {"lora": rng.choice(["none", "int8"]), "qlora": "nf4", "full": "none"}[method]
    fields = {
        "method": method,
        "quant": quant,
        "seq_len": rng.choice([64, 96, 130, 200]),
        "batch_size": rng.choice([1, 2, 3]),
        "grad_accum": rng.choice([1, 1, 2]),
        "gradient_checkpointing": rng.choice([True, False]),
        "optimizer": rng.choice(["adamw_torch_fused", "adamw_torch", "paged_adamw_8bit"]),
    }
    if method != "full":
        fields["rank"] = rng.choice([4, 8, 16])
        fields["targets"] = rng.choice([None, ("all-linear",), ("q_proj", "k_proj")])
    return TrainingPlan(model=model, **fields)


def _axolotl(plan: TrainingPlan) -> dict:
    """The plan as an axolotl config (the keys axolotl documents)."""
    out = {
        "base_model": plan.model,
        "sequence_len": plan.seq_len,
        "micro_batch_size": plan.batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "optimizer": {"adamw_torch_fused": "adamw_torch_fused", "adamw_torch": "adamw_torch"}.get(
            plan.optimizer, plan.optimizer
        ),
        "bf16": True,
        "load_in_4bit": plan.quant == "nf4",
        "load_in_8bit": plan.quant == "int8",
    }
    if plan.method != "full":
        out.update(adapter="qlora" if plan.method == "qlora" else "lora", lora_r=plan.rank)
        out["lora_alpha"] = plan.lora_alpha
        if plan.targets == ("all-linear",):
            out["lora_target_linear"] = True
        elif plan.targets:
            out["lora_target_modules"] = list(plan.targets)
    return out


@pytest.fixture
def simulated(monkeypatch, tmp_path):
    monkeypatch.setenv("VRAMCALC_ALLOCATOR_MODEL", "simulate")
    monkeypatch.setenv("VRAMCALC_CACHE_DIR", str(tmp_path / "cache"))
    forget_prepared()
    yield
    forget_prepared()


@pytest.mark.slow
@pytest.mark.parametrize("draw", range(DRAWS))
def test_plan_sweep_fit_advise_and_from_give_the_same_bytes(draw, tiny_llama_dir, simulated):
    rng = random.Random(SEED + draw)
    plan = _draw(rng, str(tiny_llama_dir))
    memory = vramcalc.plan(plan, gpus=["H100-80GB"]).memory
    assert memory.allocator_model == "simulated"
    want = memory.to_dict()

    (row,) = vramcalc.sweep(cases=[plan.to_dict()], gpus=["H100-80GB"]).rows
    assert row.estimate is not None and row.estimate.to_dict() == want, plan

    fitted = vramcalc.fit(plan, "L4", search="seq_len", seq_multiple=32)
    for probe in (fitted.best, fitted.first_too_large):
        if probe is not None:
            again = probe.estimate.plan
            assert probe.estimate == prepare(again.model, again).estimate(again), plan

    advice = vramcalc.advise(plan, "L4")
    for change in advice.changes:
        changed = change.option.plan
        total = prepare(changed.model, changed).estimate(changed).device_total_bytes
        assert change.option.device_total_bytes == total, (plan, change.flags)

    config = tiny_llama_dir.parent / f"axolotl-{draw}.yml"
    config.write_text(yaml.safe_dump(_axolotl(plan)))
    from_file = vramcalc.plan(vramcalc.read_config(config), gpus=["H100-80GB"]).memory.to_dict()
    keys = ("peak_allocated_bytes", "peak_reserved_bytes", "device_total_bytes", "components")
    assert {k: from_file[k] for k in keys} == {k: want[k] for k in keys}, (
        plan,
        json.dumps(_axolotl(plan)),
    )
