"""Gradients: one tensor per trainable parameter, in that parameter's dtype.

``AccumulateGrad`` allocates ``param.grad`` like the parameter (torch
autograd); LoRA adapters are fp32 (peft), so their gradients are fp32; full
fine-tuning keeps gradients in ``--dtype`` (fp32 master weights → fp32
gradients, pure bf16 → bf16). Trainer frees them after every optimizer step
(``model.zero_grad(set_to_none=True)``), so they are live from the backward
pass through the step, and across micro-batches when ``--grad-accum`` > 1.
"""

from __future__ import annotations

import math

from vramcalc.inventory import ModelInventory
from vramcalc.memory import DTYPE_BYTES, alloc_bytes
from vramcalc.training_plan import TrainingPlan


def trainable_dtype(plan: TrainingPlan) -> str:
    """Dtype of trainable parameters (and so of their gradients); adapters are fp32."""
    return plan.dtype if plan.method == "full" else "fp32"


def saved_copy_dtype(plan: TrainingPlan) -> str:
    """peft ``modules_to_save`` deep-copies a module as it is: fp32 after k-bit preparation."""
    return "fp32" if plan.is_kbit else plan.dtype


def trainable_tensors(
    inventory: ModelInventory, plan: TrainingPlan
) -> list[tuple[tuple[int, ...], int, str]]:
    """Every trainable tensor as (shape, how many, dtype)."""
    out = [(shape, count, trainable_dtype(plan)) for shape, count in inventory.trainable_shapes]
    out += [(shape, count, saved_copy_dtype(plan)) for shape, count in inventory.saved_copy_shapes]
    return out


def gradient_bytes(inventory: ModelInventory, plan: TrainingPlan) -> int:
    """Bytes of all gradients once the backward pass has finished."""
    return sum(
        alloc_bytes(math.prod(shape) * DTYPE_BYTES[dtype], count)
        for shape, count, dtype in trainable_tensors(inventory, plan)
    )


def trainable_embedding_shapes(
    inventory: ModelInventory, plan: TrainingPlan
) -> list[tuple[tuple[int, ...], int]]:
    """Trainable ``nn.Embedding`` weights as (shape, how many): the token embedding (a tied
    head is the same tensor) when it trains (full fine-tuning, or a ``modules_to_save``
    copy). An untied head has the same shape but is an ``nn.Linear``: one of the
    (vocab, dim) tensors is the embedding."""
    shapes = [shape for shape, _, _ in trainable_tensors(inventory, plan)]
    token = [s for s in shapes if len(s) == 2 and s[0] == inventory.vocab_size]
    return [(token[0], 1)] if token else []
