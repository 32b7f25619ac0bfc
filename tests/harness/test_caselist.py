"""The proposed GPU case list: coverage, the stated split rule, every model in the catalog."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from vramcalc.catalog import resolve_model
from vramcalc.training_plan import TrainingPlan
from vramcalc_harness.caselist import load_cases
from vramcalc_harness.launcher import check_models

CASE_LIST = Path(__file__).resolve().parents[2] / "vramcalc_harness" / "cases" / "h100.yaml"
HELD_OUT = {"Qwen/Qwen2.5-1.5B", "meta-llama/Llama-3.2-3B", "mistralai/Mistral-7B-v0.1"}


@pytest.fixture(scope="module")
def cases():
    return load_cases(CASE_LIST)


def rule_split(case) -> str:
    """The split rule stated at the top of h100.yaml."""
    plan = case.plan
    if plan.model in HELD_OUT or plan.seq_len >= 4096 or plan.batch_size >= 16:
        return "validation"
    return "calibration"


def test_every_case_follows_the_stated_split_rule(cases):
    wrong = [
        (c.plan.model, c.plan.seq_len, c.plan.batch_size, c.split)
        for c in cases
        if c.split != rule_split(c)
    ]
    assert wrong == []
    counts = Counter(c.split for c in cases)
    assert counts == {"calibration": 26, "validation": 17}


def test_case_list_covers_what_the_estimator_must_get_right(cases):
    plans = [c.plan for c in cases]
    assert len(cases) >= 40
    assert check_models(cases) == []
    model_types = {resolve_model(p.model).config_dict["model_type"] for p in plans}
    assert model_types >= {"llama", "qwen2", "gemma2", "phi3", "opt", "mistral"}
    assert {p.method for p in plans} == {"full", "lora", "qlora"}
    assert {p.quant for p in plans} == {"none", "int8", "nf4"}
    assert {p.optimizer for p in plans} >= {"adamw_torch", "adamw_8bit", "paged_adamw_32bit"}
    targets = {p.targets for p in plans}
    assert {
        ("q_proj", "v_proj"),
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        ("all-linear",),
        None,
    } <= targets
    assert {p.rank for p in plans if p.uses_adapters} >= {8, 16, 32, 64}
    assert min(p.seq_len for p in plans) == 256 and max(p.seq_len for p in plans) == 8192
    assert min(p.batch_size for p in plans) == 1 and max(p.batch_size for p in plans) == 16
    assert {p.gradient_checkpointing for p in plans} == {True, False}
    assert {c.recipe for c in cases} == {"trainer", "loop"}
    assert "meta-llama/Llama-2-13b-hf" in {p.model for p in plans}
    assert all((c.steps, c.warmup_steps) == (3, 2) for c in cases)
    assert {p.attn for p in plans} == {"sdpa", "eager"}
    assert all(
        p.attn == "eager" for p in plans if p.model == "google/gemma-2-2b"
    )  # no SDPA for Gemma2


@pytest.mark.slow
def test_every_lora_target_exists_in_its_model(cases):
    """Built on the meta device by the estimator's inventory: a wrong name fails here, not on the GPU."""
    from vramcalc.inventory import build_inventory

    named = {
        (c.plan.model, c.plan.targets)
        for c in cases
        if c.plan.targets not in (None, ("all-linear",))
    }
    for model, targets in sorted(named):
        plan = TrainingPlan(model=model, method="lora", targets=targets)
        inventory = build_inventory(resolve_model(model).config_dict, plan)
        assert set(inventory.lora_targets) == set(targets), plan


# -- the 2-GPU list ---------------------------------------------------------------------------------
TWO_GPU_LIST = CASE_LIST.with_name("h200x2.yaml")


def two_gpu_rule_split(case) -> str:
    """The split rule stated at the top of h200x2.yaml."""
    plan = case.plan
    if (
        plan.model == "meta-llama/Llama-2-13b-hf"
        or plan.strategy in ("zero1", "zero2", "zero3")
        or plan.seq_len >= 4096
        or plan.batch_size >= 16
        or plan.cpu_offload
    ):
        return "validation"
    return "calibration"


