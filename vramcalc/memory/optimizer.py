"""Optimizer states, and the transient buffers of the optimizer step.

Rules, per trainable tensor of ``n`` elements in dtype ``d`` (sources:
torch/optim/adam.py, bitsandbytes/optim/optimizer.py, transformers
optimization.py ``Adafactor``, Trainer's optimizer mapping):

* ``adamw_torch``: ``exp_avg`` + ``exp_avg_sq`` like the parameter (2·n·d);
  the foreach implementation (default on CUDA) allocates
  ``exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)``, one more n·d for
  every tensor at once during the step. ``step`` is a CPU scalar.
* ``adamw_torch_fused`` (Trainer's default with torch >= 2.8): 2·n·d states;
  the fused kernel needs no full-size temporary; ``step`` is a device scalar.
* bitsandbytes 8-bit Adam (``adamw_8bit``, ``paged_adamw_8bit``): tensors with
  ``n >= min_8bit_size`` (4096) keep two uint8 states plus two fp32 absmax per
  block of 256; smaller tensors keep two fp32 states.
* bitsandbytes 32-bit Adam (``paged_adamw_32bit``): two fp32 states.
* paged variants put states of tensors with ``n >= 1e5`` in CUDA managed
  memory (``F.get_paged``): outside the caching allocator (not in
  ``max_memory_allocated``/``reserved``) but resident on the device while
  there is room, so counted in ``device_total_bytes``.
* ``sgd``: no state; ``sgd_momentum``: one ``momentum_buffer`` (n·d).
* ``adafactor`` (Trainer: ``scale_parameter=False, relative_step=False``,
  ``beta1=None``): a ≥2-D tensor of shape (..., r, c) keeps a row vector
  (..., r) and a column vector (..., c); a 1-D tensor keeps ``exp_avg_sq``
  (n); all in the gradient's dtype. The step upcasts bf16 gradients to fp32
  and works on an n-sized ``update`` tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vramcalc.inventory import ModelInventory
from vramcalc.memory import DTYPE_BYTES, alloc_bytes
from vramcalc.memory.gradients import trainable_embedding_shapes, trainable_tensors
from vramcalc.training_plan import TrainingPlan

MIN_8BIT_SIZE = 4096
BNB_BLOCKSIZE = 256
PAGED_MIN_NUMEL = 100_000


@dataclass(frozen=True)
class OptimizerEstimate:
    """Optimizer memory: states in the allocator, states in managed memory, step temporaries."""

    state_bytes: int  # in the caching allocator
    paged_state_bytes: int  # in CUDA managed memory (paged optimizers)
    step_transient_bytes: int  # extra live only during optimizer.step()
    rule: str

    @property
    def total_state_bytes(self) -> int:
        return self.state_bytes + self.paged_state_bytes


BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def bnb_state_tensors(name: str, n: int, is_embedding: bool) -> list[tuple[int, bool]]:
    """(bytes, in the caching allocator) of each state tensor bitsandbytes' AdamW creates for
    a trainable tensor of ``n`` elements, in the order ``Optimizer2State.init_state`` does.

    8-bit: Trainer registers every ``nn.Embedding`` weight (tied heads included) with
    ``GlobalOptimManager.register_module_override(module, "weight", {"optim_bits": 32})``
    (transformers ``Trainer.create_optimizer``), and tensors below ``min_8bit_size`` (4096)
    stay 32-bit: two fp32 states. Otherwise two uint8 states, then two fp32 absmax per
    block of 256 (always device tensors). Paged variants put state1/state2 of tensors
    with >= 1e5 elements in CUDA managed memory (``get_state_buffer``).
    """
    paged = name.startswith("paged") and n >= PAGED_MIN_NUMEL
    if name == "paged_adamw_32bit" or is_embedding or n < MIN_8BIT_SIZE:
        return [(alloc_bytes(4 * n), not paged), (alloc_bytes(4 * n), not paged)]
    absmax = alloc_bytes(4 * -(n // -BNB_BLOCKSIZE))
    return [
        (alloc_bytes(n), not paged),
        (alloc_bytes(n), not paged),
        (absmax, True),
        (absmax, True),
    ]


def estimate_optimizer(inventory: ModelInventory, plan: TrainingPlan) -> OptimizerEstimate:
    """States and step temporaries of ``plan.optimizer`` over the trainable tensors."""
    state = paged = transient = 0
    name = plan.optimizer
    embedding_shapes = dict(trainable_embedding_shapes(inventory, plan))
    for shape, count, dtype in trainable_tensors(inventory, plan):
        itemsize = DTYPE_BYTES[dtype]
        n = math.prod(shape)
        if name in ("adamw_torch", "adamw_torch_fused"):
            state += 2 * alloc_bytes(n * itemsize, count)
            if name == "adamw_torch":
                transient += alloc_bytes(n * itemsize, count)
            else:
                state += alloc_bytes(4, count)  # device step scalar
        elif name in BNB_OPTIMIZERS:
            embeddings = min(embedding_shapes.get(shape, 0), count)
            for tensors, is_embedding in ((embeddings, True), (count - embeddings, False)):
                for nbytes, on_device in bnb_state_tensors(name, n, is_embedding):
                    if on_device:
                        state += nbytes * tensors
                    else:
                        paged += nbytes * tensors
            embedding_shapes.pop(shape, None)
        elif name == "sgd":
            pass
        elif name == "sgd_momentum":
            state += alloc_bytes(n * itemsize, count)
        elif name == "adafactor":
            if len(shape) >= 2:
                rows = math.prod(shape[:-1])
                cols = math.prod(shape[:-2]) * shape[-1]
                state += (alloc_bytes(rows * itemsize) + alloc_bytes(cols * itemsize)) * count
            else:
                state += alloc_bytes(n * itemsize, count)
            state += alloc_bytes(4, count)  # RMS scalar
            # per-tensor temporaries: fp32 grad copy, fp32 update (one tensor at a time)
            transient = max(transient, 2 * alloc_bytes(n * 4))
        else:  # pragma: no cover - TrainingPlan validates the name
            raise ValueError(name)
    return OptimizerEstimate(state, paged, transient, _RULES[name])


_RULES = {
    "adamw_torch": "AdamW (torch, foreach): 2 states like each trainable parameter, +1 during the step",
    "adamw_torch_fused": "AdamW (torch, fused): 2 states like each trainable parameter",
    "adamw_8bit": "bitsandbytes 8-bit AdamW: 2 uint8 states + fp32 absmax per 256 (fp32 below 4096 elements and for nn.Embedding weights, which Trainer overrides to 32-bit)",
    "paged_adamw_8bit": "bitsandbytes paged 8-bit AdamW: as adamw_8bit, uint8/fp32 states of tensors >= 1e5 elements in managed memory (absmax stays in the allocator)",
    "paged_adamw_32bit": "bitsandbytes paged 32-bit AdamW: 2 fp32 states, tensors >= 1e5 elements in managed memory",
    "sgd": "SGD without momentum: no state",
    "sgd_momentum": "SGD with momentum: 1 state like each trainable parameter",
    "adafactor": "Adafactor (factored second moment, no first moment): row + column vectors per matrix",
}
