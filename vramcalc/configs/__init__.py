"""``--from FILE``: a training config of axolotl, LLaMA-Factory, TRL or the HF Trainer as a plan.

``read_plan_file(path, flags)`` detects the format, maps its keys onto ``TrainingPlan``
fields (one reader per tool: ``axolotl.py``, ``llamafactory.py``, ``trainer.py`` for TRL
and Trainer), fills what the file leaves out with the *tool's* default (where it differs
from ours, the tool's wins), applies the flags the user gave on top, and returns a
``FilePlan``: the validated plan, where every field came from, and every key of the file,
used or ignored with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vramcalc.catalog import resolve
from vramcalc.configs import axolotl, llamafactory, trainer
from vramcalc.configs.common import FLAG, OURS, Collector, FieldSource
from vramcalc.errors import ConfigFileError, InvalidPlanError, UnknownModelError
from vramcalc.textfiles import TextFileError, read_text
from vramcalc.training_plan import TrainingPlan, plan_from_values, plan_value

FORMATS = ("axolotl", "llama-factory", "trl", "trainer")
LLAMA_FACTORY_KEYS = (
    "finetuning_type",
    "lora_rank",
    "lora_target",
    "quantization_bit",
    "cutoff_len",
    "template",
    "stage",
    "flash_attn",
    "disable_gradient_checkpointing",
    "pure_bf16",
    "additional_target",
)
TRAINER_KEYS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "optim",
    "gradient_checkpointing",
    "output_dir",
    *trainer.SECTIONS,
)


@dataclass(frozen=True)
class FilePlan:
    """A plan read from a config file, with the provenance of every field and key."""

    path: str
    format: str
    plan: TrainingPlan
    sources: dict[str, FieldSource]  # plan field -> where its value comes from
    used_keys: tuple[str, ...]
    ignored_keys: dict[str, str]  # key -> why it does not enter the plan
    notes: tuple[str, ...]

    def checkpointing_note(self, plan: TrainingPlan) -> str | None:
        """The assumption line for gradient checkpointing when the file or its tool decided
        it (None when vramcalc's default or a flag did: the plan's own note says so)."""
        source = self.sources.get("gradient_checkpointing")
        if source is None or source.origin not in ("file", "tool default"):
            return None
        state = "on (use_reentrant=False)" if plan.gradient_checkpointing else "off"
        where = (
            f"{self.path}: {source.key}" if source.origin == "file" else f"{self.format}'s default"
        )
        flag = (
            "--no-gradient-checkpointing"
            if plan.gradient_checkpointing
            else "--gradient-checkpointing"
        )
        return f"gradient checkpointing {state}, as {where} sets it; {flag} overrides the file"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "fields": [self.sources[name].to_dict(name) for name in self.sources],
            "used_keys": list(self.used_keys),
            "ignored_keys": [{"key": k, "reason": r} for k, r in self.ignored_keys.items()],
            "notes": list(self.notes),
        }


def load_file(path: Path) -> dict[str, Any]:
    """The file as a mapping (YAML, or JSON which YAML reads too)."""
    import yaml

    try:
        text = read_text(path)
    except OSError as err:
        raise ConfigFileError(f"--from {str(path)!r}: cannot read it ({err.strerror}).") from None
    except TextFileError as err:
        raise ConfigFileError(f"--from {str(path)!r}: {err}.") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0]
        raise ConfigFileError(f"--from {str(path)!r}: not valid YAML or JSON ({first}).") from None
    if not isinstance(data, dict):
        raise ConfigFileError(
            f"--from {str(path)!r}: expected a mapping of keys, got {type(data).__name__}."
        )
    return data


def detect_format(data: dict[str, Any], path: str = "FILE") -> str:
    """axolotl (``base_model``), LLaMA-Factory (``model_name_or_path`` + its own keys), TRL
    (``max_length``, ``use_peft`` ...), or Trainer (``TrainingArguments`` keys or sections)."""
    if "base_model" in data:
        return "axolotl"
    if any(k in data for k in LLAMA_FACTORY_KEYS) and "model_name_or_path" in data:
        return "llama-factory"
    trl_only = [k for k in trainer.TRL_KEYS if k != "max_length"]
    sections = any(
        isinstance(data.get(s), dict)
        for s in trainer.SECTIONS
        if s not in ("sft_config", "SFTConfig")
    )
    if any(k in data for k in trl_only) or _nested_has(data, trainer.TRL_KEYS):
        return "trl"
    if "max_length" in data and not sections:
        return "trl"
    if sections or any(k in data for k in TRAINER_KEYS):
        return "trainer"
    raise ConfigFileError(
        f"--from {path!r}: unknown format; expected an axolotl config (base_model), a "
        "LLaMA-Factory config (model_name_or_path with finetuning_type, cutoff_len ...), a TRL "
        "config (max_length, use_peft ...) or a Trainer config (training_args, "
        "per_device_train_batch_size ...)."
    )


def _nested_has(data: dict[str, Any], keys: tuple[str, ...]) -> bool:
    return any(
        isinstance(data.get(s), dict) and any(k in data[s] for k in keys)
        for s in trainer.TRAINING_SECTIONS
    )


MODEL_KEYS = {"axolotl": ("base_model",), "llama-factory": ("model_name_or_path",)}


def read_plan_file(path: str | Path, flags: dict[str, Any] | None = None) -> FilePlan:
    """The plan ``path`` describes, with ``flags`` (plan field → value the user gave on the
    command line) taking precedence over the file."""
    path = Path(path)
    flags = {name: plan_value(name, value) for name, value in (flags or {}).items()}
    data = load_file(path)
    fmt = detect_format(data, str(path))
    c = Collector(fmt, data)
    model_key = next(
        (
            k
            for k in MODEL_KEYS.get(fmt, ("model_name_or_path", "model"))
            if isinstance(data.get(k), str)
        ),
        None,
    )
    if "model" in flags:
        model, model_source = flags["model"], FieldSource(flags["model"], FLAG, "--model")
    elif model_key is None:
        wanted = " or ".join(MODEL_KEYS.get(fmt, ("model_name_or_path", "model")))
        raise ConfigFileError(
            f"{fmt} config {str(path)!r} names no model: add {wanted}, or pass --model."
        )
    else:
        model = data[model_key]
        model_source = FieldSource(model, "file", model_key)
    try:
        spec = resolve(model)
    except UnknownModelError as err:
        where = f"key {model_key!r}" if "model" not in flags else "--model"
        raise ConfigFileError(f"{fmt} {where}: {err}") from None
    checkpoint = spec.config_dict.get("torch_dtype") or spec.config_dict.get("dtype")
    checkpoint_dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(
        str(checkpoint)
    )
    if fmt == "axolotl":
        axolotl.read(c, path, checkpoint_dtype)
    elif fmt == "llama-factory":
        llamafactory.read(c, path, checkpoint_dtype)
    else:
        trainer.read(c, path, checkpoint_dtype, trl=fmt == "trl")
    c.finish()
    sources = {"model": model_source, **{k: v for k, v in c.fields.items() if k != "model"}}
    _apply_flags(c, sources, flags)
    defaults = TrainingPlan(model="x")
    for f in fields(TrainingPlan):
        if f.name not in sources:
            sources[f.name] = FieldSource(
                getattr(defaults, f.name), OURS, note="vramcalc's default recipe"
            )
    if sources["strategy"].value != "ddp" and sources["num_gpus"].origin != FLAG:
        if c.world_size:
            sources["num_gpus"] = FieldSource(
                c.world_size, "file", sources["strategy"].key, sources["strategy"].note
            )
        else:
            raise ConfigFileError(
                f"{fmt} key {sources['strategy'].key!r}: shards over several GPUs ({sources['strategy'].value}) "
                "but the file does not say how many; pass --num-gpus N."
            )
    kwargs = {name: source.value for name, source in sources.items()}
    try:
        plan = plan_from_values(kwargs)
    except InvalidPlanError as err:
        raise InvalidPlanError([f"from {path.name}: {p}" for p in err.problems]) from None
    sources = {f.name: sources[f.name] for f in fields(TrainingPlan)}
    for name in ("quant", "alpha", "gradient_checkpointing"):  # resolved by the plan itself
        if sources[name].value is None:
            sources[name] = FieldSource(
                getattr(plan, name), sources[name].origin, sources[name].key, sources[name].note
            )
    return FilePlan(str(path), fmt, plan, sources, tuple(c.used), dict(c.ignored), tuple(c.notes))


def _apply_flags(c: Collector, sources: dict[str, FieldSource], flags: dict[str, Any]) -> None:
    for name, value in flags.items():
        sources[name] = FieldSource(
            value, FLAG, "--" + name.replace("_", "-"), "given on the command line"
        )
    if "method" in flags and "quant" not in flags:
        sources["quant"] = FieldSource(None, FLAG, "--method", "follows --method")
        if flags["method"] == "full":
            for name in ("rank", "alpha", "dropout", "targets", "dora", "modules_to_save"):
                sources.pop(name, None)
    if (
        "rank" in flags
        and "alpha" not in flags
        and sources.get("alpha", FieldSource(0, FLAG)).origin != "file"
    ):
        alpha = c.alpha_rule(flags["rank"]) if c.alpha_rule else None
        sources["alpha"] = FieldSource(
            alpha,
            sources.get("alpha", FieldSource(None, OURS)).origin,
            None,
            "the tool's alpha for the --rank given",
        )
