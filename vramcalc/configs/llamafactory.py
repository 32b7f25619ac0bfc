"""LLaMA-Factory YAML (``llamafactory-cli train config.yaml``) → plan fields.

Keys and defaults from hiyouga/LLaMA-Factory ``src/llamafactory/hparams/``:
``finetuning_args.py`` (finetuning_type="lora", lora_rank=8, lora_alpha=None meaning
lora_rank * 2, lora_dropout=0.0, lora_target="all", use_dora=False, additional_target,
pure_bf16=False), ``model_args.py`` (quantization_bit=None, quantization_method="bnb",
quantization_type="nf4", double_quantization=True, flash_attn="auto",
disable_gradient_checkpointing=False, use_reentrant_gc=True), ``data_args.py``
(cutoff_len=2048), and transformers' ``TrainingArguments`` for the rest
(per_device_train_batch_size=8, gradient_accumulation_steps=1, optim adamw_torch_fused,
bf16=False). ``src/llamafactory/model/adapter.py``: trainable parameters are upcast to fp32
unless pure_bf16 (full fine-tuning under bf16 = fp32 master weights).
"""

from __future__ import annotations

from pathlib import Path

from vramcalc.configs.common import (
    FILE,
    OURS,
    TOOL,
    Collector,
    as_bool,
    as_float,
    as_int,
    as_modules,
    as_optimizer,
)
from vramcalc.configs.sharding import deepspeed_sharding, fsdp_sharding

HPARAMS = "LLaMA-Factory src/llamafactory/hparams/"
TRAINING_ARGS = "transformers training_args.py"
FLASH_ATTN = {"auto": "sdpa", "sdpa": "sdpa", "fa2": "flash_attention_2", "disabled": "eager"}


def read(c: Collector, where: Path, checkpoint_dtype: str | None) -> None:
    c.take("model_name_or_path")
    kind = c.take("finetuning_type", "lora")
    bits = c.take("quantization_bit")
    if kind not in ("lora", "full"):
        raise c.error(
            "finetuning_type", f"{kind!r} is not lora or full (the methods vramcalc estimates)."
        )
    if bits is not None and kind != "lora":
        raise c.error(
            "quantization_bit",
            "quantization needs finetuning_type: lora (LLaMA-Factory: 'Quantization is only "
            "compatible with the LoRA or OFT method').",
        )
    qmethod = c.take("quantization_method", "bnb")
    if bits is not None and qmethod != "bnb":
        raise c.error(
            "quantization_method",
            f"{qmethod!r}: only bitsandbytes (bnb) quantization is estimated.",
        )
    origin_kind = FILE if c.has("finetuning_type") else TOOL
    if kind == "full":
        c.set("method", "full", origin_kind, "finetuning_type" if origin_kind == FILE else None)
        c.set("quant", "none", TOOL, note="no quantization_bit")
    elif bits is None:
        c.set(
            "method",
            "lora",
            origin_kind,
            "finetuning_type" if origin_kind == FILE else None,
            HPARAMS + "finetuning_args.py: finetuning_type=lora",
        )
        c.set("quant", "none", TOOL, note="quantization_bit=None")
    elif int(bits) == 8:
        c.set("method", "lora", FILE, "quantization_bit", "8-bit base weights + LoRA")
        c.set("quant", "int8", FILE, "quantization_bit")
    elif int(bits) == 4:
        c.set("method", "qlora", FILE, "quantization_bit")
        c.from_key(
            "quant",
            "quantization_type",
            "nf4",
            TOOL,
            HPARAMS + "model_args.py: quantization_type=nf4",
        )
        c.from_key(
            "double_quant",
            "double_quantization",
            True,
            TOOL,
            HPARAMS + "model_args.py: double_quantization=True",
            lambda v: as_bool(c, "double_quantization", v),
        )
    else:
        raise c.error("quantization_bit", f"{bits!r}: bitsandbytes quantizes to 4 or 8 bits.")
    if kind == "lora":
        _lora(c)
    c.from_key(
        "seq_len",
        "cutoff_len",
        2048,
        TOOL,
        HPARAMS + "data_args.py: cutoff_len=2048",
        lambda v: as_int(c, "cutoff_len", v),
    )
    c.from_key(
        "batch_size",
        "per_device_train_batch_size",
        8,
        TOOL,
        TRAINING_ARGS + ": per_device_train_batch_size=8",
        lambda v: as_int(c, "per_device_train_batch_size", v),
    )
    c.from_key(
        "grad_accum",
        "gradient_accumulation_steps",
        1,
        TOOL,
        TRAINING_ARGS + ": gradient_accumulation_steps=1",
        lambda v: as_int(c, "gradient_accumulation_steps", v),
    )
    disable = as_bool(
        c, "disable_gradient_checkpointing", c.take("disable_gradient_checkpointing", False)
    )
    c.set(
        "gradient_checkpointing",
        not disable,
        FILE if c.has("disable_gradient_checkpointing") else TOOL,
        "disable_gradient_checkpointing" if c.has("disable_gradient_checkpointing") else None,
        HPARAMS + "model_args.py: disable_gradient_checkpointing=False (on)",
    )
    if c.has("use_reentrant_gc"):
        c.take("use_reentrant_gc")
    c.notes.append(
        "LLaMA-Factory checkpoints with use_reentrant_gc=True by default; estimated with use_reentrant=False"
    )
    c.from_key(
        "optimizer",
        "optim",
        "adamw_torch_fused",
        TOOL,
        TRAINING_ARGS + ": optim=adamw_torch_fused (torch >= 2.8)",
        lambda v: as_optimizer(c, "optim", v),
    )
    _precision(c, kind, checkpoint_dtype)
    flash = str(c.take("flash_attn", "auto")).lower()
    if flash not in FLASH_ATTN:
        raise c.error("flash_attn", f"{flash!r} is not auto, sdpa, fa2 or disabled.")
    c.set(
        "attn",
        FLASH_ATTN[flash],
        FILE if c.has("flash_attn") else TOOL,
        "flash_attn" if c.has("flash_attn") else None,
        "flash_attn=auto: transformers' default, sdpa",
    )
    for key in ("packing", "neat_packing"):
        c.ignore(
            key, "packing fills each sequence to cutoff_len; the estimate assumes full sequences"
        )
    micro, accum = c.fields["batch_size"].value, c.fields["grad_accum"].value
    sharding = deepspeed_sharding(c, "deepspeed", where, micro, accum) or fsdp_sharding(
        c, "fsdp", "fsdp_config"
    )
    if sharding is not None:
        c.set("strategy", sharding.strategy, FILE, sharding.key, sharding.note)
        c.set("cpu_offload", sharding.cpu_offload, FILE, sharding.key, sharding.note)
        c.world_size = sharding.world_size


