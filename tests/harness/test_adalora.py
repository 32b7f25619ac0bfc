"""The harness runs AdaLoRA as peft documents it: AdaLoraConfig, and update_and_allocate(step)
after optimizer.step() and before zero_grad(), from a Trainer callback or inline in the loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from vramcalc.training_plan import TrainingPlan
from vramcalc_harness.build import build_model, lora_target_modules, prepare_checkpoint
from vramcalc_harness.caselist import load_cases
from vramcalc_harness.errors import CaseError
from vramcalc_harness.scenario import Case
from vramcalc_harness.step import compute_dtype_for, run_loop, run_trainer

TINY_LLAMA = str(Path(__file__).parent / "cases" / "tiny-llama")
CASES = Path(__file__).resolve().parents[2] / "vramcalc_harness" / "cases" / "h200_adalora.yaml"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("scratch")


def adalora_case(**changes) -> Case:
    plan = TrainingPlan(
        model=TINY_LLAMA,
        method="adalora",
        init_rank=8,
        target_rank=4,
        total_step=100,
        seq_len=16,
        batch_size=2,
        **changes,
    )
    return Case(plan, steps=2, warmup_steps=1, split="calibration")


def test_build_is_peft_adalora_and_matches_the_inventory(scratch):
    from peft.tuners.adalora import AdaLoraModel

    from vramcalc.estimate import prepare

    case = adalora_case()
    built = build_model(case.plan, prepare_checkpoint(case.plan, scratch, "cpu"), "cpu")
    assert isinstance(built.model.base_model, AdaLoraModel)
    assert built.lora_targets_used == ("q_proj", "v_proj")  # peft's AdaLoRA default for llama
    # q: 8*(64+64)+8, v: 8*(64+32)+8, two layers; + 4 ranknum: peft 0.21 moves each adapter
    # to the bf16 base layer's dtype by re-assigning ParameterDict entries, which wraps the
    # cast ranknum in a new Parameter with requires_grad=True (a peft quirk: it then trains)
    ranknum = [p for n, p in built.model.named_parameters() if ".ranknum." in n]
    assert len(ranknum) == 4 and all(p.requires_grad and p.numel() == 1 for p in ranknum)
    adapters = prepare(case.plan.model, case.plan).inventory.trainable_params
    # the estimator counts them too (inventory.make_ranknum_trainable)
    assert built.trainable_params == adapters == 2 * (8 * 128 + 8 + 8 * 96 + 8) + 4 == 3620
    assert lora_target_modules(case.plan, "mistral") == "all-linear"  # peft has no default


def _watch_allocations(model, calls):  # noqa: ANN001, ANN202
    """Record each update_and_allocate call with whether the gradients were still there."""
    base = model.base_model
    original = base.update_and_allocate

    def spy(step):  # noqa: ANN001, ANN202
        grads = [p.grad is not None for n, p in base.model.named_parameters() if "lora_A" in n]
        calls.append((step, all(grads)))
        return original(step)

    base.update_and_allocate = spy


@pytest.mark.parametrize("recipe", ["trainer", "loop"])
def test_update_and_allocate_runs_every_step_before_zero_grad(scratch, recipe):
    case = adalora_case()
    built = build_model(case.plan, prepare_checkpoint(case.plan, scratch, "cpu"), "cpu")
    calls: list[tuple[int, bool]] = []
    _watch_allocations(built.model, calls)
    run = run_trainer if recipe == "trainer" else run_loop
    result = run(built.model, case, "cpu", compute_dtype_for(case, "cpu"))
    assert len(result.step_seconds_all) == 3
    assert calls == [(0, True), (1, True), (2, True)]
    allocator = built.model.base_model.rankallocator
    lora = [n for n, p in built.model.base_model.model.named_parameters() if "lora_" in n]
    assert sorted(allocator.exp_avg_ipt) == sorted(lora) == sorted(allocator.exp_avg_unc)


def test_cases_must_keep_the_rank_allocator_alive():
    with pytest.raises(CaseError, match="total_step must be given for method adalora"):
        Case(TrainingPlan(model="m", method="adalora"), steps=3, warmup_steps=2)
    with pytest.raises(CaseError, match="above the 5 steps the case runs"):
        Case(TrainingPlan(model="m", method="adalora", total_step=10, tfinal=5), steps=3)
    assert Case(TrainingPlan(model="m", method="adalora", total_step=1000), steps=3)


def test_case_ids_of_other_methods_do_not_change():
    case = Case(TrainingPlan(model="m", method="lora"), steps=3)
    assert '"init_rank"' not in case.canonical_key() and '"total_step"' not in case.canonical_key()


def test_the_h200_adalora_case_list():
    cases = load_cases(CASES)
    assert len(cases) >= 4 and all(c.plan.method == "adalora" for c in cases)
    assert {c.split for c in cases} == {"calibration", "validation"}
    assert len({c.case_id for c in cases}) == len(cases)