def test_two_gpu_list_follows_its_split_rule_and_covers_every_strategy():
    cases = load_cases(TWO_GPU_LIST)
    assert [c.split for c in cases] == [two_gpu_rule_split(c) for c in cases]
    assert Counter(c.split for c in cases) == {"calibration": 7, "validation": 5}
    assert check_models(cases) == []
    plans = [c.plan for c in cases]
    assert all(p.num_gpus == 2 for p in plans)
    assert {p.strategy for p in plans} == {"ddp", "fsdp", "fsdp-grad-op", "zero2", "zero3"}
    assert {(p.method, p.strategy) for p in plans} >= {
        ("lora", "ddp"),
        ("lora", "fsdp"),
        ("qlora", "ddp"),
        ("qlora", "fsdp"),
        ("full", "ddp"),
        ("full", "fsdp"),
    }
    assert any(p.cpu_offload for p in plans)
    assert {p.model for p in plans} == {"meta-llama/Llama-3.1-8B", "meta-llama/Llama-2-13b-hf"}
    assert all((c.steps, c.warmup_steps, c.recipe) == (3, 2, "trainer") for c in cases)
    # one LoRA plan under every strategy: the sharding rules compared on one workload
    same = {
        p.strategy
        for p in plans
        if p.with_(strategy="ddp", cpu_offload=False) == plans[0] and not p.cpu_offload
    }
    assert same == {"ddp", "fsdp", "fsdp-grad-op", "zero2", "zero3"}


ROUND2 = CASE_LIST.with_name("h200_round2.yaml")


def test_round2_list_follows_the_same_split_rule_and_covers_what_issue_10_and_11_ask():
    cases = load_cases(ROUND2)
    assert [c.case_id for c in cases if c.split != rule_split(c)] == []
    assert Counter(c.split for c in cases) == {"calibration": 24, "validation": 16}
    plans = [c.plan for c in cases]
    int8 = {(p.model, p.gradient_checkpointing) for p in plans if p.quant == "int8"}
    models_both = {m for m, ck in int8 if (m, not ck) in int8}
    assert len(models_both) >= 3  # INT8 with checkpointing on and off on 3+ models
    full_optims = {p.optimizer for p in plans if p.method == "full"}
    assert {"adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"} <= full_optims
    assert max(p.seq_len for p in plans) >= 16384 and max(p.batch_size for p in plans) >= 32
    assert any(p.dora for p in plans) and any(p.attn == "eager" for p in plans)
    assert sum(p.allocator == "expandable" for p in plans) >= 4
    traced = [c for c in cases if c.record_trace]
    assert len(traced) >= 6 and {c.plan.allocator for c in traced} == {"default", "expandable"}
    # repeatability: plans measured again with seed 1 whose seed-0 twin is in this list or h100.yaml
    seed0 = {c.plan for c in (*cases, *load_cases(CASE_LIST)) if c.seed == 0 and not c.record_trace}
    assert sum(c.seed == 1 and c.plan in seed0 for c in cases) >= 2
    assert check_models(cases) == []


# -- the simulated-world list ---------------------------------------------------------------------
WORLD = CASE_LIST.with_name("h200_world.yaml")
HELD_OUT_OR_70B = HELD_OUT | {"meta-llama/Llama-3.1-70B", "meta-llama/Llama-2-70b-hf"}


def world_rule_split(case) -> str:
    """The split rule stated at the top of h200_world.yaml."""
    plan = case.plan
    if (
        plan.model in HELD_OUT_OR_70B
        or plan.cpu_offload
        or plan.num_gpus == 8
        or plan.seq_len >= 4096
        or plan.batch_size >= 16
    ):
        return "validation"
    return "calibration"


