"""The validated description of one fine-tuning run: ``TrainingPlan``.

A plan holds what a user chooses (model, method, quantization, LoRA shape,
batch geometry, optimizer, attention kernel). ``TrainingPlan.__post_init__``
checks every field and raises one ``InvalidPlanError`` listing every problem,
each naming the CLI flag that sets it. Defaults are the project's default
recipe (DEVELOPERS.md): HF Trainer with ``bf16=True``, PEFT LoRA defaults
(r=8, alpha=8, dropout 0, PEFT's per-architecture target modules; AdaLoRA: peft's
``AdaLoraConfig`` defaults init_r=12, target_r=8, tinit=tfinal=0, deltaT=1,
orth_reg_weight=0.5, and its own default targets), NF4 with
double quantization for QLoRA, SDPA attention, Trainer's default optimizer
(``adamw_torch_fused`` with torch >= 2.8), gradient checkpointing on for k-bit
base weights (``prepare_model_for_kbit_training``'s ``use_gradient_checkpointing=True``,
as the common QLoRA recipes) and off otherwise, unless asked.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any

from vramcalc.errors import InvalidPlanError

METHODS = ("full", "lora", "qlora", "adalora")
ADAPTER_METHODS = ("lora", "qlora", "adalora")
QUANTS = ("none", "int8", "nf4", "fp4")
KBIT_QUANTS = ("int8", "nf4", "fp4")  # bitsandbytes base weights
DTYPES = ("bf16", "fp16", "fp32")
ATTNS = ("sdpa", "eager", "flash_attention_2")
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "sgd",
    "sgd_momentum",
    "adafactor",
)
STRATEGIES = ("ddp", "fsdp", "fsdp-grad-op", "zero1", "zero2", "zero3")
# PyTorch's caching allocator mode, as PYTORCH_CUDA_ALLOC_CONF sets it:
# "default" (no setting) or "expandable" (expandable_segments:True)
ALLOCATORS = ("default", "expandable")
ALL_LINEAR = "all-linear"
# the fields only --method adalora reads (peft AdaLoraConfig; TrainingPlan's last fields)
ADALORA_FIELDS = (
    "init_rank",
    "target_rank",
    "tinit",
    "tfinal",
    "delta_t",
    "total_step",
    "orth_reg_weight",
)


def suggest(value: str, choices: list[str] | tuple[str, ...], n: int = 3) -> str:
    """A ' Did you mean ...?' suffix listing close matches, or ''.

    Case-insensitive; for ``org/name`` choices the part after the last ``/``
    is matched too, so ``llama-2-7b`` finds ``meta-llama/Llama-2-7b``.
    """
    lowered = {c.lower(): c for c in choices}
    short = {c.lower().rsplit("/", 1)[-1]: c for c in choices}
    close = [
        lowered[c] for c in difflib.get_close_matches(value.lower(), list(lowered), n=n, cutoff=0.6)
    ]
    close += [
        short[c]
        for c in difflib.get_close_matches(
            value.lower().rsplit("/", 1)[-1], list(short), n=n, cutoff=0.6
        )
    ]
    found = list(dict.fromkeys(close))[:n]
    if not found:
        return ""
    return " Did you mean " + ", ".join(repr(c) for c in found) + "?"


def choice_problem(flag: str, value: str, choices: tuple[str, ...]) -> str | None:
    if value in choices:
        return None
    return f"{flag} {value!r} is not one of {', '.join(choices)}." + suggest(value, choices)


@dataclass(frozen=True)
class TrainingPlan:
    """One fine-tuning run, validated on construction.

    ``targets`` is ``None`` for PEFT's default target modules of the
    architecture, ``("all-linear",)`` for every linear layer but the output
    head, or explicit module names. ``quant`` is ``None`` until resolved:
    ``qlora`` means ``nf4``, other methods mean ``none``.
    """

    model: str
    method: str = "lora"
    quant: str | None = None
    double_quant: bool = True
    dtype: str = "bf16"
    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    dora: bool = False
    modules_to_save: tuple[str, ...] | None = None
    seq_len: int = 2048
    batch_size: int = 1
    grad_accum: int = 1
    # None (not given): on for k-bit base weights, else off; always a bool once built
    gradient_checkpointing: bool = None  # type: ignore[assignment]
    optimizer: str = "adamw_torch_fused"
    attn: str = "sdpa"
    num_gpus: int = 1
    strategy: str = "ddp"
    cpu_offload: bool = False
    allocator: str = "default"
    # AdaLoRA (peft AdaLoraConfig; used only with --method adalora): adapters start at
    # init_rank and are pruned towards an average target_rank by the budget schedule
    init_rank: int = 12
    target_rank: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    total_step: int | None = None  # peft requires it; memory does not depend on it
    orth_reg_weight: float = 0.5

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not isinstance(self.model, str) or not self.model.strip():
            problems.append("--model must name a model (catalog name, hub id or config path).")
        for flag, value, choices in (
            ("--method", self.method, METHODS),
            ("--dtype", self.dtype, DTYPES),
            ("--optimizer", self.optimizer, OPTIMIZERS),
            ("--attn", self.attn, ATTNS),
            ("--strategy", self.strategy, STRATEGIES),
            ("--allocator", self.allocator, ALLOCATORS),
        ):
            problem = choice_problem(flag, value, choices)
            if problem:
                problems.append(problem)
        quant = self.quant
        if quant is not None:
            problem = choice_problem("--quant", quant, QUANTS)
            if problem:
                problems.append(problem)
                quant = None
        if quant is None:
            quant = "nf4" if self.method == "qlora" else "none"
            object.__setattr__(self, "quant", quant)
        if self.gradient_checkpointing is None:
            object.__setattr__(self, "gradient_checkpointing", quant in KBIT_QUANTS)
        if self.method == "qlora" and quant not in ("nf4", "fp4"):
            problems.append(
                f"--method qlora needs 4-bit base weights, but --quant is {quant!r}; "
                "use --quant nf4 (the default for qlora) or fp4, or --method lora "
                "for 16-bit/INT8 base weights."
            )
        if self.method == "full" and quant != "none":
            problems.append(
                f"--method full trains every weight, which cannot be stored as {quant!r}; "
                "use --quant none, or --method lora/qlora for quantized base weights."
            )
        numbers: tuple[tuple[str, object], ...] = (
            ("--rank", self.rank),
            ("--seq-len", self.seq_len),
            ("--batch-size", self.batch_size),
            ("--grad-accum", self.grad_accum),
            ("--num-gpus", self.num_gpus),
        )
        for flag, number in numbers:
            if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
                problems.append(f"{flag} must be a positive integer, got {number!r}.")
        if self.alpha is not None and not self.alpha > 0:
            problems.append(f"--alpha must be positive, got {self.alpha!r}.")
        elif self.alpha is None and isinstance(self.rank, int):
            object.__setattr__(self, "alpha", float(self.rank))  # PEFT scaling alpha/r = 1
        if not (0.0 <= self.dropout < 1.0):
            problems.append(f"--dropout must be in [0, 1), got {self.dropout!r}.")
        if self.targets is not None:
            targets = tuple(t.strip() for t in self.targets if t.strip())
            if not targets:
                problems.append(
                    "--targets is empty; give module names such as q_proj,v_proj or all-linear."
                )
            elif ALL_LINEAR in targets and len(targets) > 1:
                problems.append("--targets all-linear cannot be combined with module names.")
            object.__setattr__(self, "targets", targets)
        if self.modules_to_save is not None:
            object.__setattr__(
                self,
                "modules_to_save",
                tuple(m.strip() for m in self.modules_to_save if m.strip()) or None,
            )
        if self.method == "full" and (self.dora or self.modules_to_save):
            problems.append(
                "--dora and --modules-to-save are LoRA options; --method full already trains every weight."
            )
        if self.method == "adalora":
            problems += self._adalora_problems()
        if self.cpu_offload and (self.strategy == "ddp" or self.num_gpus == 1):
            problems.append(
                "--cpu-offload needs --num-gpus > 1 with --strategy fsdp, fsdp-grad-op or zero1/2/3."
            )
        if problems:
            raise InvalidPlanError(problems)

    def _adalora_problems(self) -> list[str]:
        """AdaLoRA's options, checked as peft's ``AdaLoraConfig`` does, naming the flags."""
        problems = []
        for flag, number, minimum in (
            ("--init-rank", self.init_rank, 1),
            ("--target-rank", self.target_rank, 1),
            ("--tinit", self.tinit, 0),
            ("--tfinal", self.tfinal, 0),
            ("--delta-t", self.delta_t, 1),
            ("--total-step", 1 if self.total_step is None else self.total_step, 1),
        ):
            if isinstance(number, bool) or not isinstance(number, int) or number < minimum:
                kind = "a positive integer" if minimum else "an integer >= 0"
                problems.append(f"{flag} must be {kind}, got {number!r}.")
        if problems:
            return problems
        if self.target_rank > self.init_rank:
            problems.append(
                f"--target-rank {self.target_rank} is above --init-rank {self.init_rank}: "
                "AdaLoRA only prunes ranks; give a target rank <= the initial rank."
            )
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            problems.append(
                f"--tinit {self.tinit} + --tfinal {self.tfinal} must be below --total-step "
                f"{self.total_step}: the schedule leaves no budgeting phase (peft AdaLoraConfig)."
            )
        if not self.orth_reg_weight >= 0:
            problems.append(f"--orth-reg-weight must be >= 0, got {self.orth_reg_weight!r}.")
        if self.rank != 8:
            problems.append(
                f"--rank {self.rank} is LoRA's rank, which AdaLoRA ignores; "
                "use --init-rank (and --target-rank) with --method adalora."
            )
        if self.dora:
            problems.append("--dora is not supported by --method adalora (peft AdaLoraConfig).")
        if self.num_gpus > 1 and self.strategy != "ddp":
            problems.append(
                f"--method adalora with --strategy {self.strategy} is not modelled (the rank "
                "allocator reads whole gradients; peft gathers them only under DeepSpeed); use "
                "--strategy ddp or one GPU."
            )
        return problems

    # -- derived facts ---------------------------------------------------
    @property
    def uses_adapters(self) -> bool:
        return self.method in ADAPTER_METHODS

    @property
    def adapter_rank(self) -> int:
        """The rank the adapter tensors are built with: ``--rank``, or AdaLoRA's
        ``--init-rank`` (pruned ranks are masked to zero, the tensors keep this shape)."""
        return self.init_rank if self.method == "adalora" else self.rank

    @property
    def adalora_total_step(self) -> int:
        """``total_step`` for peft's ``AdaLoraConfig``: as given, else the smallest value the
        schedule allows (the budget schedule changes values, not memory)."""
        return self.total_step if self.total_step is not None else self.tinit + self.tfinal + 1

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else float(self.rank)

    @property
    def is_kbit(self) -> bool:
        """Base weights quantized by bitsandbytes (INT8 or 4-bit)."""
        return self.quant in KBIT_QUANTS

    @property
    def checkpointing_note(self) -> str:
        """Gradient checkpointing as chosen, and why (``plan`` states it in its output)."""
        if self.is_kbit and self.gradient_checkpointing:
            return (
                "gradient checkpointing on (use_reentrant=False): the default for k-bit base "
                "weights, as prepare_model_for_kbit_training(use_gradient_checkpointing=True) "
                "and the common QLoRA recipes; --no-gradient-checkpointing switches it off"
            )
        if self.is_kbit:
            return (
                "gradient checkpointing off (--no-gradient-checkpointing; k-bit recipes "
                "usually keep it on)"
            )
        if self.gradient_checkpointing:
            return "gradient checkpointing on (use_reentrant=False, --gradient-checkpointing)"
        return (
            "gradient checkpointing off (the default without k-bit base weights; "
            "--gradient-checkpointing trades one more forward for activation memory)"
        )

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.seq_len * self.batch_size

    def with_(self, **changes: Any) -> TrainingPlan:
        """A copy with ``changes`` applied and validated again."""
        if "method" in changes and "quant" not in changes:
            changes["quant"] = None
        if "rank" in changes and "alpha" not in changes and self.alpha == float(self.rank):
            changes["alpha"] = None
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The resolved plan as plain JSON-ready values (targets as a list)."""
        data = asdict(self)
        data["targets"] = list(self.targets) if self.targets is not None else None
        data["modules_to_save"] = list(self.modules_to_save) if self.modules_to_save else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingPlan:
        """Build a plan from a mapping (JSON line, CSV row, YAML case): ``plan_from_values``."""
        return plan_from_values(data)


