"""The traced ops of a training step: sizes as exact coefficients, FLOPs against flops.py,
syncs, and which ops the host dispatches from Python."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_LLAMA
from vramcalc.inventory import build_inventory
from vramcalc.speed.flops import estimate_flops
from vramcalc.speed.opprofile import OpProfile, op_profile, trace_profile
from vramcalc.speed.stepwork import step_work
from vramcalc.trace import optrace
from vramcalc.trace.oprecorder import LAUNCH
from vramcalc.training_plan import TrainingPlan

LORA_QV = {"method": "lora", "rank": 4, "targets": ("q_proj", "v_proj")}


def plan(**fields) -> TrainingPlan:
    return TrainingPlan(
        "tiny", **{"seq_len": 100, "batch_size": 3, "gradient_checkpointing": False, **fields}
    )


def work(p: TrainingPlan):
    inventory = build_inventory(TINY_LLAMA, p, use_cache=False)
    return step_work(op_profile(TINY_LLAMA, p), inventory, p), inventory


def _bytes_at(op, tokens: int, seq: int) -> float:
    return sum(a * f for a, f in zip(op.bytes[:3], (1, tokens, tokens * seq), strict=True))


def test_sizes_are_exact_coefficients(monkeypatch):
    """Traced at a sequence of 251 or of 241 tokens, every op has the same a + b·T + c·T·S,
    but for label-sized tensors of S ± 1 tokens (shifted labels), which count as constant."""
    p = plan(attn="eager", **LORA_QV)
    at_251 = trace_profile(TINY_LLAMA, p)
    monkeypatch.setattr(optrace, "TRACE_PRIMES", (241,))
    at_241 = trace_profile(TINY_LLAMA, p)
    assert (at_251.trace_seq, at_241.trace_seq) == (251, 241)
    ops = [op for run in at_251.micro_batch for op in run.ops]
    other = [op for run in at_241.micro_batch for op in run.ops]
    assert [(o.name, o.count) for o in ops] == [(o.name, o.count) for o in other]
    total = sum(o.count * _bytes_at(o, 3000, 1000) for o in ops)
    for a, b in zip(ops, other, strict=True):
        assert a.flops == b.flops, a.name
        if a.bytes != b.bytes:  # labels[..., 1:], pad(labels, (0, 1)): S - 1 or S + 1 tokens
            assert _bytes_at(a, 3000, 1000) < 1e-4 * total, a.name
    # eager attention materializes S x S scores: some op moves bytes in T·S
    assert any(o.bytes[2] for o in ops)


@pytest.mark.parametrize(
    "fields",
    [LORA_QV, {"method": "full"}, {"attn": "eager", **LORA_QV}, {"method": "lora", "rank": 8}],
)
def test_traced_matmul_flops_equal_the_flop_count(fields):
    """flops.py counts the model's matmuls; the trace also sees the rotary embedding's
    ``inv_freq @ position_ids`` (fp32, once per forward: head_dim/2 x 1 x S per sequence)."""
    p = plan(**fields)
    w, inventory = work(p)
    rope = 2 * 8 * 300  # 2 · head_dim/2 · T
    assert w.matmul_flops == estimate_flops(inventory, p).total + rope


def test_checkpoint_recompute_stops_before_the_last_matmul():
    """torch.utils.checkpoint (non-reentrant, early stop) recomputes a layer only up to its last
    saved tensor: the MLP output projection's forward is not run again (its input is saved)."""
    p = plan(method="full", gradient_checkpointing=True)
    w, inventory = work(p)
    down_proj = 2 * 300 * 128 * 64  # 2·T·in·out per layer
    rope = 2 * 8 * 300
    expected = estimate_flops(inventory, p).total - inventory.num_layers * down_proj + rope
    assert w.matmul_flops == expected


def test_syncs_per_step():
    # Trainer reads the loss twice (isnan, isinf) per micro-batch; the step ends with one
    assert work(plan(**LORA_QV))[0].syncs == 3
    assert work(plan(grad_accum=3, **LORA_QV))[0].syncs == 3 * 2 + 1
    # bitsandbytes int8: `outliers.any()` and argwhere's count in every int8 forward,
    # 7 quantized linears x 2 layers
    assert work(plan(quant="int8", **LORA_QV))[0].syncs == 7 * 2 * 2 + 3
    # a bitsandbytes optimizer synchronizes after each of the 8 adapter tensors
    w, _ = work(plan(optimizer="adamw_8bit", **LORA_QV))
    assert (w.bnb_tensors, w.syncs) == (8, 3 + 8)


