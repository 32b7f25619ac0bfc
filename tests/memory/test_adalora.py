"""AdaLoRA (``--method adalora``): validation, counts from peft's AdaLoraConfig on meta, exact
bytes of its own components on tiny configs, the CLI, and the traced run against the rules."""

from __future__ import annotations

import json
import math
import warnings

import pytest
from click.testing import CliRunner

from tests.conftest import TINY_LLAMA
from vramcalc.cli import cli
from vramcalc.errors import InvalidPlanError
from vramcalc.estimate import estimate_from_inventory
from vramcalc.inventory import build_inventory, cache_key
from vramcalc.memory import alloc_bytes
from vramcalc.memory.adalora import estimate_adalora
from vramcalc.memory.overhead import load_calibration
from vramcalc.training_plan import TrainingPlan

H, KV, INTER, LAYERS = 64, 32, 128, 2  # TINY_LLAMA: 4 heads x 16, 2 kv heads


def plan(**kwargs) -> TrainingPlan:
    return TrainingPlan("tiny", method="adalora", **kwargs)


# -- validation -------------------------------------------------------------------------------
def test_peft_defaults():
    p = plan()
    assert (p.init_rank, p.target_rank, p.tinit, p.tfinal, p.delta_t) == (12, 8, 0, 0, 1)
    assert p.orth_reg_weight == 0.5 and p.total_step is None
    assert p.adapter_rank == 12 and p.uses_adapters and p.quant == "none"
    assert p.adalora_total_step == 1  # the smallest schedule peft accepts
    assert TrainingPlan("tiny", method="lora", init_rank=64).adapter_rank == 8


def test_every_problem_at_once_naming_the_flag():
    with pytest.raises(InvalidPlanError) as info:
        plan(init_rank=8, target_rank=16, rank=16, tinit=50, tfinal=50, total_step=100, dora=True)
    assert info.value.problems == [
        "--target-rank 16 is above --init-rank 8: AdaLoRA only prunes ranks; give a target "
        "rank <= the initial rank.",
        "--tinit 50 + --tfinal 50 must be below --total-step 100: the schedule leaves no "
        "budgeting phase (peft AdaLoraConfig).",
        "--rank 16 is LoRA's rank, which AdaLoRA ignores; use --init-rank (and --target-rank) "
        "with --method adalora.",
        "--dora is not supported by --method adalora (peft AdaLoraConfig).",
    ]


def test_number_problems_and_sharding():
    with pytest.raises(InvalidPlanError) as info:
        plan(init_rank=0, tinit=-1, delta_t=0, total_step=0, orth_reg_weight=-1.0)
    assert info.value.problems == [
        "--init-rank must be a positive integer, got 0.",
        "--tinit must be an integer >= 0, got -1.",
        "--delta-t must be a positive integer, got 0.",
        "--total-step must be a positive integer, got 0.",
    ]
    with pytest.raises(InvalidPlanError, match="--orth-reg-weight must be >= 0"):
        plan(orth_reg_weight=-1.0)
    with pytest.raises(InvalidPlanError, match="--method adalora with --strategy fsdp"):
        plan(num_gpus=2, strategy="fsdp")
    assert plan(num_gpus=2).num_gpus == 2  # ddp is fine


