"""Measure one serving case in this process: build, attach adapters, time ``generate``.

1. The base loads as a training case's does (``vramcalc_harness.build``): the random-init checkpoint,
   ``from_pretrained`` with the plan's dtype, attention kernel and, for int8/nf4/fp4, a
   ``BitsAndBytesConfig``; no ``prepare_model_for_kbit_training`` (nothing trains).
2. LoRA adapters with random, non-zero A and B (``init_lora_weights=False``, seeded), so that
   merging changes the weights: ``get_peft_model`` for the first, ``add_adapter`` for the rest.
   ``merged``: one adapter merged into the base (``merge_and_unload``), standing for each of
   the plan's copies; ``unmerged``: every adapter beside the base, the first active
   (``set_adapter``); ``multi``: every adapter beside the base and the batch mixing them
   (``adapter_names=`` to ``generate``, peft's mixed-batch inference).
3. ``warmup_steps`` untimed rounds, then ``steps`` timed rounds, each a prefill
   (``generate`` with ``max_new_tokens=1``: the time to the first token) and a full
   ``generate`` of ``new_tokens`` (``min_new_tokens`` too, greedy), with the plan's cache
   (``cache_implementation="static"`` or the dynamic default; with a static cache on CUDA
   transformers compiles the decoding forward, which the warm-up rounds absorb). Decode
   speed is ``(new_tokens - 1) * batch / (generate - prefill)`` of the medians.

With ``record_trace`` on CUDA all of it runs inside the caching allocator's trace
(``vramcalc_harness.alloc_trace``), marked as ``vramcalc.serving.servetrace`` marks its simulated
run: ``loaded`` (the base loaded), ``adapters`` (peft's adapters start), ``merge`` (mode merged:
``merge_and_unload`` starts), ``inputs`` (the model ready, the prompts next) and ``round<r>``
before each generate round, warm-up rounds first.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vramcalc.adapters import serving_lora_config
from vramcalc_harness.alloc_trace import case_trace
from vramcalc_harness.build import (
    BNB_INSTALL_HINT,
    bnb_config,
    count_parameters,
    has_bitsandbytes,
    torch_dtype,
)
from vramcalc_harness.errors import HarnessError, MissingDependencyError
from vramcalc_harness.measure import measure_case
from vramcalc_harness.serve_case import ServeCase, serve_kind
from vramcalc_harness.trackers import MemoryTracker, Timer, allocated_bytes


@dataclass
class ServingModel:
    """The model ready to generate and what ``generate`` needs besides the prompt."""

    model: Any
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    total_params: int = 0
    lora_targets_used: tuple[str, ...] | None = None


#: notes a point of the work in the allocator's trace (``AllocationTrace.mark``)
Mark = Callable[[str], None]


def _no_mark(label: str) -> None:
    pass


def load_base(case: ServeCase, checkpoint: str | Path, device: str) -> Any:
    """The base model from the random-init checkpoint, quantized as the plan says."""

    plan = case.plan
    if plan.is_kbit and not has_bitsandbytes():
        raise MissingDependencyError(
            f"--quant {plan.quant} needs bitsandbytes, which is not installed; {BNB_INSTALL_HINT}."
        )
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(plan.dtype), "attn_implementation": plan.attn}
    if plan.is_kbit:
        kwargs["quantization_config"] = bnb_config(plan.quant, plan.dtype, plan.double_quant)
    if device.startswith("cuda"):
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), **kwargs)
    model.eval()
    return model


def build_serving_model(
    case: ServeCase, checkpoint: str | Path, device: str, mark: Mark = _no_mark
) -> ServingModel:
    """Load the base and apply the adapters by the plan's mode."""
    import torch

    plan = case.plan
    model = load_base(case, checkpoint, device)
    mark("loaded")
    if not plan.adapters:
        return ServingModel(model, total_params=count_parameters(model)[1])
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(case.seed)
    adapters = plan.adapters[:1] if plan.mode == "merged" else plan.adapters
    model_type = model.config.model_type
    mark("adapters")
    peft_model = get_peft_model(
        model, serving_lora_config(adapters[0], model_type), adapters[0].name
    )
    for adapter in adapters[1:]:
        peft_model.add_adapter(adapter.name, serving_lora_config(adapter, model_type))
    peft_model.eval()
    targets = tuple(
        sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in peft_model.named_modules()
                if isinstance(m, LoraLayer)
            }
        )
    )
    if plan.mode == "merged":
        mark("merge")
        merged = peft_model.merge_and_unload()
        return ServingModel(
            merged, total_params=count_parameters(merged)[1], lora_targets_used=targets
        )
    peft_model.set_adapter(adapters[0].name)
    kwargs: dict[str, Any] = {}
    if plan.mode == "multi":
        names = [a.name for a in adapters]
        kwargs["adapter_names"] = [names[i % len(names)] for i in range(case.measured_batch)]
    return ServingModel(peft_model, kwargs, count_parameters(peft_model)[1], targets)


