"""The whole estimator against a whole training step, traced live on CPU.

A real two-step loop mirroring HF Trainer's ``training_step`` (bf16 autocast
forward with labels, backward, ``clip_grad_norm_``, optimizer step,
``zero_grad(set_to_none=True)``) runs on a small llama; ``MemoryTracer``
follows every storage with the CUDA allocator's 512-byte rounding. The peak
of the second step (optimizer states exist) is what
``torch.cuda.max_memory_allocated`` reports; the estimate's
``peak_allocated_bytes`` minus the cuBLAS workspaces (a GPU-only allocation)
must match it. The activation rule's backward transient is an upper bound
(tests/memory/test_activations.py), so the estimate may exceed the trace, never
fall below it.
"""

from __future__ import annotations

import pytest
import torch

from tests.memory.memtrace import MemoryTracer
from tests.memory.test_activations import build_cpu_recipe, cuda_recipe_on_cpu
from vramcalc.estimate import estimate_from_inventory
from vramcalc.inventory import build_inventory
from vramcalc.memory.overhead import load_calibration
from vramcalc.training_plan import TrainingPlan

CONFIG = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "use_cache": False,
}


def traced_step_peak(plan: TrainingPlan) -> tuple[int, str]:
    model = build_cpu_recipe(CONFIG, plan)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = plan.optimizer == "adamw_torch_fused"
    optimizer = torch.optim.AdamW(
        trainable, lr=1e-4, weight_decay=0.0, fused=fused, foreach=not fused
    )
    torch.manual_seed(1)
    ids = torch.randint(2, CONFIG["vocab_size"], (plan.batch_size, plan.seq_len))
    with MemoryTracer() as tracer:
        tracer.watch_model(model)
        tracer.watch_optimizer(optimizer)
        for step in range(2):
            if step == 1:
                tracer.reset_peak()
            with tracer.phase("forward"), cuda_recipe_on_cpu():
                loss = model(input_ids=ids, labels=ids).loss
            with tracer.phase("backward"):
                loss.backward()
                del loss
            with tracer.phase("optimizer_step"):
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    report = tracer.report()
    return report.peak_bytes - report.peak_by_category.get("inputs", 0), report.peak_phase


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "lora", "rank": 16, "targets": ("all-linear",)},
        {"method": "lora", "rank": 8, "gradient_checkpointing": True},
        {"method": "full", "dtype": "bf16", "optimizer": "adamw_torch"},
        {"method": "full", "dtype": "fp32", "optimizer": "adamw_torch_fused"},
        {
            "method": "full",
            "dtype": "fp32",
            "gradient_checkpointing": True,
            "optimizer": "adamw_torch",
        },
    ],
    ids=["lora-all-linear", "lora-ckpt", "full-bf16", "full-fp32-fused", "full-fp32-ckpt"],
)
def test_estimated_peak_matches_a_traced_training_step(kwargs):
    plan = TrainingPlan("tiny", seq_len=256, batch_size=2, **kwargs)
    inventory = build_inventory(CONFIG, plan, use_cache=False)
    est = estimate_from_inventory(inventory, plan, load_calibration())
    estimated = est.peak_allocated_bytes - load_calibration().cublas_workspace_bytes
    measured, phase = traced_step_peak(plan)
    error = (estimated - measured) / measured
    print(
        f"{kwargs}: estimated {estimated:,} ({est.peak_phase}) measured {measured:,} ({phase}) {100 * error:+.2f} %"
    )
    assert -0.01 <= error <= 0.10, (est.phase_allocated_bytes, phase)