def test_schedule_check_matches_peft():
    from peft import AdaLoraConfig

    for tinit, tfinal, total in ((0, 0, 1), (10, 20, 31), (10, 20, 30)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                AdaLoraConfig(tinit=tinit, tfinal=tfinal, total_step=total)
            peft_ok = True
        except ValueError:
            peft_ok = False
        try:
            plan(tinit=tinit, tfinal=tfinal, total_step=total)
            ours = True
        except InvalidPlanError:
            ours = False
        assert ours == peft_ok, (tinit, tfinal, total)


# -- counts -----------------------------------------------------------------------------------
def test_counts_by_hand_formula_on_default_targets():
    inv = build_inventory(TINY_LLAMA, plan(), use_cache=False)
    assert inv.lora_targets == ("q_proj", "v_proj")  # peft's AdaLoRA default for llama
    r = 12
    # A, B and E of q_proj and v_proj, and each one's ranknum (trainable in a real run)
    per_layer = (r * (H + H) + r + 1) + (r * (H + KV) + r + 1)
    assert inv.adapter_params == inv.trainable_params == LAYERS * per_layer == 5428
    assert dict(inv.trainable_shapes) == {(r, 1): 4, (r, H): 4, (H, r): 2, (KV, r): 2, (1,): 4}


def test_counts_match_peft_on_all_linear():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from vramcalc.adapters import adalora_config

    p = plan(init_rank=6, target_rank=4, targets=("all-linear",))
    inv = build_inventory(TINY_LLAMA, p, use_cache=False)
    # on the CPU, as a run builds it (under torch.device("meta") peft leaves ranknum trainable)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA))
    from peft import get_peft_model

    peft_model = get_peft_model(model, adalora_config(p, "all-linear"))
    trainable = sum(q.numel() for q in peft_model.parameters() if q.requires_grad)
    # on a GPU peft re-wraps every ranknum as it moves the adapter to the base layer's device,
    # and it trains (every measured AdaLoRA run): one more parameter per adapted module
    ranknums = sum(1 for n, _ in peft_model.named_parameters() if ".ranknum." in n)
    assert ranknums == LAYERS * 7
    assert inv.adapter_params == trainable + ranknums
    modules = {"q_proj": (H, H), "k_proj": (H, KV), "v_proj": (H, KV), "o_proj": (H, H)}
    modules |= {"gate_proj": (H, INTER), "up_proj": (H, INTER), "down_proj": (INTER, H)}
    assert trainable == LAYERS * sum(6 * (i + o) + 6 for i, o in modules.values())


def test_cache_key_has_the_adalora_shape():
    keys = {cache_key(TINY_LLAMA, p) for p in (plan(), plan(init_rank=16), plan(target_rank=4))}
    assert len(keys) == 2  # the target rank and the schedule change no shape
    assert cache_key(TINY_LLAMA, plan()) != cache_key(
        TINY_LLAMA, TrainingPlan("tiny", method="lora", rank=12)
    )


# -- bytes ------------------------------------------------------------------------------------
def test_adalora_bytes_exactly():
    r = 12
    inv = build_inventory(TINY_LLAMA, plan())
    est = estimate_adalora(inv, plan())
    # 3 fp32 copies (ipt, exp_avg_ipt, exp_avg_unc) of every A, E, B; each tensor rounded to 512
    tensors = {(r, 1): 4, (r, H): 4, (H, r): 2, (KV, r): 2}
    copy = sum(alloc_bytes(4 * math.prod(s), n) for s, n in tensors.items())
    assert copy == 4 * 512 + 4 * 3072 + 2 * 3072 + 2 * 1536
    assert est.rank_allocator_bytes == 3 * copy
    assert est.update_transient_bytes == 3 * alloc_bytes(4 * r * H)
    # regulariser: 2 bf16 copies of each A/B + the norm's r x r input and scalar result, then the
    # last P P^T and I, the running sum and its scaled copy
    ab = {s: n for s, n in tensors.items() if s != (r, 1)}
    per = {s: 2 * alloc_bytes(2 * math.prod(s)) + alloc_bytes(4 * r * r) + 512 for s in ab}
    assert est.orth_reg_bytes == sum(per[s] * n for s, n in ab.items()) + 2 * 512 + 2 * 512
    assert est.early_gradient_bytes == sum(alloc_bytes(4 * math.prod(s), n) for s, n in ab.items())
    assert est.ranknum_bytes == 0  # ranknum is trainable: counted with the adapters
    assert estimate_adalora(inv, TrainingPlan("tiny", method="lora")).rank_allocator_bytes == 0


def test_estimate_adds_them_where_they_live():
    cal = load_calibration()
    inv = build_inventory(TINY_LLAMA, plan())
    ada = estimate_from_inventory(inv, plan(), cal)
    own = estimate_adalora(inv, plan())
    assert ada.components["rank_allocator"] == own.rank_allocator_bytes
    assert ada.components["adapters"] == 4 * inv.adapter_params
    assert ada.rules["adalora"].startswith("AdaLoRA at init_r=12")
    assert any("no tensor shrinks" in a for a in ada.assumptions)
    same = estimate_from_inventory(inv, plan(total_step=1000, tinit=10, target_rank=2), cal)
    assert same.peak_allocated_bytes == ada.peak_allocated_bytes  # the schedule is values only


# -- CLI --------------------------------------------------------------------------------------
def test_cli_plan_adalora_text_and_json(tiny_llama_dir):
    runner = CliRunner()
    args = ["plan", "--model", str(tiny_llama_dir), "--method", "adalora", "--init-rank", "16"]
    text = runner.invoke(cli, [*args, "--gpu", "H100-80GB"], catch_exceptions=False)
    assert text.exit_code == 0, text.output
    assert "AdaLoRA rank-allocator state" in text.output
    assert "PEFT AdaLoRA init_r=16 -> target_r=8" in text.output
    result = runner.invoke(cli, [*args, "--json"], catch_exceptions=False)
    data = json.loads(result.stdout)
    assert data["plan"]["method"] == "adalora" and data["plan"]["init_rank"] == 16
    assert data["components"]["rank_allocator"] > 0
    assert sum(data["components"].values()) == data["device_total_bytes"]


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--rank", "16"],
            "Error: --rank 16 is LoRA's rank, which AdaLoRA ignores; use --init-rank",
        ),
        (
            ["--init-rank", "4", "--target-rank", "8"],
            "Error: --target-rank 8 is above --init-rank 4",
        ),
        (
            ["--tinit", "200", "--tfinal", "800", "--total-step", "1000"],
            "Error: --tinit 200 + --tfinal 800 must be below --total-step 1000",
        ),
    ],
)
def test_cli_errors(tiny_llama_dir, args, message):
    result = CliRunner().invoke(
        cli, ["plan", "--model", str(tiny_llama_dir), "--method", "adalora", *args]
    )
    assert result.exit_code == 1
    assert message in result.output and result.output.count("Error:") == 1


