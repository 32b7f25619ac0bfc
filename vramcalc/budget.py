"""Whether a plan fits a GPU: the one judgement every command makes (plan, sweep, fit, advise,
serve).

A GPU leaves a plan a *budget*: its memory less the headroom kept free,
``floor(gpu.memory_bytes * (1 - headroom))``. A plan fits when its device total (what
nvidia-smi shows) is within the budget and the GPU can run its recipe at all
(``checks.recipe_blocker``: no bf16 on Turing and Volta). The headroom is ``DEFAULT_HEADROOM``
(5 %) unless given, the same in every command; ``parse_headroom`` reads ``5%`` and ``0.05``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vramcalc.catalog import Gpu
from vramcalc.checks import recipe_blocker
from vramcalc.errors import InvalidPlanError
from vramcalc.training_plan import TrainingPlan

DEFAULT_HEADROOM = 0.05


def parse_headroom(value: str | float) -> float:
    """``"5%"``, ``"0.05"`` or ``0.05`` → 0.05; outside [0, 1) is an ``InvalidPlanError``."""
    text = str(value).strip()
    percent = text.endswith("%")
    try:
        fraction = float(text[:-1]) / 100 if percent else float(text)
    except ValueError:
        fraction = math.nan
    if not 0.0 <= fraction < 1.0:  # also rejects nan
        hint = f" (did you mean {text}%?)" if not percent and 1.0 <= fraction < 100.0 else ""
        raise InvalidPlanError(
            [
                "--headroom must be a fraction in [0, 1) or a percentage such as 5%, "
                f"got {text!r}{hint}."
            ]
        )
    return fraction


def budget_bytes(gpu: Gpu, headroom: float = DEFAULT_HEADROOM) -> int:
    """The most device memory a plan may use on ``gpu`` leaving ``headroom`` free."""
    return math.floor(gpu.memory_bytes * (1.0 - headroom))


@dataclass(frozen=True)
class Verdict:
    """Whether one GPU holds a plan: the budget, what is left of it, and what blocks the GPU."""

    fits: bool
    budget_bytes: int
    margin_bytes: int  # budget - device total; negative: the plan is that much short
    blocker: str | None = None  # why the GPU cannot run the recipe, whatever its memory


def judge(
    device_total_bytes: int,
    gpu: Gpu,
    headroom: float = DEFAULT_HEADROOM,
    plan: TrainingPlan | None = None,
) -> Verdict:
    """Whether a device total fits ``gpu`` with ``headroom`` free; given the training ``plan``,
    also whether the GPU can run its recipe (serving plans have no such condition)."""
    budget = budget_bytes(gpu, headroom)
    blocker = recipe_blocker(plan, gpu) if plan is not None else None
    margin = budget - device_total_bytes
    return Verdict(margin >= 0 and blocker is None, budget, margin, blocker)