def test_world_list_follows_its_split_rule_and_covers_what_issue_15_asks():
    cases = load_cases(WORLD)
    assert [c.case_id for c in cases if c.split != world_rule_split(c)] == []
    assert Counter(c.split for c in cases) == {"calibration": 10, "validation": 18}
    assert check_models(cases) == []
    assert all(c.simulate_world == c.plan.num_gpus > 1 for c in cases)
    covered = {(c.plan.model, c.plan.method, c.plan.strategy, c.plan.num_gpus) for c in cases}
    for model in ("meta-llama/Llama-3.1-8B", "mistralai/Mistral-7B-v0.1"):
        for method in ("lora", "qlora"):
            assert {(model, method, "fsdp", n) for n in (2, 4, 8)} <= covered
    qwen = "Qwen/Qwen2.5-1.5B"
    assert {
        (qwen, "full", "fsdp", 2),
        (qwen, "full", "fsdp", 4),
        (qwen, "full", "ddp", 2),
    } <= covered
    assert ("meta-llama/Llama-3.1-70B", "qlora", "fsdp", 8) in covered
    offload = {c.plan.cpu_offload for c in cases if c.plan.model == "meta-llama/Llama-3.1-70B"}
    assert offload == {True, False}
    # the 2-GPU plans of h200x2.yaml, simulated: the real and the simulated record compare directly
    real = {c.plan for c in load_cases(TWO_GPU_LIST)}
    assert sum(c.plan in real for c in cases) >= 5


SERVE = CASE_LIST.with_name("h200_serve.yaml")
SERVE_HELD_OUT = {"meta-llama/Llama-2-13b-hf", "Qwen/Qwen2.5-7B"}


def serve_rule_split(case) -> str:
    """The split rule stated at the top of h200_serve.yaml."""
    plan = case.plan
    if plan.model in SERVE_HELD_OUT or plan.context >= 16384 or plan.batch >= 16:
        return "validation"
    return "calibration"


def test_serve_case_list_loads_follows_its_rule_and_covers_serving():
    from vramcalc_harness.serve_case import ServeCase

    cases = load_cases(SERVE)
    assert len(cases) >= 15 and all(isinstance(c, ServeCase) for c in cases)
    assert check_models(cases) == []
    assert [c.split for c in cases] == [serve_rule_split(c) for c in cases]
    assert Counter(c.split for c in cases) == {"calibration": 10, "validation": 9}
    plans = [c.plan for c in cases]
    assert {p.mode for p in plans} == {"merged", "unmerged", "multi"}
    assert {p.quant for p in plans} == {"none", "nf4"}
    assert {p.cache for p in plans} == {"dynamic", "static"}
    assert min(p.batch for p in plans) == 1 and max(p.batch for p in plans) == 32
    assert min(p.context for p in plans) == 1024 and max(p.context for p in plans) == 32768
    assert {len(p.adapters) for p in plans if p.mode == "multi"} >= {4, 8}
    # Llama-2's 4k positions are not stretched
    assert all(p.context <= 4096 for p in plans if p.model == "meta-llama/Llama-2-13b-hf")


# -- the second simulated-world list (same rule as h200_world.yaml) --------------------------------
WORLD2 = CASE_LIST.with_name("h100_world2.yaml")


def test_world2_list_follows_the_world_rule_and_covers_where_the_estimate_was_worst():
    cases = load_cases(WORLD2)
    assert [c.case_id for c in cases if c.split != world_rule_split(c)] == []
    assert Counter(c.split for c in cases) == {"calibration": 10, "validation": 14}
    assert check_models(cases) == []
    assert all(c.simulate_world == c.plan.num_gpus > 1 for c in cases)
    plans = [c.plan for c in cases]
    qlora_fsdp = {(p.model, p.num_gpus) for p in plans if p.method == "qlora" and not p.cpu_offload}
    for model in ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B"):
        assert {(model, n) for n in (2, 4, 8)} <= qlora_fsdp
    assert sum(p.cpu_offload for p in plans) >= 5
    assert sum(p.strategy == "fsdp-grad-op" for p in plans) >= 4
    assert sum(p.allocator == "expandable" for p in plans) >= 4
    # expandable twins of plans measured with the default allocator in h200_world.yaml
    world = {c.plan for c in load_cases(WORLD)}
    assert (
        sum(p.with_(allocator="default") in world for p in plans if p.allocator == "expandable")
        >= 3
    )
    # nothing measured already is repeated
    assert not {p for p in plans} & world


