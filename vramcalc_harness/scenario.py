"""Cases: a ``TrainingPlan`` plus how to measure it, loaded from YAML or CSV.

A *case* is a plan in the estimator's own terms plus ``steps`` (measured
optimizer steps), ``warmup_steps`` (run first, not timed), ``seed``, ``split``
(``calibration`` cases may tune the estimator, ``validation`` cases only check
it), ``recipe`` (``trainer``: HF Trainer, ``loop``: plain PyTorch) and an
optional ``timeout_s``. ``simulate`` is a test hook (``oom``, ``error``,
``hang``) that makes the worker fail on purpose (in a multi-GPU case, the
last rank only); real case lists leave it out.

A plan with ``num_gpus > 1`` runs one process per GPU under its ``strategy``
(``ddp``, ``fsdp``, ``fsdp-grad-op``, ``zero1/2/3``) and ``cpu_offload``
(``vramcalc_harness.distributed``). ``simulate_world: N`` measures such a plan on one
device as rank 0 of an N-GPU world (``vramcalc_harness.simworld``): the plan's
``num_gpus`` is N (set from it when the case leaves ``num_gpus`` out), the
strategy one of ``ddp``, ``fsdp``, ``fsdp-grad-op``.

A case with ``kind: serve`` measures serving (``generate`` with LoRA adapters) instead of
training: a ``ServeCase`` of ``vramcalc_harness.serve_case``, with its own fields; one file may mix both.

YAML files are either a list of cases or a mapping::

    defaults: {steps: 3, warmup_steps: 2}      # applied to every case below
    cases:                                     # explicit cases
      - {model: meta-llama/Llama-3.2-1B, method: lora, split: calibration}
    grids:                                     # each: cross product of list values
      - split: validation
        model: Qwen/Qwen2.5-0.5B
        rank: [8, 32]
        targets: ["q_proj,v_proj", all-linear]

In a grid every list is a set of options (so ``targets`` options are strings
such as ``"q_proj,v_proj"`` or lists of names); scalars are fixed. CSV files
have one case per row, a header of field names, and empty cells for defaults.
Every problem of a file is reported at once, each naming its case and field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from vramcalc.errors import InvalidPlanError
from vramcalc.training_plan import (
    ADALORA_FIELDS,
    PLAN_DEFAULTS,
    PLAN_FIELDS,
    TrainingPlan,
    parse_targets,
    suggest,
)
from vramcalc_harness.errors import CaseError

SPLITS = ("calibration", "validation")
RECIPES = ("trainer", "loop")
SIMULATIONS = ("oom", "error", "hang")

#: plan fields added after the first measurements (--allocator, then AdaLoRA's options): a
#: case key leaves them out at their default, so the ids of earlier cases stay the same
KEY_FIELDS_ADDED_LATER: dict[str, Any] = {
    name: PLAN_DEFAULTS[name] for name in ("allocator", *ADALORA_FIELDS)
}
# the plan's --allocator as PYTORCH_CUDA_ALLOC_CONF (None: the variable is unset)
ALLOC_CONF = {"default": None, "expandable": "expandable_segments:True"}


def alloc_conf_for(allocator: str) -> str | None:
    return ALLOC_CONF[allocator]


CASE_FIELDS = (
    "steps",
    "warmup_steps",
    "seed",
    "split",
    "recipe",
    "timeout_s",
    "simulate",
    "min_seconds",
    "record_trace",
    "simulate_world",
)
# measured steps never exceed this many, whatever ``min_seconds`` asks
MAX_MEASURED_STEPS = 200
ALL_FIELDS = PLAN_FIELDS + CASE_FIELDS
BOOL_FIELDS = ("double_quant", "gradient_checkpointing", "cpu_offload", "record_trace")


@dataclass(frozen=True)
class Case:
    """One measurement: a plan and how many steps to run, validated on construction."""

    plan: TrainingPlan
    steps: int = 3
    warmup_steps: int = 2
    seed: int = 0
    split: str = "calibration"
    recipe: str = "trainer"
    timeout_s: float | None = None
    simulate: str | None = field(default=None)
    # measure at least ``steps`` steps *and* at least ``min_seconds`` of measured steps
    # (up to MAX_MEASURED_STEPS): short steps need many for a stable median
    min_seconds: float = 0.0
    # record the caching allocator's alloc/free trace (torch.cuda.memory._record_memory_history)
    record_trace: bool = False
    # run as rank 0 of a world of this many GPUs on one device (vramcalc_harness.simworld), or None
    simulate_world: int | None = None

    def __post_init__(self) -> None:
        problems = case_problems({name: getattr(self, name) for name in CASE_FIELDS}, self.plan)
        if problems:
            raise CaseError(problems)

    @property
    def case_id(self) -> str:
        """First 16 hex digits of the SHA-256 of ``canonical_key()``."""
        return hashlib.sha256(self.canonical_key().encode()).hexdigest()[:16]

    def canonical_key(self) -> str:
        """Canonical JSON of what determines the measurement (plan, steps, seed, recipe).

        ``split`` and ``timeout_s`` are labels / limits, not part of the key.
        """
        plan = self.plan.to_dict()
        # fields added to the plan after measurements existed stay out of the key at their
        # default, so the ids of earlier cases do not change
        for name, default in KEY_FIELDS_ADDED_LATER.items():
            if plan.get(name) == default:
                plan.pop(name)
        key: dict[str, Any] = {
            "plan": plan,
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "seed": self.seed,
            "recipe": self.recipe,
        }
        if self.simulate is not None:
            key["simulate"] = self.simulate
        if self.min_seconds:
            key["min_seconds"] = self.min_seconds
        if self.record_trace:
            key["record_trace"] = True
        if self.simulate_world is not None:
            key["simulate_world"] = self.simulate_world
        return json.dumps(key, sort_keys=True, separators=(",", ":"))

    @property
    def total_steps(self) -> int:
        """Optimizer steps the recipe runs at most (warm-up included)."""
        return self.warmup_steps + self.max_measured_steps

    @property
    def max_measured_steps(self) -> int:
        return max(self.steps, MAX_MEASURED_STEPS) if self.min_seconds else self.steps

    def measured_enough(self, step_seconds: list[float]) -> bool:
        """Whether the measured steps so far (warm-up excluded) satisfy ``steps`` and ``min_seconds``."""
        return len(step_seconds) >= self.steps and sum(step_seconds) >= self.min_seconds

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready mapping: the plan's fields then the case fields."""
        data = self.plan.to_dict()
        data.update(
            steps=self.steps,
            warmup_steps=self.warmup_steps,
            seed=self.seed,
            split=self.split,
            recipe=self.recipe,
            timeout_s=self.timeout_s,
            simulate=self.simulate,
            min_seconds=self.min_seconds,
            record_trace=self.record_trace,
        )
        if self.simulate_world is not None:
            data["simulate_world"] = self.simulate_world
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Case:
        """Build a case from a flat mapping (``to_dict`` output, YAML case, CSV row)."""
        return case_from_mapping(data, where="case")


