"""What to change so a plan fits a GPU: each change with its memory and tokens/s after it,
ranked by what it costs, and the cheapest combination that fits.

Costs, in rank order: nothing but speed (gradient checkpointing, a smaller micro-batch with
more accumulation, the expandable-segments allocator), a little quality (8-bit optimizer
states, a 4-bit or 8-bit base, a lower rank, fewer target modules: what a practitioner
reaches for first on one card), more GPUs (FSDP or ZeRO-3, the fewest that fit), then data
(a shorter sequence: tokens cut). Within a rank, the smaller loss of tokens/s comes first.

Combinations: for each cost, the free changes and those of that cost applied cheapest first
until the plan fits, then pruned (each dropped again where the rest still fits): one answer
per kind of cost, ranked by it, so "QLoRA with checkpointing on one card" comes before
"16 GPUs", which comes before "a shorter sequence".

Every estimate goes through ``prepare(...).estimate`` with the plan's allocator model (the
run simulated: one trace per recipe, a replay per plan), so each row and the combination
give the bytes ``vramcalc plan`` gives for the changed plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from vramcalc.budget import DEFAULT_HEADROOM, budget_bytes, judge
from vramcalc.catalog import Gpu
from vramcalc.checks import require_runnable
from vramcalc.configs import FilePlan
from vramcalc.errors import VramcalcError
from vramcalc.estimate import MemoryEstimate, default_allocator_model, prepare
from vramcalc.search import largest_fitting
from vramcalc.speed.throughput import plan_speed
from vramcalc.training_plan import KBIT_QUANTS, TrainingPlan

# the cost of a change beyond speed, cheapest first
COSTS = ("none", "quality", "more GPUs", "tokens cut")


@dataclass(frozen=True)
class Option:
    """One plan with its memory and speed on the GPU."""

    plan: TrainingPlan
    device_total_bytes: int
    fits: bool
    tokens_per_second: float | None  # over all GPUs of the plan
    allocator_model: str = "simulated"  # the estimate's (MemoryEstimate.allocator_model)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_total_bytes": self.device_total_bytes,
            "fits": self.fits,
            "tokens_per_second": self.tokens_per_second,
            "allocator_model": self.allocator_model,
        }


@dataclass(frozen=True)
class Change:
    """One change to the plan, as flags, with what it costs."""

    flags: str  # e.g. "--gradient-checkpointing"
    description: str
    cost: str  # one of COSTS
    option: Option
    speed_change: float | None  # tokens/s after / before - 1 (negative: slower)

    def to_dict(self) -> dict[str, Any]:
        return {
            "flags": self.flags,
            "description": self.description,
            "cost": self.cost,
            **self.option.to_dict(),
            "speed_change": self.speed_change,
        }


@dataclass(frozen=True)
class Combination:
    """Changes that together make the plan fit, and what the changed plan needs."""

    changes: tuple[Change, ...]
    option: Option

    @property
    def cost(self) -> str:
        """The dearest change's cost."""
        return max((c.cost for c in self.changes), key=COSTS.index, default="none")

    def to_dict(self) -> dict[str, Any]:
        return {
            "flags": [c.flags for c in self.changes],
            "cost": self.cost,
            **self.option.to_dict(),
            "plan": self.option.plan.to_dict(),
        }


@dataclass(frozen=True)
class Advice:
    gpu: Gpu
    headroom: float
    budget_bytes: int
    baseline: Option
    changes: tuple[Change, ...]  # ranked, cheapest first
    combination: tuple[Change, ...]  # applied in order; empty when the plan already fits
    combined: Option | None  # the plan with every change of ``combination``
    source: FilePlan | None = None  # the config file the plan was read from (--from)
    # every combination that fits, cheapest first (``combination`` is the first one's)
    combinations: tuple[Combination, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu.name,
            "gpu_memory_bytes": self.gpu.memory_bytes,
            "headroom": self.headroom,
            "budget_bytes": self.budget_bytes,
            "baseline": {**self.baseline.to_dict(), "plan": self.baseline.plan.to_dict()},
            "changes": [c.to_dict() for c in self.changes],
            "combination": [c.flags for c in self.combination],
            "combined": (
                {**self.combined.to_dict(), "plan": self.combined.plan.to_dict()}
                if self.combined
                else None
            ),
            "combinations": [c.to_dict() for c in self.combinations],
            "from_file": self.source.to_dict() if self.source else None,
        }


