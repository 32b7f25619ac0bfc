"""Build the real model a case trains: random weights, real loading path, real adapters.

1. ``prepare_checkpoint``: the model's catalog config (``vramcalc.catalog``)
   -> ``AutoModelForCausalLM.from_config`` with random init (fixed seed) ->
   ``save_pretrained`` once into ``SCRATCH/checkpoints/<model>-<confighash>/<dtype>/``.
   Reused when present; other checkpoints are evicted (least recently used
   first) when the disk is short. The launcher runs this in its own process
   so that initializing the weights never shows in a case's memory figures.
   With ``sparse_when_short`` (``vramcalc measure --sparse-checkpoints``) a model
   whose checkpoint cannot fit the scratch disk even after eviction (a 70B model
   is ~140 GB in bf16) gets a *sparse all-zero* checkpoint instead
   (``write_sparse_checkpoint``): the same safetensors files, names, shapes and
   dtypes that ``save_pretrained`` writes, but every tensor's bytes are a hole
   in the file, which reads back as zeros and takes no disk. Loading it is the
   normal ``from_pretrained`` path (the same reads, the same quantization, the
   same bytes on the GPU); only the weight values differ (zeros, not random),
   and records say so (``checkpoint_weights``: ``zeros``, else ``random``).
2. ``build_model``: ``from_pretrained`` with the plan's dtype, attention kernel
   and, for int8/nf4/fp4, a ``BitsAndBytesConfig``; k-bit models go through
   ``prepare_model_for_kbit_training``; LoRA plans get peft adapters; full
   fine-tuning trains every parameter.

Multi-GPU plans whose weights are sharded (``fsdp``, ``fsdp-grad-op``,
``zero3``) load as those wrappers need: 16-bit weights without a
``device_map`` (FSDP: rank 0 on the CPU, the others on meta, then
``sync_module_states``; ZeRO-3: partitioned by ``zero.Init``), 4-bit weights
stored as the plan's dtype (``bnb_4bit_quant_storage``) so they can be
flattened and sharded with the other parameters, which keep that dtype too
(no ``prepare_model_for_kbit_training`` upcast to fp32, as in peft's FSDP/
DeepSpeed QLoRA recipes).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vramcalc.adapters import adapter_config, default_target_modules
from vramcalc.catalog import resolve_model
from vramcalc.serve_plan import ServePlan
from vramcalc.training_plan import ALL_LINEAR, TrainingPlan
from vramcalc_harness.distributed import require_strategy_dependencies, shards_weights
from vramcalc_harness.errors import HarnessError, MissingDependencyError

INIT_SEED = 0
MARKER = "harness-checkpoint.json"
DISK_MARGIN_BYTES = 2 << 30
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")
BNB_INSTALL_HINT = (
    "install it on the GPU machine (pip install bitsandbytes, or from a local wheel: "
    "python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl "
    "&& export PYTHONPATH=/tmp/site)"
)


def torch_dtype(name: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def require_dependencies(plan: TrainingPlan) -> None:
    """Raise ``MissingDependencyError`` when the plan needs bitsandbytes (or deepspeed) and it is missing."""
    require_strategy_dependencies(plan)
    needs = []
    if plan.is_kbit:
        needs.append(f"--quant {plan.quant}")
    if plan.optimizer in BNB_OPTIMIZERS:
        needs.append(f"--optimizer {plan.optimizer}")
    if needs and not has_bitsandbytes():
        raise MissingDependencyError(
            f"{' and '.join(needs)} {'needs' if len(needs) == 1 else 'need'} bitsandbytes, which is not installed; {BNB_INSTALL_HINT}."
        )


# -- the random-init checkpoint ------------------------------------------------------------------
def checkpoint_dir(plan: TrainingPlan | ServePlan, scratch_dir: str | Path) -> Path:
    """Where the random-init checkpoint of the plan's model and dtype lives."""
    spec = resolve_model(plan.model)
    digest = hashlib.sha256(
        json.dumps(spec.config_dict, sort_keys=True, default=str).encode()
    ).hexdigest()[:8]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", spec.name).strip("-.")[-80:] or "model"
    return Path(scratch_dir) / "checkpoints" / f"{slug}-{digest}" / plan.dtype


def checkpoint_ready(path: Path) -> bool:
    return (path / MARKER).is_file()


def touch_checkpoint(path: Path) -> None:
    """Mark a checkpoint as just used (eviction removes the least recently used)."""
    marker = path / MARKER
    if marker.is_file():
        os.utime(marker)