def case_problems(values: Mapping[str, Any], plan: TrainingPlan | None) -> list[str]:
    """Every problem of the case-level fields ``values`` (the plan validates itself)."""
    problems = []
    for name, minimum in (("steps", 1), ("warmup_steps", 0), ("seed", 0)):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = "a positive integer" if minimum else "an integer >= 0"
            problems.append(f"{name} must be {kind}, got {value!r}.")
    for name, choices in (("split", SPLITS), ("recipe", RECIPES)):
        value = values[name]
        if value not in choices:
            problems.append(
                f"{name} {value!r} is not one of {', '.join(choices)}."
                + suggest(str(value), choices)
            )
    simulate = values["simulate"]
    if simulate is not None and simulate not in SIMULATIONS:
        problems.append(f"simulate {simulate!r} is not one of {', '.join(SIMULATIONS)}.")
    timeout_s = values["timeout_s"]
    min_seconds = values.get("min_seconds", 0.0)
    if (
        isinstance(min_seconds, bool)
        or not isinstance(min_seconds, (int, float))
        or min_seconds < 0
    ):
        problems.append(f"min_seconds must be a number of seconds >= 0, got {min_seconds!r}.")
    if timeout_s is not None and (
        isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0
    ):
        problems.append(f"timeout_s must be a positive number of seconds, got {timeout_s!r}.")
    if plan is not None and plan.num_gpus > 1:
        problems.extend(multi_gpu_problems(plan, values["recipe"]))
    if plan is not None and plan.method == "adalora":
        problems.extend(adalora_problems(plan, values))
    simulate_world = values.get("simulate_world")
    if simulate_world is not None:
        problems.extend(simulated_world_problems(simulate_world, plan))
    return problems


def adalora_problems(plan: TrainingPlan, values: Mapping[str, Any]) -> list[str]:
    """An AdaLoRA case must keep the rank allocator's state through every step it runs, as the
    bulk of a real run does: peft frees it (``reset_ipt``) at step ``total_step - tfinal``."""
    steps, warmup = values["steps"], values["warmup_steps"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (steps, warmup)):
        return []  # reported above
    most = warmup + (max(steps, MAX_MEASURED_STEPS) if values.get("min_seconds") else steps)
    if plan.total_step is None or plan.total_step - plan.tfinal <= most:
        return [
            f"total_step must be given for method adalora and leave total_step - tfinal above "
            f"the {most} steps the case runs (the rank allocator's state is freed there), got "
            f"total_step {plan.total_step!r}, tfinal {plan.tfinal}."
        ]
    return []