class _Judge:
    """Estimates memory and speed of plans on one GPU (``budget.judge``), each plan once."""

    def __init__(self, gpu: Gpu, headroom: float, allocator_model: str):
        self.gpu, self.headroom, self.allocator_model = gpu, headroom, allocator_model
        self.memo: dict[TrainingPlan, Option] = {}

    def memory(self, plan: TrainingPlan) -> MemoryEstimate:
        return prepare(plan.model, plan).estimate(plan, self.allocator_model)

    def option(self, plan: TrainingPlan) -> Option:
        if plan not in self.memo:
            prepared = prepare(plan.model, plan)
            memory = self.memory(plan)
            total = memory.device_total_bytes
            speed = plan_speed(prepared.spec.config_dict, prepared.inventory, plan)
            estimate, _ = speed.on(self.gpu)
            tokens = estimate.tokens_per_second_all_gpus if estimate else None
            self.memo[plan] = Option(
                plan, total, self.fits_total(total, plan), tokens, memory.allocator_model
            )
        return self.memo[plan]

    def fits_total(self, total: int, plan: TrainingPlan) -> bool:
        return judge(total, self.gpu, self.headroom, plan).fits

    def fits(self, plan: TrainingPlan) -> bool:
        return self.fits_total(self.memory(plan).device_total_bytes, plan)


