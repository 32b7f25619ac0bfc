"""The validated description of one serving set-up: ``ServePlan`` and its adapters.

A serving plan is a base model (``--model``, ``--quant``, ``--dtype``), the LoRA adapters it
serves (``--adapters N`` of one shape, or the real peft ``adapter_config.json`` files of
``--adapter-dir``), how they are applied (``--mode``), and the load: ``--batch`` concurrent
sequences of ``--context`` tokens each (prompt + generated), decoded with ``generate``'s
``--cache`` (``dynamic``, its default, or ``static``). ``ServePlan.__post_init__`` reports
every problem at once, each naming its flag, like ``TrainingPlan``.

Modes:

``merged``    each adapter merged into its own copy of the base (peft ``merge_and_unload``):
              N adapters are N models on the card, each decoding its share of the batch;
``unmerged``  the adapters stay beside one base (``PeftModel``), one active per batch
              (``set_adapter``): every targeted linear adds two small matmuls;
``multi``     the adapters stay beside one base and one batch mixes them (peft's mixed-batch
              inference, ``adapter_names=``): the small matmuls run once per distinct adapter.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vramcalc.errors import InvalidPlanError
from vramcalc.textfiles import read_text
from vramcalc.training_plan import ALL_LINEAR, ATTNS, DTYPES, QUANTS, choice_problem, parse_targets

MODES = ("merged", "unmerged", "multi")
CACHES = ("dynamic", "static")
LOGITS = ("last", "all")
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class AdapterSpec:
    """One LoRA adapter's shape: what ``adapter_config.json`` says (or the flags)."""

    name: str
    rank: int = 8
    alpha: float | None = None
    targets: tuple[str, ...] | None = None  # None: peft's default for the architecture
    dora: bool = False
    modules_to_save: tuple[str, ...] | None = None
    base_model: str | None = None  # base_model_name_or_path
    path: str | None = None  # the adapter_config.json it was read from

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("targets", "modules_to_save"):
            data[key] = list(data[key]) if data[key] is not None else None
        return data


