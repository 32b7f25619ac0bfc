"""The recipe's model built for the step trace: on the meta device, then fake tensors.

``build_model`` makes what the harness loads, in the dtypes the recipe leaves it:
the load dtype, k-bit linears emulated (``memory/emulation.py``) with the rest
upcast to fp32 (``prepare_model_for_kbit_training``), peft LoRA (DoRA,
``modules_to_save``) or AdaLoRA, gradient checkpointing with ``use_reentrant=False``.
``to_fake`` turns its meta parameters into ``FakeTensorMode`` tensors (ties kept),
so a full-size step runs without memory.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import warnings
from collections.abc import Iterator
from typing import Any

from vramcalc.memory.layers import NO_SDPA
from vramcalc.training_plan import ALL_LINEAR, TrainingPlan

_frozen = 0  # traces running inside ``frozen_heap``


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """A trace's garbage collections look only at what the trace makes: what the process held
    before (the imported libraries, earlier traces' results) is moved to the collector's
    permanent generation for the trace (``gc.freeze``) and back after it. Every object the
    trace makes is collected as before, at the same points, so the trace is the same event
    for event; a full collection (DeepSpeed's ``defragment`` calls ``gc.collect()`` once per
    ZeRO-3 trace, and the automatic ones) no longer walks the whole process: in a process
    that has traced before, it cost more than the rest of the collection work together."""
    global _frozen
    if _frozen == 0:
        gc.freeze()
    _frozen += 1
    try:
        yield
    finally:
        _frozen -= 1
        if _frozen == 0:
            gc.unfreeze()


def _torch_dtype(name: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def layered_config(config_dict: dict[str, Any], num_layers: int | None) -> Any:
    """The transformers config of ``config_dict`` with ``num_layers`` decoder layers (default:
    its own), per-layer ``layer_types`` cut to match."""
    from vramcalc.catalog import config_from_dict

    config = config_from_dict(config_dict)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:num_layers]
    return config


def build_model(
    config_dict: dict[str, Any],
    plan: TrainingPlan,
    num_layers: int | None,
    outlier_columns: int | None = None,
) -> Any:
    """The recipe's model on the meta device: load dtype, k-bit layers emulated and the
    rest upcast to fp32 (``prepare_model_for_kbit_training``), peft LoRA, checkpointing.
    ``outlier_columns`` overrides INT8's outlier columns of the MLP output projections."""
    import torch
    from transformers import AutoModelForCausalLM

    from vramcalc.memory.distributed import skips_kbit_upcast
    from vramcalc.trace import emulation

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    config = layered_config(config_dict, num_layers)
    config.use_cache = False  # Trainer sets config.use_cache = args.use_cache (False)
    attn = "eager" if plan.attn == "eager" or config.model_type in NO_SDPA else "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=_torch_dtype(plan.dtype), attn_implementation=attn
            )
        model.tie_weights()
    if plan.is_kbit:
        from transformers.quantizers.base import get_keys_to_not_convert

        from vramcalc.trace.int8 import outlier_rule

        kind = emulation.Emulated8bit if plan.quant == "int8" else emulation.Emulated4bit
        skip = set(get_keys_to_not_convert(model))
        for name, module in list(model.named_modules()):
            if type(module) is not torch.nn.Linear or any(
                name == k or name.endswith("." + k) for k in skip
            ):
                continue
            with torch.device("meta"):
                new = kind(module.in_features, module.out_features, bias=module.bias is not None)
            new.weight = torch.nn.Parameter(module.weight.to(torch.bfloat16), requires_grad=False)
            new.weight._vramcalc_kbit = True  # type: ignore[attr-defined]
            if plan.quant == "int8":
                rule = outlier_rule(config, name, module.in_features)
                columns = rule.columns(plan.batch_size * plan.seq_len) if rule else 0
                if rule is not None:
                    model._vramcalc_outlier_rule = rule  # the trace keeps it (trace/recipe)
                if columns and outlier_columns is not None:
                    columns = outlier_columns
                new.outlier_columns = columns
            if module.bias is not None:
                new.bias = module.bias
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
        model.is_loaded_in_4bit = plan.quant != "int8"
        model.is_loaded_in_8bit = plan.quant == "int8"
        for p in model.parameters():
            p.requires_grad_(False)
            if not getattr(p, "_vramcalc_kbit", False) and not skips_kbit_upcast(plan):
                p.data = p.data.float()
    if plan.uses_adapters:
        model = _with_lora(model, plan)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
        if plan.uses_adapters:  # peft / prepare_model_for_kbit_training
            model.enable_input_require_grads()
    model.train()
    for module in model.modules():
        # LayerDrop (OPT) draws torch.rand([]) < layerdrop per layer, a value fake tensors
        # do not have; with layerdrop 0 (every released config) no layer is ever dropped
        if getattr(module, "layerdrop", None) == 0:
            module.training = False
    return model


def _outlier_columns(config: Any, name: str, in_features: int, plan: TrainingPlan) -> int:
    """Outlier columns of an int8 linear's input at the plan's tokens (``memory/int8.py``;
    pretrained checkpoints have a few fixed outlier features instead: less memory)."""
    from vramcalc.trace.int8 import outlier_rule

    rule = outlier_rule(config, name, in_features)
    return rule.columns(plan.batch_size * plan.seq_len) if rule else 0


def _with_lora(model: Any, plan: TrainingPlan) -> Any:
    """peft LoRA (or AdaLoRA, ``--method adalora``) on the meta model, as the inventory
    configures it; LoRA on emulated k-bit layers runs peft's bnb forward."""
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import LoraLayer

    from vramcalc.adapters import adapter_config, default_target_modules, make_ranknum_trainable
    from vramcalc.trace import emulation

    for p in model.parameters():
        p.requires_grad_(False)
    targets: Any = list(plan.targets) if plan.targets else None
    if plan.targets is None:
        targets = default_target_modules(model.config.model_type, plan.method)
    elif plan.targets == (ALL_LINEAR,):
        targets = ALL_LINEAR
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with init_empty_weights():
            model = get_peft_model(model, adapter_config(plan, targets))
    if plan.method == "adalora":
        make_ranknum_trainable(model)
    for module in model.modules():
        if (
            isinstance(module, LoraLayer)
            and not isinstance(module, AdaLoraLayer)  # SVDLinear keeps its own forward
            and isinstance(module.base_layer, (emulation.Emulated4bit, emulation.Emulated8bit))
        ):
            module.forward = emulation.bnb_lora_forward.__get__(module)  # type: ignore[attr-defined]
    return model


def to_fake(model: Any, mode: Any, device: Any = None) -> list[tuple[str, Any]]:
    """Replace every meta parameter / buffer by a fake CPU tensor (ties kept; a k-bit
    weight keeps its attributes: a 4-bit one's ``quant_type``, ``quant_state``, ...), on
    ``device`` if given (``cpu:0``: the fake GPU of a trace that tells it from the host,
    ``worldtrace``); returns the parameters by name."""
    import torch

    made: dict[int, Any] = {}
    with mode:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in made:
                    fake = torch.nn.Parameter(
                        torch.empty(p.shape, dtype=p.dtype, device=device),
                        requires_grad=p.requires_grad,
                    )
                    if getattr(p, "_vramcalc_kbit", False):  # with what bitsandbytes keeps on it
                        fake.__dict__.update(p.__dict__)
                    made[id(p)] = fake
                module._parameters[name] = made[id(p)]
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    return list(model.named_parameters())
