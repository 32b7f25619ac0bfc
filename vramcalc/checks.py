"""Plans that are valid but probably not what was meant: one warning line each.

``plan_warnings`` never stops a command; the CLI prints each on stderr as
``Warning: ...`` and ``plan --json`` lists them under ``warnings``.
"""

from __future__ import annotations

from collections.abc import Set

from vramcalc.catalog import Gpu
from vramcalc.errors import InvalidPlanError
from vramcalc.inventory import ModelInventory
from vramcalc.training_plan import ADALORA_FIELDS, TrainingPlan

LORA_OPTIONS = ("rank", "alpha", "dropout", "targets")


def plan_warnings(
    plan: TrainingPlan,
    inventory: ModelInventory,
    given: Set[str] = frozenset(),
    searched: str | None = None,
) -> tuple[str, ...]:
    """What looks unintended in ``plan`` on this model; ``given`` names the plan options the
    user set explicitly (field names), which tells a default rank from a chosen one;
    ``searched``: the field ``fit`` searches (its value in ``plan`` is only the start)."""
    out = []
    context = inventory.context_length
    if context and plan.seq_len > context and searched != "seq_len":
        out.append(
            f"--seq-len {plan.seq_len} is beyond the model's max_position_embeddings "
            f"({context:,}); the estimate assumes the run works at that length anyway "
            "(e.g. with RoPE scaling)."
        )
    targeted = [g for g in inventory.linears if g.lora]
    if plan.uses_adapters and targeted:
        smallest = min(targeted, key=lambda g: min(g.in_features, g.out_features))
        dim = min(smallest.in_features, smallest.out_features)
        if plan.adapter_rank > dim:
            flag = "--init-rank" if plan.method == "adalora" else "--rank"
            out.append(
                f"{flag} {plan.adapter_rank} is above the smallest targeted dimension ({smallest.name}: "
                f"{dim}); the update of that layer cannot have a higher rank, so the extra rank adds "
                "parameters and memory but no capacity."
            )
    lora_flags = [f"--{name}" for name in LORA_OPTIONS if name in given]
    if plan.method == "full" and lora_flags:
        out.append(
            f"{', '.join(lora_flags)} {'only applies' if len(lora_flags) == 1 else 'only apply'} "
            "to LoRA; --method full trains every weight and ignores "
            + ("it." if len(lora_flags) == 1 else "them.")
        )
    adalora_flags = [f"--{name.replace('_', '-')}" for name in ADALORA_FIELDS if name in given]
    if plan.method != "adalora" and adalora_flags:
        out.append(
            f"{', '.join(adalora_flags)} {'only applies' if len(adalora_flags) == 1 else 'only apply'} "
            f"to --method adalora; --method {plan.method} ignores "
            + ("it." if len(adalora_flags) == 1 else "them.")
        )
    if plan.num_gpus == 1 and ("strategy" in given or plan.strategy != "ddp"):
        out.append(
            f"--strategy {plan.strategy} has no effect on one GPU (--num-gpus 1): "
            "the plan is estimated as single-GPU training."
        )
    return tuple(out)


def recipe_blocker(plan: TrainingPlan, gpu: Gpu) -> str | None:
    """Why ``gpu`` cannot run ``plan``'s recipe at all, whatever its memory (None if it can).

    The recipe trains under bf16 autocast (Trainer ``bf16=True``) unless ``--dtype fp16``;
    Turing and Volta cards have no bf16 and Trainer refuses ``bf16=True`` there.
    """
    if plan.dtype != "fp16" and not gpu.has_bf16:
        return (
            f"no bf16: {gpu.name} has no bf16 tensor cores, so the recipe's Trainer(bf16=True) "
            "cannot run there; plan it with --dtype fp16 (fp16 autocast with loss scaling)"
        )
    return None


def require_runnable(plan: TrainingPlan, gpu: Gpu) -> None:
    """An ``InvalidPlanError`` naming ``--gpu`` when ``gpu`` cannot run ``plan``'s recipe (what
    ``fit`` and ``advise`` need before they search for what fits there)."""
    blocker = recipe_blocker(plan, gpu)
    if blocker:
        raise InvalidPlanError([f"--gpu {gpu.name}: {blocker.removeprefix('no bf16: ')}."])
