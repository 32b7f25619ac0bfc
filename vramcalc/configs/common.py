"""What every config-file reader shares: the provenance of a plan field, the collector that
accounts for every key of a file, and the value mappings (dtype, optimizer, attention).

A reader walks the file's keys through a ``Collector``: each key it maps is *used*, each
key it knows to be irrelevant is *ignored* with a reason, and whatever is left at the end
is ignored as unknown. Each plan field it sets carries a ``FieldSource``: the file (with the
key), the tool's default (with the source file of the tool it is read from), or ours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vramcalc.errors import ConfigFileError
from vramcalc.training_plan import OPTIMIZERS

FILE, TOOL, OURS, FLAG = "file", "tool default", "ours", "flag"
ORIGINS = (FILE, TOOL, OURS, FLAG)

# keys that never change memory: schedule, data, logging, saving, hub, evaluation
NO_MEMORY_PREFIXES = (
    "learning_rate",
    "lr_",
    "warmup",
    "num_epochs",
    "num_train_epochs",
    "max_steps",
    "dataset",
    "datasets",
    "output_dir",
    "overwrite_output_dir",
    "logging",
    "log_",
    "save",
    "eval",
    "val_",
    "per_device_eval",
    "wandb",
    "mlflow",
    "report_to",
    "run_name",
    "seed",
    "weight_decay",
    "adam_",
    "special_tokens",
    "tokenizer",
    "hub_",
    "push_to_hub",
    "resume_from_checkpoint",
    "template",
    "max_samples",
    "preprocessing",
    "dataloader",
    "plot_loss",
    "do_train",
    "do_eval",
    "trust_remote_code",
    "ddp_timeout",
    "tf32",
    "max_grad_norm",
    "stage",
    "strict",
    "chat_template",
    "early_stopping",
    "loss_watchdog",
    "train_on_inputs",
    "group_by_length",
    "remove_unused_columns",
    "label_names",
    "env",
    "model_revision",
    "revision",
)
NO_MEMORY_REASON = "training schedule, data, logging or saving: no effect on memory"


@dataclass(frozen=True)
class FieldSource:
    """Where one plan field's value comes from."""

    value: Any
    origin: str  # file, tool default, ours, flag
    key: str | None = None  # the file's key (origin file) or the flag (origin flag)
    note: str = ""  # why: the tool's source file for its default, or what was mapped

    def to_dict(self, name: str) -> dict[str, Any]:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {
            "field": name,
            "value": value,
            "source": self.origin,
            "key": self.key,
            "note": self.note,
        }