SERVE2 = CASE_LIST.with_name("h100_serve2.yaml")


def test_serve2_list_follows_the_serve_rule_and_covers_what_the_serving_issue_asks():
    from vramcalc_harness.serve_case import ServeCase

    cases = load_cases(SERVE2)
    assert all(isinstance(c, ServeCase) for c in cases)
    assert check_models(cases) == []
    assert [c.split for c in cases] == [serve_rule_split(c) for c in cases]
    assert Counter(c.split for c in cases) == {"calibration": 7, "validation": 6}
    plans = [c.plan for c in cases]
    assert {p.quant for p in plans} == {"none", "int8", "nf4"}
    assert any(p.batch >= 16 and p.context >= 16384 for p in plans)  # large batch x long prompt
    assert sum(p.cache == "static" for p in plans) >= 3
    assert max(len(p.adapters) for p in plans if p.mode == "multi") >= 16
    dora = [p for p in plans if p.adapters and p.adapters[0].dora]
    assert {p.mode for p in dora} == {"unmerged", "merged"}
    # nothing of h200_serve.yaml repeated
    assert not {c.case_id for c in cases} & {c.case_id for c in load_cases(SERVE)}


SERVE3 = CASE_LIST.with_name("h100_serve3.yaml")


def test_serve3_list_follows_the_serve_rule_and_covers_the_int8_merge_and_dora():
    from vramcalc_harness.serve_case import ServeCase

    cases = load_cases(SERVE3)
    assert all(isinstance(c, ServeCase) for c in cases)
    assert check_models(cases) == []
    assert [c.split for c in cases] == [serve_rule_split(c) for c in cases]
    assert Counter(c.split for c in cases) == {"calibration": 4, "validation": 3}
    plans = [c.plan for c in cases]
    assert {p.quant for p in plans} == {"int8"}
    merged = [p for p in plans if p.mode == "merged"]
    assert {p.model for p in merged} >= {"meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B"}
    assert any(len(p.adapters) > 1 for p in merged)  # merged copies of an int8 base
    dora = [p for p in plans if p.adapters[0].dora]
    assert {p.mode for p in dora} == {"unmerged", "merged"}
    # nothing measured already is repeated
    before = {c.case_id for c in load_cases(SERVE) + load_cases(SERVE2)}
    assert not {c.case_id for c in cases} & before


def test_the_serve_trace_list_is_the_missed_cases_again_with_their_traces():
    """h100_servetrace.yaml measures serving cases measured before again with the allocator's
    trace: the same plans and rounds, only the trace flag (and so the ids) differ."""
    from dataclasses import replace

    cases = load_cases(CASE_LIST.with_name("h100_servetrace.yaml"))
    assert all(c.record_trace and c.split == serve_rule_split(c) for c in cases)
    untraced = [replace(c, record_trace=False).case_id for c in cases]
    assert untraced == ["e0bc87cb1591fc04", "35e32377aab5cb6e"]
    assert not set(untraced) & {c.case_id for c in cases}
    measured = {c.case_id for c in load_cases(SERVE2) + load_cases(SERVE3)}
    assert set(untraced) <= measured


ZERO = CASE_LIST.with_name("h100_zero.yaml")


def test_zero_list_is_all_validation_and_covers_every_stage_and_method():
    cases = load_cases(ZERO)
    assert Counter(c.split for c in cases) == {"validation": 21}  # rule (b) of h200x2.yaml
    assert check_models(cases) == []
    assert all(c.simulate_world == c.plan.num_gpus > 1 for c in cases)
    covered = {(c.plan.strategy, c.plan.method) for c in cases}
    assert {("zero1", "lora"), ("zero2", "lora"), ("zero3", "lora")} <= covered
    assert {("zero2", "qlora"), ("zero3", "qlora"), ("zero2", "full"), ("zero3", "full")} <= covered
    # the 8B ZeRO plans of h200x2.yaml, simulated: their real 2-GPU twins compare directly
    real = {c.plan for c in load_cases(TWO_GPU_LIST)}
    assert {c.plan.strategy for c in cases if c.plan in real} == {"zero2", "zero3"}
    # each traced case repeats an untraced one (same plan, so the peaks compare)
    traced = [c.plan for c in cases if c.record_trace]
    untraced = {c.plan for c in cases if not c.record_trace}
    assert len(traced) == 4 and set(traced) <= untraced


