"""axolotl YAML (``axolotl train config.yml``) → plan fields.

Keys and defaults from axolotl-ai-cloud/axolotl ``src/axolotl/utils/schemas/``:
``peft.py`` (adapter, load_in_4bit/8bit, lora_r, lora_alpha, lora_dropout=0.0,
lora_target_modules, lora_target_linear, lora_modules_to_save, peft_use_dora; qlora requires
load_in_4bit, k-bit without an adapter is refused), ``config.py`` (sequence_len=512,
gradient_checkpointing=False, bf16="auto", flash_attention / sdp_attention / eager_attention /
attn_implementation, sample_packing, deepspeed, fsdp, fsdp_config, world_size),
``training.py`` (micro_batch_size=1, gradient_accumulation_steps=1,
optimizer="adamw_torch_fused"), ``src/axolotl/loaders/model.py`` (4-bit: nf4 with
bnb_4bit_use_double_quant=True) and ``src/axolotl/utils/config/__init__.py``
(gradient_accumulation_steps = batch_size // micro_batch_size when only batch_size is given).
"""

from __future__ import annotations

from pathlib import Path

from vramcalc.configs.common import (
    FILE,
    OURS,
    TOOL,
    Collector,
    as_attn,
    as_bool,
    as_float,
    as_int,
    as_modules,
    as_optimizer,
)
from vramcalc.configs.sharding import deepspeed_sharding, fsdp_sharding

SCHEMAS = "axolotl src/axolotl/utils/schemas/"


