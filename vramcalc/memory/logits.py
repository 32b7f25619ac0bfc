"""Memory of the output head and the loss: ``estimate_logits``.

Under the recipe the head runs under CUDA autocast, so ``lm_head`` returns
bf16 logits whatever the head weight's dtype (fp32 after
``prepare_model_for_kbit_training``: autocast then makes a fresh bf16 copy of
the V x H weight each step, which ``mm`` keeps for the input gradient; a
trainable fp32 master head's cast is cached and kept the same way).
transformers 5's ``ForCausalLMLoss`` upcasts the *whole* logits
(``logits.float()``, B x S x V fp32; labels are padded and shifted, logits
are not sliced) and calls ``cross_entropy`` = ``log_softmax`` (keeps its fp32
output) + ``nll_loss`` (keeps the shifted labels and a 0-dim total weight).
Gemma-2's final softcapping (``/cap``, ``tanh``, ``*cap``) keeps the tanh
output (bf16).

Lifetimes (HF ``Trainer.training_step``): ``compute_loss`` returns only the
loss, so the bf16 logits, held by the model output, are freed before
``accelerator.backward``; only what autograd saved survives. Forward peak:
bf16 logits + fp32 copy + fp32 log-probabilities alive together. Backward
peak: the saved fp32 log-probabilities + the gradient ``nll_loss`` hands back
(fp32) + ``log_softmax``'s input gradient (fp32), then the fp32 gradient and
its bf16 cast. ``tests/memory/test_logits.py`` checks these against the tracer.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramcalc.inventory import ModelInventory
from vramcalc.memory.activations import ITEMSIZE, ROUND_TO, Graph, recipe_for
from vramcalc.training_plan import TrainingPlan


@dataclass(frozen=True)
class LogitsEstimate:
    """Bytes attributable to the output head and the loss; see the module docstring."""

    logits_bytes: int  # lm_head output (bf16 under autocast), alive from head to end of loss
    head_saved_bytes: int  # what the head keeps for backward (its input cast, a bf16 weight copy)
    loss_saved_bytes: int  # what the loss keeps: fp32 log-probabilities, labels, softcap tanh
    loss_forward_transient_bytes: int  # fp32 upcast + log-probabilities while the loss runs
    loss_backward_transient_bytes: int  # gradients of the logits inside backward, beyond the saved
    forward_peak_bytes: (
        int  # most alive at once in forward (logits + upcast + log-probs + saved head)
    )
    backward_peak_bytes: int  # most alive at once in the loss/head backward
    peak_bytes: int
    rule: str


def estimate_logits(
    inventory: ModelInventory,
    plan: TrainingPlan,
    *,
    round_to: int = ROUND_TO,
) -> LogitsEstimate:
    """Head + loss bytes of ``inventory`` under ``plan`` (see the module docstring)."""
    r = recipe_for(inventory, plan)
    g = Graph(r.low, round_to)
    n, v, h = r.tokens, inventory.vocab_size, inventory.hidden_size

    def rounded(numel: int, dtype: str) -> int:
        return g.bytes([g.new(numel, dtype, False)])

    # head: input = final norm output (residual dtype), weight trainable only in full FT
    head_dtype = r.res if r.kbit else plan.dtype
    x = g.new(n * h, r.res, True)
    w = g.param(v * h, head_dtype, r.full)
    g.linear(x, w, n * v)
    head_saved = g.bytes()

    logits = rounded(n * v, r.low)
    fp32_logits = rounded(n * v, "fp32")
    labels = rounded(n, "i64")  # labels[..., 1:].contiguous(), kept by nll_loss
    padded = rounded(r.batch * (r.seq + 1), "i64")  # pad(labels, (0, 1), -100)
    total_weight = rounded(1, "fp32")  # nll_loss's 0-dim outputs: the loss and total_weight
    softcap = inventory.model_type == "gemma2" and bool(inventory.final_logit_softcapping)
    tanh_saved = logits if softcap else 0
    loss_saved = fp32_logits + labels + total_weight + tanh_saved
    # forward: bf16 logits (+ the kept tanh output) + fp32 copy + log-probs, pad/shift labels
    softcap_extra = tanh_saved
    loss_forward = 2 * fp32_logits + padded + labels + 2 * total_weight
    forward_peak = head_saved + logits + softcap_extra + loss_forward
    # backward: saved log-probs + grad from nll_loss + grad of log_softmax's input (all fp32)
    loss_backward = 2 * fp32_logits
    backward_peak = head_saved + loss_saved + loss_backward
    return LogitsEstimate(
        logits_bytes=logits,
        head_saved_bytes=head_saved,
        loss_saved_bytes=loss_saved,
        loss_forward_transient_bytes=loss_forward,
        loss_backward_transient_bytes=loss_backward,
        forward_peak_bytes=forward_peak,
        backward_peak_bytes=backward_peak,
        peak_bytes=max(forward_peak, backward_peak),
        rule=(
            f"logits B*S*V {r.low} ({ITEMSIZE[r.low]} B); ForCausalLMLoss upcasts all B*S*V to fp32 and "
            "log_softmax keeps an fp32 copy: forward peak logits + 2 fp32 copies, backward peak 3 fp32 "
            f"copies; head weight {head_dtype}"
            + (", its bf16 autocast copy kept for backward" if head_dtype == "fp32" else "")
            + ("; final softcapping keeps tanh output" if softcap else "")
            + "."
        ),
    )