def _lora(c: Collector) -> None:
    c.from_key(
        "rank",
        "lora_rank",
        8,
        TOOL,
        HPARAMS + "finetuning_args.py: lora_rank=8",
        lambda v: as_int(c, "lora_rank", v),
    )
    rank = c.fields["rank"].value
    c.alpha_rule = lambda r: float(2 * r)
    c.from_key(
        "alpha",
        "lora_alpha",
        float(2 * rank),
        TOOL,
        HPARAMS + "finetuning_args.py: lora_alpha = lora_rank * 2",
        lambda v: as_float(c, "lora_alpha", v),
    )
    c.from_key(
        "dropout",
        "lora_dropout",
        0.0,
        TOOL,
        HPARAMS + "finetuning_args.py: lora_dropout=0.0",
        lambda v: as_float(c, "lora_dropout", v),
    )
    c.from_key(
        "targets",
        "lora_target",
        ("all-linear",),
        TOOL,
        HPARAMS + "finetuning_args.py: lora_target=all (every linear layer)",
        lambda v: as_modules(c, "lora_target", v),
    )
    c.from_key(
        "dora",
        "use_dora",
        False,
        TOOL,
        HPARAMS + "finetuning_args.py: use_dora=False",
        lambda v: as_bool(c, "use_dora", v),
    )
    if c.has("additional_target"):
        saved = as_modules(c, "additional_target", c.take("additional_target"))
        c.set("modules_to_save", saved, FILE, "additional_target")


def _precision(c: Collector, kind: str, checkpoint_dtype: str | None) -> None:
    pure = as_bool(c, "pure_bf16", c.take("pure_bf16", False))
    fp16 = as_bool(c, "fp16", c.take("fp16", False))
    bf16 = as_bool(c, "bf16", c.take("bf16", False))
    if pure:
        c.set("dtype", "bf16", FILE, "pure_bf16", "trainable parameters stay in bf16")
    elif kind == "full" and (bf16 or fp16):
        key = "bf16" if bf16 else "fp16"
        c.set(
            "dtype",
            "fp32",
            FILE,
            key,
            "LLaMA-Factory model/adapter.py upcasts trainable parameters to fp32 unless "
            "pure_bf16: fp32 master weights under autocast",
        )
    elif fp16:
        c.set("dtype", "fp16", FILE, "fp16")
    elif bf16:
        c.set("dtype", "bf16", FILE, "bf16")
    else:
        c.set(
            "dtype",
            checkpoint_dtype or "bf16",
            OURS,
            note="bf16/fp16 unset (TrainingArguments bf16=False): no mixed precision, which "
            "vramcalc does not model; estimated under bf16 autocast",
        )