def _names(value: Any, key: str, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value == ALL_LINEAR:
            return (ALL_LINEAR,)
        raise InvalidPlanError(
            [
                f"--adapter-dir {where}: {key} is the regular expression {value!r}; "
                "vramcalc reads lists of module names or 'all-linear'."
            ]
        )
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(sorted(value)) or None
    raise InvalidPlanError([f"--adapter-dir {where}: {key} must be a list of module names."])


def adapter_from_config(path: Path) -> AdapterSpec:
    """An ``AdapterSpec`` from one peft ``adapter_config.json``."""
    where = str(path)
    try:
        raw = json.loads(read_text(path))
    except (OSError, ValueError) as err:
        raise InvalidPlanError([f"--adapter-dir {where}: not readable JSON ({err})."]) from err
    if not isinstance(raw, dict):
        raise InvalidPlanError([f"--adapter-dir {where}: not a JSON object."])
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InvalidPlanError(
            [f"--adapter-dir {where}: peft_type {peft_type!r}; vramcalc serves LoRA adapters."]
        )
    rank = raw.get("r", 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise InvalidPlanError([f"--adapter-dir {where}: r must be a positive integer."])
    alpha = raw.get("lora_alpha")
    return AdapterSpec(
        name=path.parent.name,
        rank=rank,
        alpha=float(alpha) if isinstance(alpha, (int, float)) else None,
        targets=_names(raw.get("target_modules"), "target_modules", where),
        dora=bool(raw.get("use_dora", False)),
        modules_to_save=_names(raw.get("modules_to_save"), "modules_to_save", where),
        base_model=raw.get("base_model_name_or_path") or None,
        path=where,
    )


def read_adapter_dir(directory: str | Path) -> tuple[AdapterSpec, ...]:
    """Every adapter of ``directory``: its own ``adapter_config.json``, else one per
    subdirectory that holds one (sorted by name)."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise InvalidPlanError([f"--adapter-dir {directory}: not a directory."])
    own = root / ADAPTER_CONFIG
    if own.is_file():
        return (adapter_from_config(own),)
    found = sorted(p / ADAPTER_CONFIG for p in root.iterdir() if (p / ADAPTER_CONFIG).is_file())
    if not found:
        raise InvalidPlanError(
            [
                f"--adapter-dir {directory}: no {ADAPTER_CONFIG} in it or in any of its "
                "subdirectories (peft's save_pretrained writes one per adapter)."
            ]
        )
    return tuple(adapter_from_config(p) for p in found)


def uniform_adapters(
    count: int, rank: int, alpha: float | None, targets: tuple[str, ...] | None
) -> tuple[AdapterSpec, ...]:
    """``--adapters N``: N adapters of the same shape."""
    return tuple(
        AdapterSpec(f"adapter-{i + 1}", rank, alpha, targets) for i in range(max(count, 0))
    )


@dataclass(frozen=True)
class ServePlan:
    """One serving set-up, validated on construction (every problem at once)."""

    model: str
    quant: str = "none"
    double_quant: bool = True
    dtype: str = "bf16"
    adapters: tuple[AdapterSpec, ...] = field(default=())
    mode: str = "unmerged"
    batch: int = 1
    prompt_tokens: int = 3840
    new_tokens: int = 256
    cache: str = "dynamic"
    logits: str = "last"
    attn: str = "sdpa"

    def __post_init__(self) -> None:
        problems = [
            p
            for p in (
                choice_problem("--quant", self.quant, QUANTS),
                choice_problem("--dtype", self.dtype, DTYPES),
                choice_problem("--mode", self.mode, MODES),
                choice_problem("--cache", self.cache, CACHES),
                choice_problem("--logits", self.logits, LOGITS),
                choice_problem("--attn", self.attn, ATTNS),
            )
            if p
        ]
        for flag, value in (
            ("--batch", self.batch),
            ("--prompt-tokens", self.prompt_tokens),
            ("--new-tokens", self.new_tokens),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{flag} must be a positive integer, got {value!r}")
        for adapter in self.adapters:
            if adapter.rank < 1:
                problems.append(f"--rank must be a positive integer, got {adapter.rank!r}")
                break
        if self.quant != "none" and self.dtype == "fp32":
            problems.append(
                "--dtype fp32 with --quant: bitsandbytes computes in 16 bit; use bf16 or fp16"
            )
        if problems:
            raise InvalidPlanError(problems)

    @property
    def context(self) -> int:
        """Tokens per sequence: prompt + generated."""
        return self.prompt_tokens + self.new_tokens

    @property
    def cache_tokens(self) -> int:
        """Tokens the cache holds at the end: ``generate`` never feeds the last generated token
        back, and sizes a static cache ``max_length - 1`` (generation/utils.py)."""
        return self.context - 1

    @property
    def is_kbit(self) -> bool:
        return self.quant != "none"

    @property
    def model_copies(self) -> int:
        """Base models on the card: one per merged adapter, else one."""
        return max(len(self.adapters), 1) if self.mode == "merged" else 1

    @property
    def copy_batch(self) -> int:
        """Sequences one model copy decodes (merged copies split the batch)."""
        return -(-self.batch // self.model_copies)

    def one_copy(self) -> ServePlan:
        """One merged copy as the harness measures a merged plan of several adapters
        (``vramcalc_harness/serve_case.py``): the first adapter, the copy's share of the
        batch; the plan itself when it holds one copy."""
        if self.model_copies == 1:
            return self
        return replace(self, adapters=self.adapters[:1], batch=self.copy_batch)

    def with_(self, **changes: Any) -> ServePlan:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "adapters"}
        data["context"] = self.context
        data["adapters"] = [a.to_dict() for a in self.adapters]
        return data


def context_split(
    context: int | None, prompt_tokens: int | None, new_tokens: int | None
) -> tuple[int, int]:
    """``--context`` / ``--prompt-tokens`` / ``--new-tokens`` as (prompt, new): any two fix
    the third; alone, ``--context`` keeps 256 new tokens (or a sixteenth of a short context)."""
    given = (context, prompt_tokens, new_tokens)
    if None not in given and prompt_tokens + new_tokens != context:  # type: ignore[operator]
        raise InvalidPlanError(
            [
                f"--context {context} is not --prompt-tokens {prompt_tokens} + --new-tokens "
                f"{new_tokens}; give two of the three"
            ]
        )
    if context is None:
        prompt = 3840 if prompt_tokens is None else prompt_tokens
        return prompt, 256 if new_tokens is None else new_tokens
    if prompt_tokens is not None:
        return prompt_tokens, context - prompt_tokens
    new = new_tokens if new_tokens is not None else min(256, max(context // 16, 1))
    if context <= new:
        raise InvalidPlanError(
            [f"--context {context} must be larger than --new-tokens {new} (context = prompt + new)"]
        )
    return context - new, new


def serve_plan(
    model: str | None = None,
    *,
    adapters: int | None = None,
    adapter_dir: str | Path | None = None,
    rank: int = 8,
    alpha: float | None = None,
    targets: str | tuple[str, ...] | None = None,
    context: int | None = None,
    prompt_tokens: int | None = None,
    new_tokens: int | None = None,
    **options: Any,
) -> ServePlan:
    """The ``ServePlan`` that ``vramcalc serve``'s options describe: ``adapters`` uniform
    adapters of ``rank`` and ``targets`` (default 1) or the ``adapter_config.json`` files of
    ``adapter_dir``; ``model`` defaults to the adapters' one base model; ``context``,
    ``prompt_tokens`` and ``new_tokens``: any two fix the third (``context_split``);
    ``options``: the other ``ServePlan`` fields (quant, dtype, mode, batch, cache ...)."""
    if adapter_dir is not None and adapters is not None:
        raise InvalidPlanError(["--adapters and --adapter-dir exclude each other."])
    if adapters is not None and adapters < 0:
        raise InvalidPlanError([f"--adapters must be 0 or more, got {adapters}."])
    if adapter_dir is not None:
        specs = read_adapter_dir(adapter_dir)
    else:
        if isinstance(targets, str):
            targets = parse_targets(targets)
        specs = uniform_adapters(1 if adapters is None else adapters, rank, alpha, targets)
    if model is None:
        bases = {a.base_model for a in specs if a.base_model}
        if len(bases) != 1:
            raise InvalidPlanError(
                [
                    "--model is missing, and the adapters name no single base model "
                    "(base_model_name_or_path) to take instead."
                ]
            )
        model = bases.pop()
    prompt, new = context_split(context, prompt_tokens, new_tokens)
    return ServePlan(model=model, adapters=specs, prompt_tokens=prompt, new_tokens=new, **options)
