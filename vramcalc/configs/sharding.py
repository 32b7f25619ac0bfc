"""DeepSpeed and FSDP sections of a config file → ``strategy``, ``cpu_offload``, world size.

DeepSpeed: ``deepspeed`` is a dict or the path of a JSON file, read relative to the config
file (then the working directory); when it does not exist, the ZeRO stage and the offload
are inferred from its name (``zero3``, ``ds_z3_offload_config.json``). Its
``train_batch_size`` fixes the world size when it is a number
(``train_batch_size = micro_batch x grad_accum x world_size``, DeepSpeed's config docs).

FSDP: transformers' ``fsdp`` option (``"full_shard auto_wrap offload"``, a list of those words,
or ``true``) with ``fsdp_config`` (``sharding_strategy`` / ``fsdp_sharding_strategy``
``FULL_SHARD``, ``SHARD_GRAD_OP``, ``HYBRID_SHARD``, ``NO_SHARD``; ``offload_params``;
FSDP2's ``reshard_after_forward: false`` shards like ``SHARD_GRAD_OP``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vramcalc.configs.common import Collector
from vramcalc.textfiles import read_text


@dataclass(frozen=True)
class Sharding:
    strategy: str
    cpu_offload: bool
    world_size: int | None
    key: str  # the file key it came from
    note: str


ZERO_STRATEGY = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}
ZERO_STAGE = {strategy: stage for stage, strategy in ZERO_STRATEGY.items() if stage}
MAX_GRAD_NORM = 1.0  # Trainer's default max_grad_norm: the recipe's gradient clipping


def deepspeed_json(plan: Any, hidden_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON of a ZeRO ``plan`` (a ``TrainingPlan``) with no ``auto`` value left:
    what the harness runs (``vramcalc_harness/distributed.py``) and the trace replays
    (``trace/zerotrace.py``).

    The bucket sizes are the numbers transformers and accelerate put for ``auto`` (from
    ``hidden_size``), written out because ZeRO-3 loading (``zero.Init`` inside
    ``from_pretrained``) reads the config before anything fills ``auto`` values.
    """
    stage = ZERO_STAGE[plan.strategy]
    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,
        "reduce_bucket_size": hidden_size * hidden_size,
    }
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
            stage3_param_persistence_threshold=10 * hidden_size,
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if plan.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": plan.batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.batch_size * plan.grad_accum * plan.num_gpus,
        "gradient_clipping": MAX_GRAD_NORM,
        # explicit, not "auto": ZeRO-3 loading (zero.Init) reads it before Trainer fills autos
        # (DeepSpeed runs on GPUs only: bf16 unless the plan is fp16)
        "bf16": {"enabled": plan.dtype != "fp16"},
        "fp16": {"enabled": plan.dtype == "fp16"},
        "zero_optimization": zero,
        # the recipe's optimizer is Trainer's (torch / bitsandbytes), not DeepSpeed's
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def deepspeed_sharding(
    c: Collector, key: str, where: Path, micro_batch: int | None, grad_accum: int | None
) -> Sharding | None:
    if not c.has(key):
        c.take(key)
        return None
    value = c.take(key)
    if isinstance(value, dict):
        config, origin = value, "inline section"
    else:
        path = Path(str(value)).expanduser()
        candidates = [path] if path.is_absolute() else [where.parent / path, Path.cwd() / path]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            return _deepspeed_from_name(c, key, str(value))
        try:
            config = json.loads(read_text(found))
        except (OSError, ValueError) as err:
            raise c.error(key, f"cannot read the DeepSpeed config {found}: {err}.") from None
        origin = f"read from {found.name}"
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in ZERO_STRATEGY:
        raise c.error(key, f"zero_optimization.stage {stage!r} is not 0, 1, 2 or 3.")
    offload = _offloads(zero)
    world = None
    total = config.get("train_batch_size")
    if (
        isinstance(total, int)
        and micro_batch
        and grad_accum
        and total % (micro_batch * grad_accum) == 0
    ):
        world = total // (micro_batch * grad_accum)
    note = f"DeepSpeed ZeRO stage {stage} ({origin})" + (
        f", offload of {' and '.join(offload)} to CPU" if offload else ""
    )
    if world:
        note += f"; train_batch_size {total} = micro-batch x grad-accum x {world} GPUs"
    return Sharding(ZERO_STRATEGY[stage], bool(offload), world, c.name(key), note)


def _offloads(zero: dict[str, Any]) -> list[str]:
    out = []
    for part, label in (("offload_optimizer", "optimizer states"), ("offload_param", "parameters")):
        device = (zero.get(part) or {}).get("device")
        if device in ("cpu", "nvme"):
            out.append(label)
    return out


def _deepspeed_from_name(c: Collector, key: str, name: str) -> Sharding:
    stem = Path(name).name.lower()
    match = re.search(r"(?:zero|z)[_-]?([0-3])", stem)
    if not match:
        raise c.error(
            key,
            f"the DeepSpeed config {name!r} is not there (relative to the config file) and its "
            "name does not say the ZeRO stage (zero1/zero2/zero3, ds_z3...).",
        )
    stage = int(match.group(1))
    offload = "offload" in stem
    note = f"DeepSpeed ZeRO stage {stage} inferred from the name {name!r} (file not found)" + (
        ", CPU offload (the name says offload)" if offload else ""
    )
    return Sharding(ZERO_STRATEGY[stage], offload, None, c.name(key), note)


FSDP_STRATEGY = {
    "full_shard": "fsdp",
    "hybrid_shard": "fsdp",
    "hybrid_shard_zero2": "fsdp-grad-op",
    "shard_grad_op": "fsdp-grad-op",
    "no_shard": "ddp",
}


def fsdp_sharding(c: Collector, key: str, config_key: str) -> Sharding | None:
    """``fsdp`` (words, list or bool) and ``fsdp_config`` (dict); None when FSDP is off."""
    words: list[str] = []
    if c.has(key):
        value = c.take(key)
        if isinstance(value, bool):
            words = ["full_shard"] if value else []
        elif isinstance(value, str):
            words = value.lower().split()
        elif isinstance(value, list):
            words = [str(v).lower() for v in value]
        else:
            raise c.error(
                key, f"expected FSDP options such as 'full_shard auto_wrap', got {value!r}."
            )
    else:
        c.take(key)
    config: dict[str, Any] = {}
    if c.has(config_key):
        raw = c.take(config_key)
        if not isinstance(raw, dict):
            c.ignored[c.name(config_key)] = (
                "a path to an FSDP JSON config: not read, the fsdp words apply"
            )
        else:
            config = {k.removeprefix("fsdp_"): v for k, v in raw.items()}
    if not words and not config:
        return None
    strategy, note = "fsdp", "FSDP"
    named = str(config.get("sharding_strategy", "")).lower()
    word = next((w for w in words if w in FSDP_STRATEGY), None)
    if named:
        if named not in FSDP_STRATEGY:
            raise c.error(config_key, f"sharding_strategy {named.upper()!r} is not one FSDP knows.")
        strategy, note = FSDP_STRATEGY[named], f"FSDP {named.upper()}"
    elif word:
        strategy, note = FSDP_STRATEGY[word], f"FSDP {word}"
    elif config.get("reshard_after_forward") is False:
        strategy, note = "fsdp-grad-op", "FSDP2 reshard_after_forward=false (as SHARD_GRAD_OP)"
    offload = "offload" in words or bool(config.get("offload_params"))
    if offload:
        note += ", parameters and optimizer states offloaded to CPU"
    source = config_key if config else key
    return Sharding(strategy, offload, None, c.name(source), note)