def prompt_inputs(case: ServeCase, model: Any, device: str) -> dict[str, Any]:
    """``measured_batch`` random prompts of ``prompt_tokens`` tokens (seeded)."""
    import torch

    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    generator = torch.Generator().manual_seed(case.seed)
    shape = (case.measured_batch, case.plan.prompt_tokens)
    ids = torch.randint(0, int(text_config.vocab_size), shape, generator=generator)
    ids = ids.to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def time_generate(
    serving: ServingModel,
    case: ServeCase,
    device: str,
    on_warmup_end: Callable[[], None] | None = None,
    mark: Mark = _no_mark,
) -> dict[str, Any]:
    """Warm-up rounds, then timed prefill + full ``generate`` rounds; speeds from the medians."""
    plan = case.plan
    mark("inputs")
    inputs = prompt_inputs(case, serving.model, device)
    pad = serving.model.generation_config.pad_token_id
    common = {
        **inputs,
        **serving.generate_kwargs,
        "do_sample": False,
        "pad_token_id": 0 if pad is None else pad,
        "cache_implementation": "static" if plan.cache == "static" else None,
    }

    def generate(new_tokens: int) -> Any:
        return serving.model.generate(
            **common, max_new_tokens=new_tokens, min_new_tokens=new_tokens
        )

    for r in range(case.warmup_steps):
        mark(f"round{r}")
        generate(1)
        generate(plan.new_tokens)
    if on_warmup_end is not None:
        on_warmup_end()
    prefill: list[float] = []
    total: list[float] = []
    for r in range(case.warmup_steps, case.warmup_steps + case.steps):
        mark(f"round{r}")
        with Timer(device) as timer:
            generate(1)
        prefill.append(float(timer.seconds or 0.0))
        with Timer(device) as timer:
            out = generate(plan.new_tokens)
        total.append(float(timer.seconds or 0.0))
        made = int(out.shape[1]) - plan.prompt_tokens
        if made != plan.new_tokens:
            raise HarnessError(f"generate made {made} tokens, not new_tokens {plan.new_tokens}.")
    prefill_s, total_s = statistics.median(prefill), statistics.median(total)
    batch = case.measured_batch
    decode_s = total_s - prefill_s
    decode = (
        (plan.new_tokens - 1) * batch / decode_s if plan.new_tokens > 1 and decode_s > 0 else None
    )
    return {
        "prefill_seconds": prefill_s,
        "generate_seconds": total_s,
        "prefill_seconds_measured": prefill,
        "generate_seconds_measured": total,
        "prefill_tokens_per_second": batch * plan.prompt_tokens / prefill_s if prefill_s else None,
        "decode_tokens_per_second": decode,
    }


def run_serve_case(
    case: ServeCase, device: str, checkpoint: str | Path, trace_path: str | Path | None = None
) -> dict[str, Any]:
    """Measure one serving case in this process (``measure.measure_case``); returns its full
    record (an OOM is a result).

    With ``case.record_trace`` on CUDA, the allocator's trace of the whole case is
    written to ``trace_path`` (``vramcalc_harness.alloc_trace``).
    """

    def serve(tracker: MemoryTracker, measurement: dict[str, Any]) -> None:
        trace = case_trace(case, device, trace_path)
        mark = trace.mark if trace is not None else _no_mark
        if trace is not None:
            measurement["trace_file"] = trace.path.name
        with tracker, trace or contextlib.nullcontext():
            serving = build_serving_model(case, checkpoint, device, mark)
            measurement.update(
                loaded_allocated_bytes=allocated_bytes(device),
                total_params=serving.total_params,
                lora_targets_used=list(serving.lora_targets_used)
                if serving.lora_targets_used
                else None,
                adapter_names_used=serving.generate_kwargs.get("adapter_names"),
            )
            print(f"[harness] serving model built: {serving.total_params} params", flush=True)
            measurement.update(
                time_generate(serving, case, device, on_warmup_end=tracker.mark_steady, mark=mark)
            )

    return measure_case(serve_kind(case), device, checkpoint, serve)