def parse_targets(text: str | None) -> tuple[str, ...] | None:
    """``"q_proj,v_proj"`` -> ``("q_proj", "v_proj")``; empty/None/'default' -> None."""
    if text is None:
        return None
    text = text.strip()
    if not text or text.lower() == "default":
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


PLAN_FIELDS = tuple(f.name for f in fields(TrainingPlan))
#: what each field is when not given (``model`` has no default: None)
PLAN_DEFAULTS: dict[str, Any] = {
    f.name: None if f.default is MISSING else f.default for f in fields(TrainingPlan)
}
_TRUE = {"1", "true", "yes", "y", "on", "t"}
_FALSE = {"0", "false", "no", "n", "off", "f"}


def _kind(annotation: object) -> str:
    text = str(annotation)
    for kind in ("tuple", "bool", "int", "float"):
        if text.startswith(kind):
            return kind
    return "str"


FIELD_KINDS = {f.name: _kind(f.type) for f in fields(TrainingPlan)}


def flag(name: str) -> str:
    """``seq_len`` → ``--seq-len``."""
    return "--" + name.replace("_", "-")


def plan_from_values(values: Mapping[str, Any]) -> TrainingPlan:
    """The one way from named values to a ``TrainingPlan``: command-line options, CSV cells,
    YAML and JSON values, measurement records.

    Keys are field names (dashes or underscores); ``None`` means "not given" (the default);
    text is read by the field's type: ``true``/``false`` (``yes``, ``y``, ``1``, ``on`` ...),
    integers (``4`` or ``4.0``), numbers, comma-separated module lists (``default``: PEFT's).
    Every problem, in reading or in the plan, is reported at once, each naming its flag.
    """
    problems: list[str] = []
    kwargs: dict[str, Any] = {"model": None}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in FIELD_KINDS:
            problems.append(f"unknown plan field {key!r}.{suggest(str(key), PLAN_FIELDS)}")
            continue
        if value is None:
            continue
        try:
            kwargs[name] = plan_value(name, value)
        except InvalidPlanError as err:
            problems += err.problems
    try:
        plan = TrainingPlan(**kwargs)
    except InvalidPlanError as err:
        problems += err.problems
    if problems:
        raise InvalidPlanError(problems)
    return plan


