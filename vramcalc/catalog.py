"""Catalogs as data: bundled model configs and the GPU table.

Models resolve in this order (``resolve_model``):

1. a bundled catalog entry (``data/models/catalog.yaml``: hub id or alias,
   case-insensitive), whose ``config.json`` is the published one;
2. a local directory holding ``config.json``, or a path to a config file;
3. any other hub id through ``transformers.AutoConfig`` when the hub is
   reachable. Offline, an ``UnknownModelError`` suggests close catalog names
   and the local-path option.

GPUs come from ``data/gpus.csv`` (``load_gpus`` / ``find_gpu``).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vramcalc.errors import (
    CatalogError,
    ConfigError,
    UnknownGpuError,
    UnknownModelError,
)
from vramcalc.textfiles import TextFileError, read_text
from vramcalc.training_plan import suggest

DATA_DIR = Path(
    os.environ.get("VRAMCALC_DATA_DIR", Path(__file__).resolve().parent.parent / "data")
)
MODELS_DIR = DATA_DIR / "models"
GPUS_CSV = DATA_DIR / "gpus.csv"


# -- models --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CatalogModel:
    """One bundled model: hub id, aliases, published config and its known size."""

    name: str
    aliases: tuple[str, ...]
    config_path: Path
    config_source: str
    params: int | None
    params_source: str

    def to_dict(self) -> dict[str, Any]:
        """``vramcalc models --json``: name, aliases and the published parameter count."""
        return {"name": self.name, "aliases": list(self.aliases), "params": self.params}


@dataclass(frozen=True)
class ModelSpec:
    """A resolved ``--model``: its display name, where it came from, its config."""

    name: str
    source: str  # "catalog", "local" or "hub"
    config_dict: dict[str, Any] = field(repr=False)
    catalog_entry: CatalogModel | None = None

    @property
    def config(self) -> Any:
        """A fresh ``transformers.PretrainedConfig`` built from the config dict."""
        return config_from_dict(self.config_dict, where=self.name)


@functools.lru_cache(maxsize=1)
def model_catalog() -> tuple[CatalogModel, ...]:
    """Every entry of ``data/models/catalog.yaml``."""
    index = MODELS_DIR / "catalog.yaml"
    try:
        # libyaml's safe loader where PyYAML has it: the same objects, ten times faster (a warm
        # plan reads the catalog on every run)
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        raw = yaml.load(index.read_text(), Loader=loader) or []  # noqa: S506 (a safe loader)
    except FileNotFoundError as err:
        raise CatalogError(f"model catalog {index} is missing") from err
    entries = []
    for item in raw:
        try:
            entries.append(
                CatalogModel(
                    name=item["name"],
                    aliases=tuple(item.get("aliases") or ()),
                    config_path=MODELS_DIR / item["config"],
                    config_source=str(item.get("config_source", "")),
                    params=int(item["params"]) if item.get("params") is not None else None,
                    params_source=str(item.get("params_source", "")),
                )
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CatalogError(f"bad entry in {index}: {item!r} ({err})") from err
    return tuple(entries)


def _catalog_lookup() -> dict[str, CatalogModel]:
    table: dict[str, CatalogModel] = {}
    for entry in model_catalog():
        for key in (entry.name, *entry.aliases):
            table[key.lower()] = entry
    return table


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_text(path))
    except FileNotFoundError as err:
        raise ConfigError(f"--model: config file {path} does not exist") from err
    except TextFileError as err:
        raise ConfigError(f"--model: {path} is {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--model: {path} is not valid JSON ({err})") from err
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConfigError(f"--model: {path} is not a transformers config (no 'model_type' field)")
    return data


def config_from_dict(data: dict[str, Any], where: str = "config") -> Any:
    """Build the architecture's ``PretrainedConfig`` from a ``config.json`` mapping.

    Every failure is a one-line ``ConfigError`` naming ``where``: an unknown
    ``model_type`` (with close matches), a value transformers' own validation
    rejects (a wrong type, heads that do not divide the hidden size).
    """
    import copy

    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    # a deep copy: transformers edits nested values in place (rope_scaling gains rope_theta),
    # and the mapping as read is what every cache key is computed from
    data = copy.deepcopy(data)
    model_type = data.pop("model_type", None)
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ConfigError(
            f"--model {where}: model_type {model_type!r} is not an architecture this "
            f"transformers ({_transformers_version()}) knows."
            + suggest(str(model_type), sorted(CONFIG_MAPPING_NAMES))
            + " Run 'vramcalc models' for the bundled catalog."
        )
    try:
        return AutoConfig.for_model(model_type, **data)
    except Exception as err:  # noqa: BLE001 - transformers raises ValueError, TypeError, hub errors
        raise ConfigError(f"--model {where}: {one_line(err)}") from err


def one_line(err: BaseException) -> str:
    """An exception as one line: the innermost message of a chained validation error."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return (text or type(err).__name__)[:300]