@dataclass
class Collector:
    """Accounts for every key of one file while a reader maps it onto plan fields."""

    tool: str
    data: dict[str, Any]
    prefix: str = ""
    fields: dict[str, FieldSource] = field(default_factory=dict)
    used: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    world_size: int | None = None
    alpha_rule: Callable[[int], float] | None = None  # the tool's alpha for a given rank

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def take(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (marked used), or ``default`` when absent or null."""
        if key not in self.data:
            return default
        value = self.data[key]
        if value is None:  # an empty YAML key (`lora_model_dir:`) says nothing
            self.ignored.setdefault(self.name(key), "empty (null): the default applies")
            return default
        if self.name(key) not in self.used:
            self.used.append(self.name(key))
        return value

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def set(
        self, name: str, value: Any, origin: str, key: str | None = None, note: str = ""
    ) -> None:
        self.fields[name] = FieldSource(value, origin, self.name(key) if key else None, note)

    def from_key(
        self,
        name: str,
        key: str,
        default: Any,
        origin: str,
        note: str = "",
        convert: Callable[[Any], Any] | None = None,
    ) -> None:
        """Set plan field ``name`` from ``key`` if the file has it, else ``default``."""
        if self.has(key):
            raw = self.take(key)
            self.set(name, convert(raw) if convert else raw, FILE, key)
        else:
            self.take(key)  # an explicit null: recorded as ignored
            self.set(name, default, origin, note=note)

    def ignore(self, key: str, reason: str) -> None:
        if key in self.data and self.name(key) not in self.used:
            self.ignored[self.name(key)] = reason

    def error(self, key: str, problem: str) -> ConfigFileError:
        return ConfigFileError(f"{self.tool} key {self.name(key)!r}: {problem}")

    def finish(self) -> None:
        """Every key not used nor ignored yet gets its reason."""
        for key in self.data:
            name = self.name(key)
            if name in self.used or name in self.ignored:
                continue
            if self.data[key] is None:
                self.ignored[name] = "empty (null): sets nothing"
            elif key.startswith(NO_MEMORY_PREFIXES):
                self.ignored[name] = NO_MEMORY_REASON
            else:
                self.ignored[name] = f"not a key vramcalc maps for {self.tool}: no effect assumed"


def as_bool(c: Collector, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise c.error(key, f"expected true or false, got {value!r}.")


def as_int(c: Collector, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise c.error(key, f"expected a positive integer, got {value!r}.")
    try:
        number = int(value)
    except ValueError:
        raise c.error(key, f"expected a positive integer, got {value!r}.") from None
    if number <= 0:
        raise c.error(key, f"expected a positive integer, got {value!r}.")
    return number


def as_float(c: Collector, key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise c.error(key, f"expected a number, got {value!r}.") from None


def as_modules(c: Collector, key: str, value: Any) -> tuple[str, ...]:
    """A module list: YAML list or comma-separated string; ``all`` / ``all-linear`` alike."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = [str(p).strip() for p in value if str(p).strip()]
    else:
        raise c.error(
            key, f"expected module names (a list or a comma-separated string), got {value!r}."
        )
    if not parts:
        raise c.error(key, "is empty; name the modules, or leave the key out.")
    if [p.lower() for p in parts] in (["all"], ["all-linear"], ["all_linear"]):
        return ("all-linear",)
    return tuple(parts)


# transformers OptimizerNames (training_args.py) -> vramcalc's optimizer names
OPTIMIZER_ALIASES = {
    "adamw_bnb_8bit": "adamw_8bit",  # transformers: adamw_8bit is "just an alias for adamw_bnb_8bit"
    "adamw_8bit": "adamw_8bit",
    "paged_adamw": "paged_adamw_32bit",
}


def as_optimizer(c: Collector, key: str, value: Any) -> str:
    name = str(value).strip().lower()
    name = OPTIMIZER_ALIASES.get(name, name)
    if name not in OPTIMIZERS:
        supported = ", ".join(sorted(set(OPTIMIZERS) | set(OPTIMIZER_ALIASES)))
        raise c.error(key, f"optimizer {value!r} is not one vramcalc estimates ({supported}).")
    return name


DTYPE_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "torch.bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "torch.float32": "fp32",
}


def as_dtype(c: Collector, key: str, value: Any, checkpoint_dtype: str | None) -> str:
    """A torch dtype name; ``auto`` is the checkpoint's own dtype (its config's torch_dtype)."""
    name = str(value).strip().lower()
    if name == "auto":
        return checkpoint_dtype or "bf16"
    if name not in DTYPE_ALIASES:
        raise c.error(key, f"dtype {value!r} is not bfloat16, float16, float32 or auto.")
    return DTYPE_ALIASES[name]


ATTN_ALIASES = {
    "sdpa": "sdpa",
    "eager": "eager",
    "flash_attention_2": "flash_attention_2",
    "fa2": "flash_attention_2",
    "flash_attn": "flash_attention_2",
}


def as_attn(c: Collector, key: str, value: Any) -> str:
    name = str(value).strip().lower()
    if name not in ATTN_ALIASES:
        raise c.error(key, f"attention {value!r} is not sdpa, eager or flash_attention_2.")
    return ATTN_ALIASES[name]
