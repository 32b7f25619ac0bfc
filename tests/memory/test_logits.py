"""Head and loss memory against the tracer, on the same CPU recipe as test_activations."""

from __future__ import annotations

import pytest
import torch

from tests.memory.memtrace import MemoryTracer
from tests.memory.test_activations import (
    BATCH,
    CONFIGS,
    SEQ,
    VARIANTS,
    build_cpu_recipe,
    cuda_recipe_on_cpu,
    measure_saved,
    plan_for,
)
from vramcalc.inventory import build_inventory
from vramcalc.memory.logits import estimate_logits

VOCAB = 1000  # logits dominate: B*S*V = 64k elements


def _case(model_type: str, variant: str):
    config = dict(CONFIGS[model_type], vocab_size=VOCAB)
    plan = plan_for(model_type, **VARIANTS[variant])
    return config, plan, estimate_logits(build_inventory(config, plan), plan)


CASES = [
    ("llama", "lora-bf16"),
    ("llama", "qlora-nf4"),  # fp32 head after k-bit prep: a bf16 weight copy is kept
    ("llama", "full-fp32"),  # cached bf16 cast of the fp32 master head + bf16 copy of its input
    ("llama", "full-bf16"),  # the head keeps its input (the final norm output)
    ("gemma2", "lora-bf16"),  # final logit softcapping keeps tanh's output
    ("opt", "qlora-nf4"),
]


@pytest.mark.parametrize("model_type, variant", CASES)
def test_saved_by_head_and_loss_match_tracer(model_type, variant):
    config, plan, est = _case(model_type, variant)
    report, _ = measure_saved(config, plan)
    head = report.saved_during("head").new_bytes
    loss = sum(
        t.nbytes for t in report.saved_during("").tensors if t.kind == "new" and t.created_by
    )
    assert head == est.head_saved_bytes, report.table()
    assert loss == est.loss_saved_bytes, report.table()


@pytest.mark.parametrize("model_type, variant", CASES)
def test_head_and_loss_peaks_match_tracer(model_type, variant):
    """Forward + loss + backward of head and loss alone, as Trainer runs them."""
    config, plan, est = _case(model_type, variant)
    model = build_cpu_recipe(config, plan)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    res = inner.get_input_embeddings().weight.dtype
    leaf = torch.randn(BATCH, SEQ, config["hidden_size"], dtype=res, requires_grad=True)
    hidden = leaf * 1.0  # not a leaf: autocast caches casts of leaves, not of activations
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    with cuda_recipe_on_cpu(), MemoryTracer() as tracer:
        tracer.track(list(model.parameters()), "parameters")
        tracer.track([hidden, labels], "inputs")
        with tracer.phase("forward"):
            logits = inner.lm_head(hidden)
            cap = getattr(inner.config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            loss = inner.loss_function(logits, labels, vocab_size=VOCAB)
            del logits  # Trainer.compute_loss returns the loss only
        with tracer.phase("backward"):
            loss.backward()
    report = tracer.report()
    inputs = (BATCH * SEQ * config["hidden_size"] * hidden.element_size() + 511) // 512 * 512
    # the head's saved input is the final norm's output in the model, a tracked input here
    kept_input = inputs if plan.method == "full" and res == torch.bfloat16 else 0
    labels_bytes = 512
    params = sum((p.numel() * p.element_size() + 511) // 512 * 512 for p in model.parameters())
    forward = report.peak_by_phase["forward"] - params - inputs - labels_bytes
    backward = report.peak_by_phase["backward"] - params - inputs - labels_bytes
    assert forward == est.forward_peak_bytes - kept_input
    assert backward == est.backward_peak_bytes - kept_input