def checkpoint_weights(path: str | Path) -> str:
    """What the checkpoint's weights are: ``random`` (random init) or ``zeros`` (sparse)."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return "random"
    return str(marker.get("weights", "random"))


def prepare_checkpoint(
    plan: TrainingPlan | ServePlan,
    scratch_dir: str | Path,
    device: str,
    sparse_when_short: bool = False,
) -> Path:
    """Create (or reuse) the random-init checkpoint; returns its directory.

    Weights are initialized on ``device`` (fast on a GPU); an OOM there falls
    back to the CPU. With ``sparse_when_short``, a checkpoint that cannot fit
    the disk even after evicting every other one is written sparse, all zeros
    (``write_sparse_checkpoint``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    target = checkpoint_dir(plan, scratch_dir)
    if checkpoint_ready(target):
        touch_checkpoint(target)
        return target
    config = resolve_model(plan.model).config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # a pre-quantized hub config: we quantize ourselves
    dtype = torch_dtype(plan.dtype)
    if sparse_when_short:
        checkpoints = Path(scratch_dir) / "checkpoints"
        need = _meta_state_bytes(config, dtype)
        if disk_bytes_available(checkpoints, keep=target) < need + DISK_MARGIN_BYTES:
            return write_sparse_checkpoint(plan, config, dtype, target)
    torch.manual_seed(INIT_SEED)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except torch.OutOfMemoryError:
        if not device.startswith("cuda"):
            raise
        torch.cuda.empty_cache()
        torch.manual_seed(INIT_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    size_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    make_room(Path(scratch_dir) / "checkpoints", size_bytes, keep=target)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    (partial / MARKER).write_text(
        json.dumps(
            {"model": plan.model, "dtype": plan.dtype, "bytes": size_bytes, "seed": INIT_SEED}
        )
    )
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def _evictable(checkpoints: Path, keep: Path) -> list[Path]:
    return [m.parent for m in checkpoints.glob(f"*/*/{MARKER}") if m.parent != keep]


def disk_bytes_available(checkpoints: Path, keep: Path) -> int:
    """Free bytes under ``checkpoints`` once every other checkpoint is evicted."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    held = sum(
        f.stat().st_blocks * 512 for d in _evictable(checkpoints, keep) for f in d.rglob("*")
    )
    return shutil.disk_usage(checkpoints).free + held


# -- the sparse all-zero checkpoint (models too large for the scratch disk) ---------------------
SAFETENSORS_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
SPARSE_SHARD_BYTES = 10 << 30


def _meta_model(config: Any, dtype: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def saved_tensors(model: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor ``save_pretrained`` writes: parameters (a tied one once)
    and persistent buffers."""
    out = [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # tied: once
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                out.append((f"{prefix}.{name}" if prefix else name, tuple(buf.shape)))
    return out


def _meta_state_bytes(config: Any, dtype: Any) -> int:
    model = _meta_model(config, dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def write_sparse_checkpoint(
    plan: TrainingPlan | ServePlan, config: Any, dtype: Any, target: Path
) -> Path:
    """Write ``target`` as ``save_pretrained`` would, with every tensor's bytes a file hole.

    safetensors shards of at most ``SPARSE_SHARD_BYTES`` plus their index, ``config.json``
    and ``generation_config.json``; each shard is its header followed by ``truncate`` to the
    full length, so the data reads back as zeros and uses no disk blocks.
    """
    import math

    model = _meta_model(config, dtype)
    width = {"bf16": 2, "fp16": 2, "fp32": 4}[plan.dtype]
    tensors = saved_tensors(model)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in tensors:
        size = math.prod(shape) * width
        if shards[-1] and used + size > SPARSE_SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += size
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    for index, shard in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in shard:
            size = math.prod(shape) * width
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[plan.dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
            weight_map[name] = file
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with (partial / file).open("wb") as handle:
            handle.write(len(raw).to_bytes(8, "little") + raw)
            handle.truncate(8 + len(raw) + offset)  # the data: one hole, zeros when read
        total += offset
    (partial / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    model.config.save_pretrained(partial)
    if model.can_generate():
        model.generation_config.save_pretrained(partial)
    (partial / MARKER).write_text(
        json.dumps(
            {
                "model": plan.model,
                "dtype": plan.dtype,
                "bytes": total,
                "seed": None,
                "weights": "zeros",
            }
        )
    )
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def make_room(checkpoints: Path, need_bytes: int, keep: Path) -> list[Path]:
    """Delete least recently used checkpoints until ``need_bytes`` (+2 GiB) fit on disk."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    removed = []
    candidates = sorted(
        _evictable(checkpoints, keep),
        key=lambda p: (p / MARKER).stat().st_mtime,
    )
    while shutil.disk_usage(checkpoints).free < need_bytes + DISK_MARGIN_BYTES and candidates:
        victim = candidates.pop(0)
        shutil.rmtree(victim, ignore_errors=True)
        removed.append(victim)
    if shutil.disk_usage(checkpoints).free < need_bytes:
        raise HarnessError(
            f"not enough disk under {checkpoints} for a {need_bytes / 2**30:.1f} GiB checkpoint; "
            "use --scratch on a larger disk."
        )
    return removed


# -- loading -------------------------------------------------------------------------------------
@dataclass
class BuiltModel:
    """The model ready to train, and its parameter counts as peft reports them."""

    model: Any
    trainable_params: int
    total_params: int
    lora_targets_used: tuple[str, ...] | None


def quantization_config(plan: TrainingPlan) -> Any:
    """The ``BitsAndBytesConfig`` for int8/nf4/fp4 plans, else None."""
    if not plan.is_kbit:
        return None
    # FSDP / ZeRO-3 flatten 4-bit storage with the 16-bit params
    return bnb_config(plan.quant, plan.dtype, plan.double_quant, storage=shards_weights(plan))


def bnb_config(quant: str, dtype: str, double_quant: bool, storage: bool = False) -> Any:
    """``BitsAndBytesConfig`` for quant int8/nf4/fp4; 4-bit weights stored as ``dtype``
    with ``storage`` (else uint8). Training and serving cases load through it."""
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    kwargs: dict[str, Any] = {}
    if storage:
        kwargs["bnb_4bit_quant_storage"] = torch_dtype(dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_compute_dtype=torch_dtype(dtype),
        bnb_4bit_use_double_quant=double_quant,
        **kwargs,
    )


def lora_target_modules(plan: TrainingPlan, model_type: str) -> list[str] | str:
    """peft ``target_modules``: the plan's names, "all-linear", or peft's default (LoRA's
    table, or AdaLoRA's for ``method: adalora``).

    Like the estimator (``vramcalc.inventory``), an architecture without a peft
    default gets all-linear instead of an error.
    """

    if plan.targets is None:
        return default_target_modules(model_type, plan.method)
    if plan.targets == (ALL_LINEAR,):
        return ALL_LINEAR
    return list(plan.targets)


def build_model(plan: TrainingPlan, checkpoint: str | Path, device: str) -> BuiltModel:
    """Load the checkpoint as the plan says and make it trainable (adapters or full)."""
    require_dependencies(plan)
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(plan.dtype), "attn_implementation": plan.attn}
    if plan.is_kbit:
        kwargs["quantization_config"] = quantization_config(plan)
    # FSDP loads 16-bit weights on the CPU (cpu_ram_efficient_loading), 4-bit ones on this
    # GPU; ZeRO-3 loads everything under zero.Init, which refuses a device_map (peft's
    # DeepSpeed ZeRO-3 QLoRA recipe passes none)
    zero3 = shards_weights(plan) and plan.strategy == "zero3"
    if device.startswith("cuda") and not (shards_weights(plan) and not plan.is_kbit) and not zero3:
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), **kwargs)
    model.config.use_cache = False
    if plan.is_kbit and not shards_weights(plan):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=plan.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    targets_used = None
    if plan.uses_adapters:
        from peft import get_peft_model
        from peft.tuners.lora import LoraLayer  # AdaLoRA's SVD layers are LoraLayers too

        # LoraConfig, or AdaLoraConfig for method adalora (the step then calls
        # update_and_allocate, vramcalc_harness.step.rank_allocation)
        lora = adapter_config(plan, lora_target_modules(plan, model.config.model_type))
        model = get_peft_model(model, lora)
        targets_used = tuple(
            sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
            )
        )
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    trainable, total = count_parameters(model)
    return BuiltModel(model, trainable, total, targets_used)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) exactly as peft's ``get_nb_trainable_parameters`` counts.

    bitsandbytes packs two 4-bit values per byte, so a ``Params4bit`` counts
    ``numel * 2 * element_size``; shared (tied) parameters count once.
    """
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":
            size = param.element_size() if hasattr(param, "element_size") else 1
            count = count * 2 * size
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