def _transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


#: config sizes that must be positive integers, each under the names architectures use
SIZE_FIELDS = (
    ("num_hidden_layers", ("num_hidden_layers", "n_layer", "num_layers")),
    ("hidden_size", ("hidden_size", "n_embd", "d_model")),
    ("num_attention_heads", ("num_attention_heads", "n_head")),
    ("vocab_size", ("vocab_size",)),
    ("intermediate_size", ("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner")),
)


def causal_lm_config(data: dict[str, Any], where: str = "config") -> Any:
    """``config_from_dict`` plus what vramcalc needs: a decoder-only causal LM with
    positive sizes. Every problem of the sizes is reported at once."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = config_from_dict(data, where)
    model_type = config.model_type
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(
        config, "is_encoder_decoder", False
    ):
        raise ConfigError(
            f"--model {where}: {model_type!r} is an encoder (masked-LM or encoder-decoder) "
            "architecture, not a causal LM; vramcalc estimates decoder-only causal-LM "
            "fine-tuning (AutoModelForCausalLM). Run 'vramcalc models' for the catalog."
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(
            f"--model {where}: {model_type!r} has no causal-LM class in transformers "
            "(AutoModelForCausalLM); vramcalc estimates causal-LM fine-tuning. "
            "Run 'vramcalc models' for the catalog."
        )
    problems = []
    for label, names in SIZE_FIELDS:
        for name in names:
            value = getattr(config, name, None)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{label} must be a positive integer, got {value!r}")
            break
    if problems:
        raise ConfigError(f"--model {where}: " + "; ".join(problems) + ".")
    return config


def defaulted_sizes(config_dict: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    """The ``SIZE_FIELDS`` a ``config.json`` leaves out that transformers' config class fills
    from its own defaults, each with the default (``(("num_hidden_layers", 32), ...)``).

    A size the class derives from others (falcon's ``ffn_hidden_size``, gpt2's ``n_inner``:
    defaults of None) is not a default; nor is one under another name the class accepts, or
    in a ``text_config``."""
    import inspect

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config_class = CONFIG_MAPPING[config_dict.get("model_type")]
    except KeyError:
        return ()
    parameters = inspect.signature(config_class.__init__).parameters
    text_config = config_dict.get("text_config")
    given = set(config_dict) | (set(text_config) if isinstance(text_config, dict) else set())
    out = []
    for _, names in SIZE_FIELDS:
        if given & set(names):
            continue
        for name in names:
            default = parameters[name].default if name in parameters else None
            if isinstance(default, int) and not isinstance(default, bool):
                out.append((name, default))
                break
    return tuple(out)


def resolve_model(name_or_path: str) -> ModelSpec:
    """Turn ``--model`` into a ``ModelSpec`` (catalog, local path, then hub)."""
    key = name_or_path.strip()
    entry = _catalog_lookup().get(key.lower())
    if entry is not None:
        return ModelSpec(entry.name, "catalog", _read_config_file(entry.config_path), entry)
    path = Path(key).expanduser()
    if path.is_dir():
        return ModelSpec(str(path), "local", _read_config_file(path / "config.json"))
    if path.is_file():
        return ModelSpec(str(path), "local", _read_config_file(path))
    if key.endswith(".json") or key.startswith((".", "/", "~")):
        raise ConfigError(f"--model: config file {path} does not exist")
    return _resolve_from_hub(key)


def resolve(name: str) -> ModelSpec:
    """``--model`` resolved (``resolve_model``); catalog and hub answers are kept for the
    process (local files are read again, so an edited config is seen)."""
    if name in _RESOLVED:
        return _RESOLVED[name]
    spec = resolve_model(name)
    if spec.source != "local":
        _RESOLVED[name] = spec
    return spec


_RESOLVED: dict[str, ModelSpec] = {}


def forget_resolved() -> None:
    """Empty ``resolve``'s memo (tests; benchmarks of cold starts)."""
    _RESOLVED.clear()


