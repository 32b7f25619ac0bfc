"""AdaLoRA's memory beyond LoRA's: the rank allocator's state, the orthogonal regulariser.

Rules, read from peft 0.21 (``peft/tuners/adalora/``):

* Adapters: each adapted module holds P = ``lora_A`` (r, in), Λ = ``lora_E`` (r, 1) and
  Q = ``lora_B`` (out, r) at ``r = init_r``, fp32, all trainable (counted by the inventory,
  so weights, gradients and AdamW states follow the LoRA rules), plus ``ranknum``, an fp32
  (1,) tensor that does not train. Pruning a rank is ``lora_E.masked_fill_(..., 0)``
  (``RankAllocator.mask_to_budget``): no tensor changes shape during training, so the
  memory stays at ``init_r`` for the whole run. Only ``resize_modules_by_rank_pattern``
  (loading a saved adapter) makes smaller tensors.
* ``RankAllocator.update_ipt``, called by ``AdaLoraModel.update_and_allocate(step)``: for
  every trainable tensor whose name holds ``lora_`` (A, E and B) it keeps ``ipt`` = |p·grad|,
  its moving average ``exp_avg_ipt`` and the uncertainty ``exp_avg_unc``: three fp32
  tensors like the parameter, created at the first call and live until
  ``reset_ipt`` at step ``total_step - tfinal``. One update makes at most three
  temporaries of one tensor at a time (``beta2 * exp_avg_unc``, ``ipt - exp_avg_ipt``,
  its ``abs``, ...). peft's docs call it after ``optimizer.step()`` and before
  ``zero_grad()``: the gradients are live. The recipe assumed: a Trainer callback (or
  the user's loop) makes that call every optimizer step.
* ``AdaLoraModel.forward`` adds ``orth_reg_weight · mean ||P Pᵀ - I||_F`` over every A
  and B whenever the output has a loss: peft computes it even at ``orth_reg_weight=0``
  (and in eval), so its memory does not depend on the weight. Under bf16 autocast
  ``p @ p.T`` casts the leaf ``p`` (cached) and the view ``p.T`` to bf16 and ``mm`` saves
  both: 2 · 2 bytes per A/B element until backward; the norm saves its r×r input
  ``P Pᵀ - I`` (bf16 under CPU autocast; counted as fp32, as CUDA autocast may run the
  norm in fp32) and its scalar result. The last tensor's ``P Pᵀ`` and ``I`` and the
  running sum are live at the end. The loss's
  backward runs this branch first (its nodes are the newest), so every A/B gradient
  exists from the start of backward, not layer by layer as in LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vramcalc.inventory import ModelInventory
from vramcalc.memory import alloc_bytes
from vramcalc.training_plan import TrainingPlan

FP32 = 4
BF16 = 2
RANK_ALLOCATOR_COPIES = 3  # ipt, exp_avg_ipt, exp_avg_unc
UPDATE_TEMPORARIES = 3  # the most update_ipt holds at once, each like one adapter tensor


@dataclass(frozen=True)
class AdaLoraEstimate:
    """AdaLoRA's own bytes (all zero for other methods)."""

    rank_allocator_bytes: int  # ipt + exp_avg_ipt + exp_avg_unc, live from the first step
    update_transient_bytes: int  # update_ipt's temporaries (gradients still live)
    orth_reg_bytes: int  # saved by the orthogonal regulariser from forward's end to backward
    ranknum_bytes: int  # 0: ranknum is trainable, so the inventory counts it with the adapters
    # gradients of every lora_A/B, which the regulariser's backward makes before the layers'
    early_gradient_bytes: int
    rule: str


NONE = AdaLoraEstimate(0, 0, 0, 0, 0, "")


def adapter_tensors(inventory: ModelInventory) -> list[tuple[tuple[int, ...], int]]:
    """AdaLoRA's lora_A, lora_E and lora_B tensors as (shape, how many): the trainable ones but
    ``ranknum`` (one (1,) per module), which the rank allocator does not track (its
    ``update_ipt`` takes the parameters named ``lora_``)."""
    return [(shape, count) for shape, count in inventory.trainable_shapes if shape != (1,)]


def adapted_modules(inventory: ModelInventory, init_rank: int) -> int:
    """How many modules carry an adapter: one Λ = ``lora_E`` (init_rank, 1) each."""
    return sum(count for shape, count in inventory.trainable_shapes if shape == (init_rank, 1))


def estimate_adalora(inventory: ModelInventory, plan: TrainingPlan) -> AdaLoraEstimate:
    """AdaLoRA's rank-allocator state, update temporaries, regulariser tensors and ``ranknum``."""
    if plan.method != "adalora":
        return NONE
    r = plan.init_rank
    tensors = adapter_tensors(inventory)
    state = RANK_ALLOCATOR_COPIES * sum(
        alloc_bytes(math.prod(shape) * FP32, count) for shape, count in tensors
    )
    largest = max((math.prod(shape) for shape, _ in tensors), default=0)
    update = UPDATE_TEMPORARIES * alloc_bytes(largest * FP32)
    orth = early_grads = 0
    # peft computes the regulariser whatever orth_reg_weight is
    saved_small = alloc_bytes(r * r * FP32) + alloc_bytes(FP32)  # the norm's input and result
    for shape, count in tensors:
        if shape == (r, 1):
            continue  # lora_E: not regularised
        orth += (2 * alloc_bytes(math.prod(shape) * BF16) + saved_small) * count
        early_grads += alloc_bytes(math.prod(shape) * FP32, count)
    if orth:  # the last P Pᵀ and I, the running sum and its scaled copy
        orth += 2 * alloc_bytes(r * r * BF16) + 2 * alloc_bytes(FP32)
    ranknum = 0  # a trainable fp32 (1,) per module: counted with the adapters (inventory)
    rule = (
        f"AdaLoRA at init_r={r} (pruned ranks are masked, tensors keep their shape): rank "
        "allocator ipt/exp_avg_ipt/exp_avg_unc = 3 fp32 copies of every lora_A/E/B, live from "
        "the first update_and_allocate (called after optimizer.step, before zero_grad); its "
        "update adds 3 copies of the largest adapter tensor"
    )
    if orth:
        rule += (
            f"; orthogonal regularisation (weight {plan.orth_reg_weight:g}, computed even at 0) "
            "saves two bf16 "
            "copies of each lora_A/B (+ r x r tensors) until backward, whose first nodes fill "
            "every A/B gradient"
        )
    return AdaLoraEstimate(state, update, orth, ranknum, early_grads, rule)