def test_adalora_options_on_another_method_warn(tiny_llama_dir):
    result = CliRunner().invoke(
        cli, ["plan", "--model", str(tiny_llama_dir), "--init-rank", "16", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert (
        "--init-rank only applies to --method adalora; --method lora ignores it."
        in json.loads(result.stdout)["warnings"]
    )


# -- the traced run ---------------------------------------------------------------------------
TRACED = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


@pytest.mark.slow
def test_traced_run_holds_the_rank_allocator_and_matches_the_rules():
    """The simulation runs peft's real AdaLoRA forward (regulariser included) and
    ``update_ipt`` after each optimizer step; the rules land within 2 % of its peak, and the
    traced run ends with the adapters' three fp32 rank-allocator copies still allocated."""
    from vramcalc.memory.allocator import AllocatorConfig
    from vramcalc.memory.slack import simulate_plan, simulate_run
    from vramcalc.trace.steptrace import trace_steps

    p = TrainingPlan(
        "tiny", method="adalora", init_rank=32, targets=("all-linear",), seq_len=64, batch_size=2
    )
    lora = TrainingPlan(
        "tiny", method="lora", rank=32, targets=("all-linear",), seq_len=64, batch_size=2
    )
    inv = build_inventory(TRACED, p)
    sim = simulate_plan(TRACED, p, use_cache=False)
    est = estimate_from_inventory(inv, p, load_calibration(), simulation=sim)
    assert abs(est.components["trace_difference"]) < 0.02 * sim.peak_allocated_bytes["default"]

    def final(q):  # noqa: ANN001, ANN202
        trace = trace_steps(TRACED, q, steps=2, unroll=False)
        return simulate_run(trace, q, AllocatorConfig()).result.final_allocated_bytes

    own = estimate_adalora(inv, p)
    # AdaLoRA ends holding what LoRA does + its lora_E, their AdamW states, ranknum and the
    # rank allocator's three copies (lora_E adds (r, 1) tensors: compare above the LoRA run)
    extra = final(p) - final(lora)
    e_bytes = alloc_bytes(4 * 32, sum(n for s, n in inv.trainable_shapes if s == (32, 1)))
    assert extra >= own.rank_allocator_bytes
    # each module's ranknum trains: the parameter, two AdamW states and the fused step count
    ranknums = 4 * 512 * sum(n for s, n in inv.trainable_shapes if s == (1,))
    assert extra <= own.rank_allocator_bytes + 3 * e_bytes + ranknums + 64 * 512
