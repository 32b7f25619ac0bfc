"""Progress notes of a trace, decoder layer by decoder layer.

A ZeRO trace runs every decoder layer of the model (``worldtrace``: ZeRO's flat buffers and
reduce buckets are the whole model's), which takes minutes for a large one; the progress line
(``vramcalc/progress.py``) then says which step, pass and layer the trace is in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from vramcalc import progress
from vramcalc.memory.provenance import marker_pass
from vramcalc.trace.steptrace import decoder_layers
from vramcalc.trace.worldrecorder import WorldRecorder
from vramcalc.training_plan import TrainingPlan


@contextlib.contextmanager
def announce_layers(
    model: Any, recorder: WorldRecorder, plan: TrainingPlan, model_layers: int, steps: int
) -> Iterator[None]:
    """A progress note as each decoder layer's forward starts (its recomputation in backward
    too): the step, the pass and the layer, e.g. "tracing rank 0 of a 2-GPU zero3 run of
    Llama-2-13b LoRA on fake tensors: step 1 of 2, backward, layer 12 of 40". A ZeRO trace
    runs every layer and can take minutes. The hooks only note: the trace is the same."""
    layers = decoder_layers(model)
    what = progress.describe(plan.model, plan.method, plan.quant)
    head = f"tracing rank 0 of a {plan.num_gpus}-GPU {plan.strategy} run of {what} on fake tensors"
    unrolled = f", unrolled to {model_layers}" if model_layers > len(layers) else ""

    def hook(index: int) -> Any:
        def pre_forward(module: Any, args: Any) -> None:
            label = recorder.markers[-1][0] if recorder.markers else ""
            kind, step, micro = marker_pass(label) or ("loading", -1, 0)
            where = kind if step < 0 else f"step {step + 1} of {steps}, {kind}"
            where += f" (micro-batch {micro + 1})" if micro else ""
            progress.note(f"{head}: {where}, layer {index + 1} of {len(layers)}{unrolled}")

        return pre_forward

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