def test_held_out_zero_list_is_validation_offload_and_kbit_zero3_on_new_plans():
    """h100_zerohold.yaml: the kinds simulated last (ZeRO-Offload, k-bit ZeRO-3) on plans that
    no simulation was built against: none is a plan of h100_zero.yaml."""
    cases = load_cases(CASE_LIST.with_name("h100_zerohold.yaml"))
    assert Counter(c.split for c in cases) == {"validation": 8}  # rule (b) of h200x2.yaml
    assert check_models(cases) == []
    assert all(c.simulate_world == c.plan.num_gpus > 1 for c in cases)
    assert all(c.plan.cpu_offload or (c.plan.strategy, c.plan.is_kbit) == ("zero3", True)
               for c in cases)  # fmt: skip
    assert {c.plan.strategy for c in cases if c.plan.cpu_offload} == {"zero1", "zero2", "zero3"}
    assert not {c.plan for c in cases} & {c.plan for c in load_cases(ZERO)}


def test_int8_zero3_list_is_validation_and_the_two_int8_zero3_plans():
    """h100_zeroint8.yaml: int8 LoRA under ZeRO-3 (the one ZeRO plan the rules answered, no
    measurement behind it), on the GPU and offloaded; nothing measured already is repeated."""
    cases = load_cases(CASE_LIST.with_name("h100_zeroint8.yaml"))
    assert Counter(c.split for c in cases) == {"validation": 2}  # rule (b) of h200x2.yaml
    assert check_models(cases) == []
    assert all(c.simulate_world == c.plan.num_gpus == 2 for c in cases)
    assert {(c.plan.strategy, c.plan.method, c.plan.quant) for c in cases} == {
        ("zero3", "lora", "int8")
    }
    assert [c.plan.cpu_offload for c in cases] == [False, True]
    before = load_cases(ZERO) + load_cases(CASE_LIST.with_name("h100_zerohold.yaml"))
    assert not {c.case_id for c in cases} & {c.case_id for c in before}


def test_int8_zero3_trace_list_is_the_two_int8_plans_again_with_their_traces():
    """h100_zeroint8trace.yaml measures h100_zeroint8.yaml's two plans again with the
    allocator's trace (to find what the world trace got wrong): only the trace flag differs."""
    from dataclasses import replace

    cases = load_cases(CASE_LIST.with_name("h100_zeroint8trace.yaml"))
    assert all(c.record_trace and c.split == "validation" for c in cases)
    first = load_cases(CASE_LIST.with_name("h100_zeroint8.yaml"))
    assert [replace(c, record_trace=False).case_id for c in cases] == [c.case_id for c in first]


def test_held_out_int8_zero3_list_is_validation_on_plans_no_simulation_was_built_against():
    """h100_zeroint8hold.yaml: int8 LoRA ZeRO-3 on another model, rank, targets, world size
    and sequence length than the plans the int8 world trace was fixed on."""
    cases = load_cases(CASE_LIST.with_name("h100_zeroint8hold.yaml"))
    assert Counter(c.split for c in cases) == {"validation": 3}  # rule (b) of h200x2.yaml
    assert check_models(cases) == []
    assert all(c.simulate_world == c.plan.num_gpus > 1 for c in cases)
    assert {(c.plan.strategy, c.plan.method, c.plan.quant) for c in cases} == {
        ("zero3", "lora", "int8")
    }
    built_on = load_cases(CASE_LIST.with_name("h100_zeroint8.yaml"))
    assert not {c.plan for c in cases} & {c.plan for c in built_on}
    assert {c.plan.model for c in cases} > {c.plan.model for c in built_on}
    assert {c.plan.num_gpus for c in cases} > {c.plan.num_gpus for c in built_on}