def test_backward_ops_come_from_the_engine_not_python():
    """Ops the C++ autograd engine runs cost dispatches, not Python calls; the only Python
    in a plain backward: the gradient of the loss, what is stated from sources (FlashAttention's
    kernels), and Trainer's reads of the loss after it."""
    profile = op_profile(TINY_LLAMA, plan(method="full"))
    backward = [o for r in profile.micro_batch for o in r.ops if o.phase == "backward"]
    python = {o.name for o in backward if o.python}
    assert python <= {
        "contiguous",
        "_scaled_dot_product_flash_attention_backward",
        "sum",
        "_local_scalar_dense",
        "isnan",
        "isinf",
        "add_",
        "detach",  # training_step returns loss.detach()
        "ones_like",  # loss.backward()'s gradient of 1 (torch.autograd._make_grads)
    }
    assert sum(o.count * o.host for o in backward) > 10 * sum(o.count * o.python for o in backward)
    forward = [o for r in profile.micro_batch for o in r.ops if o.phase == "forward"]
    assert sum(o.count * o.python for o in forward) > 0.5 * sum(o.count for o in forward)


def test_bitsandbytes_4bit_dequantizes_in_forward_and_backward():
    p = plan(method="qlora", **{k: v for k, v in LORA_QV.items() if k != "method"})
    profile = op_profile(TINY_LLAMA, p)
    names = [(o.phase, o.name, o.count) for r in profile.micro_batch for o in r.ops]
    forward = sum(c for ph, n, c in names if n == "bnb_dequantize_4bit" and ph == "forward")
    backward = sum(c for ph, n, c in names if n == "bnb_dequantize_4bit" and ph == "backward")
    assert forward == 7 * 2  # every quantized linear, both layers
    # backward: only where the input needs a gradient (layer 0's q, k, v do not: first-layer rule)
    assert backward == 7 * 2 - 3


def test_profile_json_round_trip_and_launch_ops():
    profile = op_profile(TINY_LLAMA, plan(**LORA_QV))
    assert OpProfile.from_json(profile.to_json()) == profile
    ops = [o for r in profile.micro_batch for o in r.ops]
    assert all(o.flops == (0.0,) * 5 and o.bytes == (0.0,) * 5 for o in ops if o.kind == LAUNCH)
    assert profile.tensor_count(2, trainable=True) == 8  # A and B of q and v in 2 layers


def test_tracing_twice_gives_the_same_profile():
    """Python calls are told apart by the frame object itself (held until the next op, so a
    new frame cannot take its id), not by an id that the next call may reuse."""
    p = plan(method="qlora", rank=4)
    assert trace_profile(TINY_LLAMA, p) == trace_profile(TINY_LLAMA, p)


@pytest.mark.parametrize("rank", [1, 8, 24])
def test_one_profile_answers_every_rank(rank):
    """A profile traced at a prime rank, folded to ``rank``, is the profile traced at it."""
    from vramcalc.speed.opprofile import _recipe, trace_profile, traced_rank

    for fields in (
        {"method": "lora", "targets": ("all-linear",)},
        {"method": "qlora", "optimizer": "paged_adamw_8bit"},
        {"method": "adalora", "target_rank": 1, "total_step": 10},
    ):
        sized = {"init_rank": rank} if fields["method"] == "adalora" else {"rank": rank}
        plan = TrainingPlan(model="tiny", **sized, **fields)
        q = traced_rank(TINY_LLAMA, plan)
        assert q in (223, 211)
        folded = trace_profile(TINY_LLAMA, _recipe(plan, q), q).at_rank(rank, plan.optimizer)
        direct = trace_profile(TINY_LLAMA, _recipe(plan))
        # ops that coincide at this rank are merged in the direct profile and not in the folded
        # one (1 + 16 = 17 of them): the same work
        assert _census(folded.micro_batch) == _census(direct.micro_batch)
        assert _census(folded.optimizer) == _census(direct.optimizer)
        assert folded.bnb_params == direct.bnb_params


def _census(runs):
    from collections import Counter
    from dataclasses import replace

    total: Counter = Counter()
    for run in runs:
        for op in run.ops:
            total[(run.repeat, replace(op, count=1))] += op.count
    return total