def simulated_world_problems(world: Any, plan: TrainingPlan | None) -> list[str]:
    """What is wrong with ``simulate_world`` for this plan."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 2:
        return [f"simulate_world must be an integer >= 2 (GPUs in the world), got {world!r}."]
    if plan is None:
        return []
    problems = []
    if plan.num_gpus != world:
        problems.append(
            f"simulate_world {world} needs num_gpus {world} (the plan it measures), "
            f"got num_gpus {plan.num_gpus}."
        )
    return problems


def simulated(case: Case, world: int) -> Case:
    """The case as rank 0 of a ``world``-GPU world (``--simulate-world``): num_gpus = world."""
    import dataclasses

    return dataclasses.replace(case, plan=case.plan.with_(num_gpus=world), simulate_world=world)


def multi_gpu_problems(plan: TrainingPlan, recipe: str) -> list[str]:
    """What the harness cannot run of a multi-GPU plan (the plan checked the rest)."""
    problems = []
    # int8 under ZeRO-3 is let through: whether DeepSpeed partitions bitsandbytes' Int8Params
    # is what h100_zeroint8.yaml measures
    if plan.quant == "int8" and plan.strategy in ("fsdp", "fsdp-grad-op"):
        problems.append(
            f"quant int8 cannot be sharded by strategy {plan.strategy} (bitsandbytes keeps "
            "int8 weights in its own tensor type); use strategy ddp, zero1 or zero2, or quant nf4."
        )
    if recipe == "loop" and plan.strategy in ("zero1", "zero2", "zero3"):
        problems.append(
            f"recipe loop runs strategies ddp, fsdp and fsdp-grad-op; use recipe trainer "
            f"for {plan.strategy}."
        )
    return problems


def case_from_mapping(data: Mapping[str, Any], where: str) -> Case:
    """Validate a flat mapping into a ``Case``; ``CaseError`` problems start with ``where``.

    A mapping with ``kind: serve`` is a serving case (``vramcalc_harness.serve_case``), not a ``Case``:
    ``any_case_from_mapping`` reads both.
    """
    problems = []
    if data.get("kind") not in (None, "train"):
        raise CaseError([f"{where}: kind {data.get('kind')!r} is not one of train, serve."])
    data = {k: v for k, v in data.items() if k != "kind"}
    unknown = [k for k in data if str(k).replace("-", "_") not in ALL_FIELDS]
    for key in unknown:
        problems.append(f"{where}: unknown field {key!r}.{suggest(str(key), ALL_FIELDS)}")
    values = {str(k).replace("-", "_"): v for k, v in data.items() if k not in unknown}
    for name in BOOL_FIELDS:
        if name in values and not isinstance(values[name], bool):
            problems.append(f"{where}: {name} must be true or false, got {values[name]!r}.")
            values.pop(name)
    if "split" not in values or values["split"] is None:
        problems.append(
            f"{where}: split is missing; give calibration or validation "
            "(per case, per grid, or in defaults)."
        )
        values["split"] = SPLITS[0]
    plan_values = {k: v for k, v in values.items() if k in PLAN_FIELDS}
    world = values.get("simulate_world")
    if isinstance(world, int) and not isinstance(world, bool) and "num_gpus" not in plan_values:
        plan_values["num_gpus"] = world  # the world it simulates is the plan's
    case_values = {k: v for k, v in values.items() if k in CASE_FIELDS and v is not None}
    if "model" not in plan_values:
        problems.append(f"{where}: model is missing.")
        plan_values["model"] = "?"
    targets = plan_values.get("targets")
    if isinstance(targets, str):
        plan_values["targets"] = parse_targets(targets)
    elif isinstance(targets, list):
        plan_values["targets"] = tuple(str(t) for t in targets)
    plan = None
    try:
        plan = TrainingPlan(**plan_values)
    except InvalidPlanError as err:
        problems.extend(f"{where}: {p}" for p in err.problems)
    except TypeError as err:  # a field of the wrong shape, e.g. a mapping
        problems.append(f"{where}: {err}")
    case_values = {**CASE_DEFAULTS, **case_values}
    problems.extend(f"{where}: {p}" for p in case_problems(case_values, plan))
    if problems or plan is None:
        raise CaseError(problems)
    return Case(plan=plan, **case_values)


CASE_DEFAULTS = {f.name: f.default for f in fields(Case) if f.name != "plan"}


SIMULATED_WORLD_LIMITS = (
    "NCCL communicator and its buffers (no real process group: collectives move no data)",
    "communication/computation overlap and stream waits of real collectives",
    "speed: tokens/s and step time are rank 0 alone, not a multi-GPU measurement",
    "the other ranks' imbalance (rank 0's shards only; uneven last shards not seen)",
)
