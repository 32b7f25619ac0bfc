"""peft's view of a plan: the default target modules of an architecture, and the ``LoraConfig`` /
``AdaLoraConfig`` a plan builds (the inventory, the traced step and the harness use the same)."""

from __future__ import annotations

from typing import Any

from vramcalc.training_plan import ALL_LINEAR, TrainingPlan


def default_target_modules(model_type: str, method: str) -> list[str] | str:
    """peft's default ``target_modules`` for ``model_type`` under ``method`` (AdaLoRA has its
    own table), or ``"all-linear"`` where peft has none (peft would raise instead)."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    )

    table = (
        TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING
        if method == "adalora"
        else TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    )
    found = table.get(model_type)
    return list(found) if found is not None else ALL_LINEAR


def adapter_config(plan: TrainingPlan, targets: Any) -> Any:
    """The peft config of an adapter plan on ``targets``: ``LoraConfig``, or
    ``AdaLoraConfig`` for ``--method adalora``."""
    from peft import LoraConfig

    if plan.method == "adalora":
        return adalora_config(plan, targets)
    return LoraConfig(
        r=plan.rank,
        lora_alpha=int(plan.lora_alpha) if plan.lora_alpha.is_integer() else plan.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=plan.dropout,
        target_modules=targets,
        use_dora=plan.dora,
        modules_to_save=list(plan.modules_to_save) if plan.modules_to_save else None,
        task_type="CAUSAL_LM",
    )


def adalora_config(plan: TrainingPlan, targets: Any) -> Any:
    """peft's ``AdaLoraConfig`` for ``plan`` (``--method adalora``) on ``targets``.

    ``r`` is left at LoRA's default (AdaLoRA ignores it and warns otherwise); the adapters
    are built at ``init_r``. ``total_step`` defaults to the smallest the schedule allows
    (``TrainingPlan.adalora_total_step``): shapes do not depend on it.
    """
    from peft import AdaLoraConfig

    return AdaLoraConfig(
        init_r=plan.init_rank,
        target_r=plan.target_rank,
        tinit=plan.tinit,
        tfinal=plan.tfinal,
        deltaT=plan.delta_t,
        total_step=plan.adalora_total_step,
        orth_reg_weight=plan.orth_reg_weight,
        lora_alpha=int(plan.lora_alpha) if plan.lora_alpha.is_integer() else plan.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=plan.dropout,
        target_modules=targets,
        modules_to_save=list(plan.modules_to_save) if plan.modules_to_save else None,
        task_type="CAUSAL_LM",
    )


def serving_lora_config(adapter: Any, model_type: str) -> Any:
    """peft ``LoraConfig`` of one served adapter (a ``serve_plan.AdapterSpec``), with random
    A and B (merging changes weights): what the serving harness loads and the serving trace
    replays."""
    from peft import LoraConfig

    targets: Any = list(adapter.targets) if adapter.targets else None
    if adapter.targets is None:
        targets = default_target_modules(model_type, "lora")
    elif adapter.targets == (ALL_LINEAR,):
        targets = ALL_LINEAR
    kwargs: dict[str, Any] = {} if adapter.alpha is None else {"lora_alpha": adapter.alpha}
    return LoraConfig(
        r=adapter.rank,
        target_modules=targets,
        lora_dropout=0.0,
        init_lora_weights=False,
        use_dora=adapter.dora,
        modules_to_save=list(adapter.modules_to_save) if adapter.modules_to_save else None,
        **kwargs,
    )


def make_ranknum_trainable(model: Any) -> None:
    """AdaLoRA's ``ranknum`` as a real run has it: trainable.

    peft creates it with ``requires_grad=False``, then ``_move_adapter_to_device_of_base_layer``
    re-wraps every adapter parameter as a new ``nn.Parameter`` (``requires_grad`` True) when
    it casts or moves the adapter to the base layer's dtype or device; on the meta device
    nothing moves. Every
    measured AdaLoRA run (data/measurements/h100_adalora_*.jsonl) trained one more parameter
    per adapted module than lora_A/E/B: this one."""
    for name, param in model.named_parameters():
        if ".ranknum." in name:
            param.requires_grad_(True)