def read(c: Collector, where: Path, checkpoint_dtype: str | None) -> None:
    c.take("base_model")
    adapter = c.take("adapter")
    four = as_bool(c, "load_in_4bit", c.take("load_in_4bit", False))
    eight = as_bool(c, "load_in_8bit", c.take("load_in_8bit", False))
    if four and eight:
        raise c.error("load_in_4bit", "load_in_4bit and load_in_8bit are both true; choose one.")
    if adapter is None:
        if four or eight:
            key = "load_in_4bit" if four else "load_in_8bit"
            raise c.error(
                key,
                "k-bit base weights need an adapter (axolotl refuses them without one); set "
                "adapter: qlora (4-bit) or adapter: lora (8-bit), or drop the key for full fine-tuning.",
            )
        c.set("method", "full", TOOL, note="no adapter: axolotl trains every parameter")
        c.set("quant", "none", TOOL, note="no load_in_4bit/load_in_8bit")
    elif adapter == "qlora":
        if not four:
            raise c.error(
                "adapter",
                "adapter: qlora needs load_in_4bit: true (axolotl: 'Require cfg.load_in_4bit "
                "to be True for qlora').",
            )
        c.set("method", "qlora", FILE, "adapter")
        kwargs = c.take("bnb_config_kwargs", {}) or {}
        quant = str(kwargs.get("bnb_4bit_quant_type", "nf4"))
        c.set(
            "quant",
            quant,
            FILE if "bnb_4bit_quant_type" in kwargs else TOOL,
            "load_in_4bit",
            "" if "bnb_4bit_quant_type" in kwargs else "axolotl loaders/model.py: nf4",
        )
        double = kwargs.get("bnb_4bit_use_double_quant", True)
        c.set(
            "double_quant",
            bool(double),
            TOOL if "bnb_4bit_use_double_quant" not in kwargs else FILE,
            "bnb_config_kwargs" if "bnb_4bit_use_double_quant" in kwargs else None,
            "axolotl loaders/model.py: bnb_4bit_use_double_quant=True",
        )
    elif adapter == "lora":
        if four:
            raise c.error(
                "load_in_4bit",
                "load_in_4bit: true with adapter: lora is contradictory: 4-bit LoRA is "
                "adapter: qlora in axolotl; set adapter: qlora, or load_in_4bit: false.",
            )
        c.set("method", "lora", FILE, "adapter")
        c.set(
            "quant",
            "int8" if eight else "none",
            FILE if eight else TOOL,
            "load_in_8bit" if eight else None,
            "" if eight else "load_in_8bit=False (peft.py)",
        )
    else:
        raise c.error(
            "adapter",
            f"adapter {adapter!r} is not lora or qlora (the adapters vramcalc estimates).",
        )
    if adapter is not None:
        _lora(c)
    c.from_key(
        "seq_len",
        "sequence_len",
        512,
        TOOL,
        SCHEMAS + "config.py: sequence_len=512",
        lambda v: as_int(c, "sequence_len", v),
    )
    c.from_key(
        "batch_size",
        "micro_batch_size",
        1,
        TOOL,
        SCHEMAS + "training.py: micro_batch_size=1",
        lambda v: as_int(c, "micro_batch_size", v),
    )
    if not c.has("gradient_accumulation_steps") and c.has("batch_size"):
        total = as_int(c, "batch_size", c.take("batch_size"))
        accum = max(1, total // c.fields["batch_size"].value)
        c.set(
            "grad_accum",
            accum,
            FILE,
            "batch_size",
            "axolotl: gradient_accumulation_steps = batch_size // micro_batch_size",
        )
    else:
        c.from_key(
            "grad_accum",
            "gradient_accumulation_steps",
            1,
            TOOL,
            SCHEMAS + "training.py: gradient_accumulation_steps=1",
            lambda v: as_int(c, "gradient_accumulation_steps", v),
        )
        c.ignore("batch_size", "gradient_accumulation_steps is given, which axolotl uses instead")
    checkpointing = c.take("gradient_checkpointing")
    if checkpointing is None:
        c.set(
            "gradient_checkpointing",
            False,
            TOOL,
            note=SCHEMAS + "config.py: gradient_checkpointing=False",
        )
    elif checkpointing in ("offload", "offload_disk"):
        c.set(
            "gradient_checkpointing",
            True,
            FILE,
            "gradient_checkpointing",
            f"{checkpointing}: checkpoints offloaded, estimated as kept on the GPU (an upper bound)",
        )
    else:
        c.set(
            "gradient_checkpointing",
            as_bool(c, "gradient_checkpointing", checkpointing),
            FILE,
            "gradient_checkpointing",
        )
    if c.has("gradient_checkpointing_kwargs"):
        c.take("gradient_checkpointing_kwargs")
        c.notes.append("gradient_checkpointing_kwargs: estimated with use_reentrant=False")
    c.from_key(
        "optimizer",
        "optimizer",
        "adamw_torch_fused",
        TOOL,
        SCHEMAS + "training.py: optimizer=adamw_torch_fused",
        lambda v: as_optimizer(c, "optimizer", v),
    )
    _precision(c, checkpoint_dtype)
    _attention(c)
    c.ignore(
        "sample_packing",
        "packing fills each sequence to sequence_len; the estimate assumes full sequences",
    )
    c.ignore("pad_to_sequence_len", "the estimate assumes sequences of sequence_len tokens")
    for key in ("model_type", "tokenizer_type", "base_model_config"):
        c.ignore(key, "architecture class or tokenizer: the model's config.json decides the shapes")
    _sharding(c, where)


def _lora(c: Collector) -> None:
    c.from_key(
        "rank",
        "lora_r",
        8,
        OURS,
        "unset in the file: PEFT LoraConfig's r=8",
        lambda v: as_int(c, "lora_r", v),
    )
    c.from_key(
        "alpha",
        "lora_alpha",
        None,
        OURS,
        "unset: alpha = r (PEFT scaling 1)",
        lambda v: as_float(c, "lora_alpha", v),
    )
    c.from_key(
        "dropout",
        "lora_dropout",
        0.0,
        TOOL,
        SCHEMAS + "peft.py: lora_dropout=0.0",
        lambda v: as_float(c, "lora_dropout", v),
    )
    linear = as_bool(c, "lora_target_linear", c.take("lora_target_linear", False))
    if linear:
        c.set("targets", ("all-linear",), FILE, "lora_target_linear")
        c.ignore(
            "lora_target_modules", "lora_target_linear: true already targets every linear layer"
        )
    elif c.has("lora_target_modules"):
        modules = as_modules(c, "lora_target_modules", c.take("lora_target_modules"))
        c.set("targets", modules, FILE, "lora_target_modules")
    else:
        c.set(
            "targets",
            None,
            OURS,
            note="no lora_target_modules: PEFT's default for the architecture",
        )
    if c.has("lora_modules_to_save"):
        saved = as_modules(c, "lora_modules_to_save", c.take("lora_modules_to_save"))
        c.set("modules_to_save", saved, FILE, "lora_modules_to_save")
    c.from_key(
        "dora",
        "peft_use_dora",
        False,
        TOOL,
        SCHEMAS + "peft.py: peft_use_dora=None (off)",
        lambda v: as_bool(c, "peft_use_dora", v),
    )


def _precision(c: Collector, checkpoint_dtype: str | None) -> None:
    for key, dtype in (("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16")):
        if c.has(key) and as_bool(c, key, c.take(key)):
            c.set("dtype", dtype, FILE, key, "no AMP: weights and compute in this dtype")
            c.ignore("bf16", f"{key}: true sets the dtype")
            c.ignore("fp16", f"{key}: true sets the dtype")
            return
    if c.has("fp16") and as_bool(c, "fp16", c.take("fp16")):
        c.set("dtype", "fp16", FILE, "fp16")
        c.ignore("bf16", "fp16: true sets the dtype")
        return
    bf16 = c.take("bf16", "auto")
    if bf16 == "auto" or (bf16 != "full" and as_bool(c, "bf16", bf16)) or bf16 == "full":
        origin = FILE if c.has("bf16") else TOOL
        c.set(
            "dtype",
            "bf16",
            origin,
            "bf16" if c.has("bf16") else None,
            "bf16: auto = bf16 on Ampere or newer" if bf16 == "auto" else "",
        )
        return
    c.set(
        "dtype",
        checkpoint_dtype or "bf16",
        OURS,
        "bf16",
        "bf16: false and no fp16: no mixed precision, which vramcalc does not model; "
        "estimated under bf16 autocast with the checkpoint's dtype",
    )


def _attention(c: Collector) -> None:
    for key, attn in (
        ("flash_attention", "flash_attention_2"),
        ("sdp_attention", "sdpa"),
        ("eager_attention", "eager"),
    ):
        if c.has(key) and as_bool(c, key, c.take(key)):
            c.set("attn", attn, FILE, key)
            break
    else:
        if c.has("attn_implementation"):
            value = c.take("attn_implementation")
            c.set("attn", as_attn(c, "attn_implementation", value), FILE, "attn_implementation")
        else:
            c.set("attn", "sdpa", TOOL, note="transformers' default attn_implementation: sdpa")
    c.ignore(
        "xformers_attention", "xformers is not modelled; another attention key or sdpa applies"
    )
    c.ignore("attn_implementation", "a *_attention: true key sets the attention")


def _sharding(c: Collector, where: Path) -> None:
    if c.has("world_size"):
        c.world_size = as_int(c, "world_size", c.take("world_size"))
    micro, accum = c.fields["batch_size"].value, c.fields["grad_accum"].value
    sharding = deepspeed_sharding(c, "deepspeed", where, micro, accum) or fsdp_sharding(
        c, "fsdp", "fsdp_config"
    )
    c.ignore("fsdp_version", "FSDP1 and FSDP2 shard alike for memory")
    if sharding is not None:
        c.set(
            "strategy", sharding.strategy, FILE, sharding.key.removeprefix(c.prefix), sharding.note
        )
        c.set(
            "cpu_offload",
            sharding.cpu_offload,
            FILE,
            sharding.key.removeprefix(c.prefix),
            sharding.note,
        )
        c.world_size = c.world_size or sharding.world_size