#: a hub repository id: ``org/name`` or a legacy top-level name such as ``gpt2``
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine fails in seconds, not after retries."""
    import socket

    endpoint = (
        os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    )
    try:
        with socket.create_connection((endpoint, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _resolve_from_hub(name: str) -> ModelSpec:
    names = [e.name for e in model_catalog()] + [a for e in model_catalog() for a in e.aliases]
    hint = suggest(name, names)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("VRAMCALC_OFFLINE") == "1"
    reason = "the hub is not used offline (HF_HUB_OFFLINE/VRAMCALC_OFFLINE)"
    if not offline and HUB_ID.match(name):
        if not _hub_reachable():
            reason = "the hub cannot be reached from this machine"
        else:
            import logging

            logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
            try:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(name)
                return ModelSpec(name, "hub", config.to_dict())
            except Exception as err:  # noqa: BLE001 - any hub failure means "not resolvable here"
                reason = f"the hub has no config for it ({type(err).__name__})"
    elif not HUB_ID.match(name):
        reason = "it is not a hub id (org/name, or a legacy name such as gpt2)"
    raise UnknownModelError(
        f"--model {name!r} is not in the bundled catalog and {reason}."
        + hint
        + " Run 'vramcalc models' for the catalog, or pass a local directory or config.json path."
    )


# -- GPUs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gpu:
    """One row of ``data/gpus.csv``."""

    name: str
    aliases: tuple[str, ...]
    vendor: str
    memory_bytes: int
    bf16_dense_tflops: float | None
    fp16_dense_tflops: float | None
    memory_bandwidth_gbps: float | None
    price_per_hour_usd: float | None
    price_source: str
    price_date: str
    # bf16 tensor cores: an optional ``bf16`` column (yes/no) says so; without it, a card with
    # an fp16 peak and no bf16 peak has none (Turing T4, Volta V100: "bf16 left empty")
    has_bf16: bool = True
    fp32_tflops: float | None = None  # non-tensor FP32 peak (fp32 matmuls outside autocast)
    # how GPUs of this kind talk to each other in a multi-GPU machine: "nvswitch" (NVLink
    # through NVSwitch), "nvlink" (direct NVLink mesh), "infinity-fabric" (AMD's mesh) or
    # "pcie"; the datasheet's bidirectional GB/s of that fabric and of the PCIe link
    interconnect: str = ""
    link_bidir_gbps: float | None = None
    pcie_bidir_gbps: float | None = None
    interconnect_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """``vramcalc gpus --json``: every field, aliases as a list."""
        return self.__dict__ | {"aliases": list(self.aliases)}


def _float(text: str | None) -> float | None:
    text = (text or "").strip()
    return float(text) if text else None


#: ``interconnect`` values of ``data/gpus.csv`` (``Gpu.interconnect``)
INTERCONNECTS = ("nvswitch", "nvlink", "infinity-fabric", "pcie")


def _interconnect(row: dict[str, str]) -> str:
    value = (row.get("interconnect") or "").strip()
    if value and value not in INTERCONNECTS:
        raise ValueError(f"interconnect must be one of {', '.join(INTERCONNECTS)}, got {value!r}")
    return value


def _has_bf16(row: dict[str, str]) -> bool:
    stated = (row.get("bf16") or "").strip().lower()
    if stated in ("yes", "true", "1", "no", "false", "0"):
        return stated in ("yes", "true", "1")
    if stated:
        raise ValueError(f"bf16 must be yes or no, got {stated!r}")
    return not (
        _float(row.get("bf16_dense_tflops")) is None and _float(row.get("fp16_dense_tflops"))
    )


@functools.lru_cache(maxsize=1)
def load_gpus() -> tuple[Gpu, ...]:
    """Every GPU of ``data/gpus.csv``, in file order (columns beyond the known ones are ignored)."""
    try:
        with GPUS_CSV.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError as err:
        raise CatalogError(f"GPU catalog {GPUS_CSV} is missing") from err
    gpus = []
    for row in rows:
        try:
            gpus.append(
                Gpu(
                    name=row["name"].strip(),
                    aliases=tuple(
                        a.strip() for a in (row.get("aliases") or "").split(";") if a.strip()
                    ),
                    vendor=(row.get("vendor") or "").strip(),
                    memory_bytes=int(row["memory_bytes"]),
                    bf16_dense_tflops=_float(row.get("bf16_dense_tflops")),
                    fp16_dense_tflops=_float(row.get("fp16_dense_tflops")),
                    memory_bandwidth_gbps=_float(row.get("memory_bandwidth_gbps")),
                    price_per_hour_usd=_float(row.get("price_per_hour_usd")),
                    price_source=(row.get("price_source") or "").strip(),
                    price_date=(row.get("price_date") or "").strip(),
                    has_bf16=_has_bf16(row),
                    fp32_tflops=_float(row.get("fp32_tflops")),
                    interconnect=_interconnect(row),
                    link_bidir_gbps=_float(row.get("link_bidir_gbps")),
                    pcie_bidir_gbps=_float(row.get("pcie_bidir_gbps")),
                    interconnect_source=(row.get("interconnect_source") or "").strip(),
                )
            )
        except (KeyError, ValueError) as err:
            raise CatalogError(f"bad row in {GPUS_CSV}: {row!r} ({err})") from err
    return tuple(gpus)


def find_gpu(name: str) -> Gpu:
    """The GPU called ``name`` (name or alias, case-insensitive), or ``UnknownGpuError``."""
    table: dict[str, Gpu] = {}
    for gpu in load_gpus():
        for key in (gpu.name, *gpu.aliases):
            table[key.lower()] = gpu
    key = name.strip().lower()
    if key in table:
        return table[key]
    normalized = {k.replace("-", "").replace(" ", "").replace("_", ""): g for k, g in table.items()}
    squashed = key.replace("-", "").replace(" ", "").replace("_", "")
    if squashed in normalized:
        return normalized[squashed]
    # "a100" names a family: every card whose name or alias starts with it
    family = sorted(
        {g.name for k, g in normalized.items() if squashed and k.startswith(squashed)},
        key=lambda n: [g.name for g in load_gpus()].index(n),
    )
    hint = (
        " Did you mean " + ", ".join(repr(n) for n in family) + "?"
        if family
        else suggest(name, [g.name for g in load_gpus()])
    )
    raise UnknownGpuError(
        f"--gpu {name!r} is not in the GPU catalog." + hint + " Run 'vramcalc gpus' for the list."
    )


def config_int(config: Any, *names: str, default: int = 0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def config_float(config: Any, name: str) -> float | None:
    value = getattr(config, name, None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


#: config keys that state the longest sequence, in the order they are looked up
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def config_facts(config: Any) -> dict[str, Any]:
    """The non-shape facts of a built ``PretrainedConfig`` that the memory rules read."""
    act = next(
        (
            str(getattr(config, name))
            for name in ("hidden_activation", "hidden_act", "activation_function")
            if getattr(config, name, None)
        ),
        "",
    )
    context = None
    for source in (config, getattr(config, "text_config", None)):
        for key in CONTEXT_KEYS:
            value = getattr(source, key, None) if source is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                context = value
                break
        if context:
            break
    return {
        "hidden_act": act,
        "dropout": config_float(config, "dropout") or 0.0,
        "attention_dropout": config_float(config, "attention_dropout") or 0.0,
        "attn_logit_softcapping": config_float(config, "attn_logit_softcapping"),
        "final_logit_softcapping": config_float(config, "final_logit_softcapping"),
        "context_length": context,
    }