def plan_value(name: str, value: Any) -> Any:
    """One plan field's value as ``TrainingPlan`` takes it: text read by the field's type
    (``plan_from_values``), lists as tuples; an ``InvalidPlanError`` naming the flag."""
    try:
        return _coerce(name, value)
    except ValueError as err:
        raise InvalidPlanError([str(err)]) from None


def _coerce(name: str, value: Any) -> Any:
    kind = FIELD_KINDS[name]
    if not isinstance(value, str):
        return tuple(value) if kind == "tuple" and isinstance(value, list) else value
    try:
        return text_value(kind, value)
    except ValueError as err:
        raise ValueError(f"{flag(name)} {value.strip()!r} {err}.") from None


def text_value(kind: str, text: str) -> Any:
    """One cell of text read as ``kind``: ``bool`` (true/false, yes/no, y/n, on/off, t/f, 1/0,
    any case), ``int`` (``4`` or ``4.0``), ``float``, ``tuple`` (a comma list of module names;
    blank or ``default``: None), else the text; a ``ValueError`` saying what it is not."""
    text = text.strip()
    if kind == "tuple":
        return parse_targets(text)
    if kind == "bool":
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ValueError("is not true or false")
    if kind == "int":
        try:
            number = float(text)
        except ValueError:
            number = 0.5
        if not number.is_integer():
            raise ValueError("is not an integer")
        return int(number)
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError("is not a number") from None
    return text