def _candidates(plan: TrainingPlan, judge: _Judge) -> list[tuple[str, str, str, TrainingPlan]]:
    """(flags, description, cost, changed plan) for every change that applies to ``plan``."""
    out: list[tuple[str, str, str, TrainingPlan]] = []
    if not plan.gradient_checkpointing:
        out.append(
            (
                "--gradient-checkpointing",
                "recompute each layer in backward",
                "none",
                plan.with_(gradient_checkpointing=True),
            )
        )
    if plan.batch_size > 1:
        batch = plan.batch_size // 2
        while batch > 1 and not judge.fits(
            plan.with_(batch_size=batch, grad_accum=plan.grad_accum * plan.batch_size // batch)
        ):
            batch //= 2
        accum = plan.grad_accum * plan.batch_size // batch
        if batch * accum == plan.batch_size * plan.grad_accum:
            out.append(
                (
                    f"--batch-size {batch} --grad-accum {accum}",
                    "same effective batch, more micro-steps",
                    "none",
                    plan.with_(batch_size=batch, grad_accum=accum),
                )
            )
    if plan.allocator == "default":
        out.append(
            (
                "--allocator expandable",
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
                "none",
                plan.with_(allocator="expandable"),
            )
        )
    for gpus in (2, 4, 8, 16):  # the fewest GPUs that fit, FSDP (else ZeRO-3) sharding everything
        if gpus <= plan.num_gpus:
            continue
        fitting = [
            plan.with_(num_gpus=gpus, strategy=s)
            for s in ("fsdp", "zero3")
            if judge.fits(plan.with_(num_gpus=gpus, strategy=s))
        ]
        if fitting or gpus == 16:
            changed = fitting[0] if fitting else plan.with_(num_gpus=gpus, strategy="fsdp")
            out.append(
                (
                    f"--num-gpus {gpus} --strategy {changed.strategy}",
                    f"shard everything over {gpus} GPUs",
                    "more GPUs",
                    changed,
                )
            )
            break
    if plan.optimizer in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"):
        out.append(
            (
                "--optimizer paged_adamw_8bit",
                "8-bit optimizer states, paged",
                "quality",
                plan.with_(optimizer="paged_adamw_8bit"),
            )
        )
    # a k-bit base as the recipes run it: with gradient checkpointing (peft's
    # prepare_model_for_kbit_training turns it on)
    ckpt = "" if plan.gradient_checkpointing else " --gradient-checkpointing"
    if plan.method == "lora" and plan.quant not in KBIT_QUANTS:
        out.append(
            (
                f"--method qlora{ckpt}",
                "4-bit NF4 base weights (QLoRA)",
                "quality",
                plan.with_(method="qlora", gradient_checkpointing=True),
            )
        )
        out.append(
            (
                f"--quant int8{ckpt}",
                "8-bit base weights (LLM.int8)",
                "quality",
                plan.with_(quant="int8", gradient_checkpointing=True),
            )
        )
    if plan.method == "lora" and plan.quant == "int8":
        out.append(
            (
                f"--method qlora{ckpt}",
                "4-bit NF4 base weights instead of INT8",
                "quality",
                plan.with_(method="qlora", gradient_checkpointing=True),
            )
        )
    if plan.method == "full":
        out.append(
            (
                "--method lora",
                "LoRA adapters on the 16-bit base instead of full fine-tuning",
                "quality",
                plan.with_(method="lora"),
            )
        )
        out.append(
            (
                f"--method qlora{ckpt}",
                "4-bit base weights + LoRA adapters instead of full fine-tuning",
                "quality",
                plan.with_(method="qlora", gradient_checkpointing=True),
            )
        )
    if plan.uses_adapters and plan.targets is not None:
        out.append(
            (
                "--targets default",
                "PEFT's default target modules only",
                "quality",
                plan.with_(targets=None),
            )
        )
    if plan.uses_adapters and plan.rank > 8:
        out.append(("--rank 8", f"rank {plan.rank} -> 8", "quality", plan.with_(rank=8)))
    if plan.seq_len > 256:
        seq = _longest_fitting_seq(plan, judge)
        if seq:
            out.append(
                (
                    f"--seq-len {seq}",
                    f"{plan.seq_len - seq:,} tokens cut from each sequence",
                    "tokens cut",
                    plan.with_(seq_len=seq),
                )
            )
    return out


def _longest_fitting_seq(plan: TrainingPlan, judge: _Judge, multiple: int = 256) -> int | None:
    """The longest sequence, a multiple of ``multiple`` shorter than the plan's, that fits."""

    def probe(units: int) -> _SeqProbe:
        seq = units * multiple
        return _SeqProbe(seq, judge.fits(plan.with_(seq_len=seq)))

    best, _ = largest_fitting(probe, max(plan.seq_len // multiple - 1, 1))
    return best.seq_len if best is not None and best.seq_len < plan.seq_len else None


class _SeqProbe(NamedTuple):
    seq_len: int
    fits: bool


def advise(
    plan: TrainingPlan,
    gpu: Gpu,
    headroom: float = DEFAULT_HEADROOM,
    source: FilePlan | None = None,
    allocator_model: str | None = None,
) -> Advice:
    """The changes that make ``plan`` fit ``gpu`` leaving ``headroom``, ranked, and the cheapest
    combination of them that fits: every row the plan's own estimate (its run simulated, as
    ``plan`` gives it)."""
    require_runnable(plan, gpu)
    budget = budget_bytes(gpu, headroom)
    judge_ = _Judge(gpu, headroom, allocator_model or default_allocator_model())
    baseline = judge_.option(plan)
    base_speed = baseline.tokens_per_second
    changes = []
    for flags, description, cost, changed in _candidates(plan, judge_):
        option = judge_.option(changed)
        if option.device_total_bytes >= baseline.device_total_bytes:
            continue  # saves nothing here
        speed = (
            (option.tokens_per_second / base_speed - 1)
            if option.tokens_per_second and base_speed
            else None
        )
        changes.append(Change(flags, description, cost, option, speed))
    changes.sort(key=_rank)
    combinations: list[Combination] = []
    if not baseline.fits:
        for tier in COSTS:  # the free changes and those of one cost, applied cheapest first
            allowed = [c for c in changes if c.cost in ("none", tier)]
            taken, combined = _combine(plan, allowed, judge_)
            if combined is None or not combined.fits:
                continue
            found = Combination(tuple(taken), combined)
            if all(
                _delta(plan, found.option.plan) != _delta(plan, c.option.plan) for c in combinations
            ):
                combinations.append(found)
    first = combinations[0] if combinations else None
    return Advice(
        gpu,
        headroom,
        budget,
        baseline,
        tuple(changes),
        first.changes if first else (),
        first.option if first else None,
        source,
        tuple(combinations),
    )


def _rank(change: Change) -> tuple[int, float]:
    """Cheapest cost first; within one, the smallest loss of tokens/s."""
    loss = -change.speed_change if change.speed_change is not None else 1.0
    return COSTS.index(change.cost), loss


def _delta(base: TrainingPlan, changed: TrainingPlan) -> dict[str, Any]:
    return {k: v for k, v in changed.to_dict().items() if v != base.to_dict()[k]}


def _combine(
    plan: TrainingPlan, changes: list[Change], exact: _Judge
) -> tuple[list[Change], Option | None]:
    """The ranked changes applied one after another, cheapest first (a later alternative for a
    field replacing an earlier one), until the plan fits; then each dropped again, most
    expensive first, where the rest still fits (a replaced one always can be)."""
    current, taken = plan, []
    for change in changes:  # a later alternative for a field overrides an earlier one
        candidate = _apply(current, _delta(plan, change.option.plan))
        if candidate is None:
            continue
        current = candidate
        taken.append(change)
        if exact.fits(current):
            return _prune(plan, taken, exact)
    return taken, exact.option(current) if taken else None


def _prune(plan: TrainingPlan, taken: list[Change], exact: _Judge) -> tuple[list[Change], Option]:
    """Drop each change, most expensive first, that the others do not need to fit."""

    def build(chosen: list[Change]) -> TrainingPlan | None:
        current: TrainingPlan | None = plan
        for change in chosen:
            current = _apply(current, _delta(plan, change.option.plan)) if current else None
        return current

    for change in reversed(list(taken)):
        rest = [c for c in taken if c is not change]
        candidate = build(rest)
        if rest and candidate is not None and exact.fits(candidate):
            taken = rest
    final = build(taken)
    assert final is not None  # every prefix applied before
    return taken, exact.option(final)


def _apply(plan: TrainingPlan, delta: dict[str, Any]) -> TrainingPlan | None:
    kwargs = dict(delta)
    if "targets" in kwargs and isinstance(kwargs["targets"], list):
        kwargs["targets"] = tuple(kwargs["targets"])
    if "method" in kwargs:
        kwargs.setdefault("quant", None)
    try:
        return plan.with_(**kwargs)
    except VramcalcError:
        return None
