"""TRL and plain HF Trainer configs (YAML or JSON) → plan fields.

One shape serves both (README, "--from FILE"): the model id (``model_name_or_path`` or
``model``), ``TrainingArguments`` keys either flat at the top or in a ``training_args``
section (also ``TrainingArguments``, ``args``, ``sft_config``, ``SFTConfig``), a PEFT
``LoraConfig`` in ``peft_config`` (or ``lora_config``, ``LoraConfig``), a
``BitsAndBytesConfig`` in ``bnb_config`` (or ``quantization_config``, ``BitsAndBytesConfig``)
and ``from_pretrained`` keywords in ``model_init_kwargs`` (or ``model_kwargs``). A TRL CLI
file (``trl sft --config``) is flat: ``SFTConfig`` plus TRL's ``ModelConfig`` keys
(``use_peft``, ``lora_r``, ``load_in_4bit``, ``dtype`` ...).

Defaults, by tool: transformers ``training_args.py`` (per_device_train_batch_size=8,
gradient_accumulation_steps=1, optim adamw_torch_fused with torch >= 2.8,
gradient_checkpointing=False, bf16=False); TRL ``trl/trainer/base_config.py``
(gradient_checkpointing=True, bf16=True unless fp16), ``trl/trainer/sft_config.py``
(max_length=1024; ``max_seq_length`` before TRL 0.20), ``trl/trainer/model_config.py``
(use_peft=False, lora_r=16, lora_alpha=32, lora_dropout=0.05, bnb_4bit_quant_type=nf4,
use_bnb_nested_quant=False, dtype=float32); peft ``LoraConfig`` (r=8, lora_alpha=8,
lora_dropout=0.0, target_modules=None: the architecture's default); transformers
``BitsAndBytesConfig`` (bnb_4bit_quant_type=fp4, bnb_4bit_use_double_quant=False).
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
    as_dtype,
    as_float,
    as_int,
    as_modules,
    as_optimizer,
)
from vramcalc.configs.sharding import deepspeed_sharding, fsdp_sharding

TRAINING_SECTIONS = ("training_args", "TrainingArguments", "args", "sft_config", "SFTConfig")
PEFT_SECTIONS = ("peft_config", "lora_config", "LoraConfig")
BNB_SECTIONS = ("bnb_config", "quantization_config", "BitsAndBytesConfig")
MODEL_SECTIONS = ("model_init_kwargs", "model_kwargs")
SECTIONS = TRAINING_SECTIONS + PEFT_SECTIONS + BNB_SECTIONS + MODEL_SECTIONS
# keys only TRL has (SFTConfig, ModelConfig): a file with one of them is a TRL file
TRL_KEYS = (
    "max_length",
    "max_seq_length",
    "packing",
    "dataset_text_field",
    "use_peft",
    "lora_r",
    "use_bnb_nested_quant",
    "completion_only_loss",
    "assistant_only_loss",
    "sft_config",
    "SFTConfig",
    "dataset_name",
)
TA = "transformers training_args.py"
TRL = "trl trl/trainer/"


def section(c: Collector, names: tuple[str, ...]) -> Collector | None:
    for name in names:
        if isinstance(c.data.get(name), dict):
            c.take(name)
            return Collector(c.tool, c.data[name], prefix=f"{name}.", fields=c.fields)
    return None


def read(c: Collector, where: Path, checkpoint_dtype: str | None, trl: bool) -> None:
    c.take("model_name_or_path")
    c.take("model")
    args, peft, bnb, model_kw = (
        section(c, s) for s in (TRAINING_SECTIONS, PEFT_SECTIONS, BNB_SECTIONS, MODEL_SECTIONS)
    )
    ta = [s for s in (args, c) if s is not None]  # TrainingArguments: its section, else flat

    method = _method(c, peft, bnb, trl)
    if method != "full":
        _lora(c, peft, trl)
    _seq_len(c, ta, trl)
    _from(
        ta,
        "batch_size",
        "per_device_train_batch_size",
        8,
        TA + ": per_device_train_batch_size=8",
        as_int,
    )
    _from(
        ta,
        "grad_accum",
        "gradient_accumulation_steps",
        1,
        TA + ": gradient_accumulation_steps=1",
        as_int,
    )
    gc_default, gc_note = (
        (True, TRL + "base_config.py: gradient_checkpointing=True")
        if trl
        else (False, TA + ": gradient_checkpointing=False")
    )
    _from(ta, "gradient_checkpointing", "gradient_checkpointing", gc_default, gc_note, as_bool)
    _from(
        ta,
        "optimizer",
        "optim",
        "adamw_torch_fused",
        TA + ": optim=adamw_torch_fused (torch >= 2.8)",
        lambda cc, k, v: as_optimizer(cc, k, v),
    )
    _precision(c, ta, model_kw, checkpoint_dtype, trl)
    owner = _owner([model_kw, c], "attn_implementation")
    if owner is not None:
        owner.set(
            "attn",
            as_attn(owner, "attn_implementation", owner.take("attn_implementation")),
            FILE,
            "attn_implementation",
        )
    else:
        c.set("attn", "sdpa", TOOL, note="transformers' default attn_implementation: sdpa")
    for s in ta:
        s.ignore(
            "packing",
            "packing fills each sequence to max_length; the estimate assumes full sequences",
        )
        s.ignore(
            "padding_free",
            "the estimate assumes padded sequences of max_length tokens (an upper bound)",
        )
        s.ignore("gradient_checkpointing_kwargs", "estimated with use_reentrant=False")
    micro, accum = c.fields["batch_size"].value, c.fields["grad_accum"].value
    for s in ta:
        sharding = deepspeed_sharding(s, "deepspeed", where, micro, accum) or fsdp_sharding(
            s, "fsdp", "fsdp_config"
        )
        if sharding is not None:
            s.set(
                "strategy",
                sharding.strategy,
                FILE,
                sharding.key.removeprefix(s.prefix),
                sharding.note,
            )
            s.set(
                "cpu_offload",
                sharding.cpu_offload,
                FILE,
                sharding.key.removeprefix(s.prefix),
                sharding.note,
            )
            c.world_size = sharding.world_size
            break
    for sub in (args, peft, bnb, model_kw):
        if sub is not None:
            sub.finish()
            c.used += sub.used
            c.ignored.update(sub.ignored)
            c.notes += sub.notes


def _owner(collectors: list[Collector | None], key: str) -> Collector | None:
    return next((s for s in collectors if s is not None and s.has(key)), None)


def _from(ta: list[Collector], name: str, key: str, default, note: str, convert) -> None:
    owner = _owner(list(ta), key)
    if owner is None:
        ta[-1].set(name, default, TOOL, note=note)
        return
    owner.set(name, convert(owner, key, owner.take(key)), FILE, key)


def _method(c: Collector, peft: Collector | None, bnb: Collector | None, trl: bool) -> str:
    q = bnb or c  # BitsAndBytesConfig section, else TRL's flat ModelConfig keys
    four = as_bool(q, "load_in_4bit", q.take("load_in_4bit", False))
    eight = as_bool(q, "load_in_8bit", q.take("load_in_8bit", False))
    if four and eight:
        raise q.error("load_in_4bit", "load_in_4bit and load_in_8bit are both true; choose one.")
    use_peft = peft is not None or as_bool(c, "use_peft", c.take("use_peft", False))
    if not use_peft and (four or eight):
        key = "load_in_4bit" if four else "load_in_8bit"
        raise q.error(
            key,
            "k-bit base weights need LoRA adapters (a quantized model cannot be trained in full); "
            "add a peft_config section" + (" or use_peft: true" if trl else "") + ".",
        )
    if not use_peft:
        c.set(
            "method",
            "full",
            TOOL,
            note="no peft_config" + (" and use_peft=False (model_config.py)" if trl else ""),
        )
        c.set("quant", "none", TOOL, note="no quantization")
        return "full"
    if four:
        qtype_default = (
            ("nf4", TRL + "model_config.py: bnb_4bit_quant_type=nf4")
            if bnb is None
            else ("fp4", "transformers BitsAndBytesConfig: bnb_4bit_quant_type=fp4")
        )
        c.set("method", "qlora", FILE, q.name("load_in_4bit"))
        q.from_key("quant", "bnb_4bit_quant_type", qtype_default[0], TOOL, qtype_default[1])
        nested = "bnb_4bit_use_double_quant" if bnb is not None else "use_bnb_nested_quant"
        note = (
            "transformers BitsAndBytesConfig: bnb_4bit_use_double_quant=False"
            if bnb is not None
            else TRL + "model_config.py: use_bnb_nested_quant=False"
        )
        q.from_key("double_quant", nested, False, TOOL, note, lambda v: as_bool(q, nested, v))
        return "qlora"
    c.set("method", "lora", FILE, "peft_config" if peft is not None else "use_peft")
    c.set(
        "quant",
        "int8" if eight else "none",
        FILE if eight else TOOL,
        q.name("load_in_8bit") if eight else None,
        "" if eight else "no load_in_4bit/load_in_8bit",
    )
    return "lora"


def _lora(c: Collector, peft: Collector | None, trl: bool) -> None:
    if peft is not None:  # a peft LoraConfig: peft's own defaults
        p, keys = (
            peft,
            ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "use_dora"),
        )
        defaults = (8, 8.0, 0.0)
        note = "peft LoraConfig: "
        peft.ignore("task_type", "CAUSAL_LM is what vramcalc estimates")
        peft.ignore("bias", "bias training is not modelled (peft's default bias='none')")
    else:  # TRL ModelConfig's flat keys and defaults
        p, keys = (
            c,
            (
                "lora_r",
                "lora_alpha",
                "lora_dropout",
                "lora_target_modules",
                "lora_modules_to_save",
                "use_dora",
            ),
        )
        defaults = (16, 32.0, 0.05)
        note = TRL + "model_config.py: "
        c.ignore("lora_task_type", "CAUSAL_LM is what vramcalc estimates")
    r, alpha, dropout, targets, saved, dora = keys
    p.from_key("rank", r, defaults[0], TOOL, f"{note}{r}={defaults[0]}", lambda v: as_int(p, r, v))
    p.from_key(
        "alpha",
        alpha,
        defaults[1],
        TOOL,
        f"{note}{alpha}={defaults[1]:g}",
        lambda v: as_float(p, alpha, v),
    )
    if peft is not None:
        c.alpha_rule = lambda rank: 8.0  # peft: lora_alpha=8 whatever r
    else:
        c.alpha_rule = lambda rank: 32.0
    p.from_key(
        "dropout",
        dropout,
        defaults[2],
        TOOL,
        f"{note}{dropout}={defaults[2]:g}",
        lambda v: as_float(p, dropout, v),
    )
    p.from_key(
        "targets",
        targets,
        None,
        TOOL,
        f"{note}{targets}=None: peft's default for the architecture",
        lambda v: as_modules(p, targets, v),
    )
    if p.has(saved):
        p.set("modules_to_save", as_modules(p, saved, p.take(saved)), FILE, saved)
    p.from_key("dora", dora, False, TOOL, f"{note}use_dora=False", lambda v: as_bool(p, dora, v))


def _seq_len(c: Collector, ta: list[Collector], trl: bool) -> None:
    for key in ("max_length", "max_seq_length"):
        owner = _owner(list(ta), key)
        if owner is not None:
            owner.set("seq_len", as_int(owner, key, owner.take(key)), FILE, key)
            for other in ta:
                other.ignore(
                    "max_seq_length", "max_length is given (TRL renamed max_seq_length to it)"
                )
            return
    if trl:
        c.set("seq_len", 1024, TOOL, note=TRL + "sft_config.py: max_length=1024")
    else:
        c.set(
            "seq_len",
            2048,
            OURS,
            note="Trainer has no sequence length: give max_length in the file or --seq-len",
        )


def _precision(
    c: Collector,
    ta: list[Collector],
    model_kw: Collector | None,
    checkpoint_dtype: str | None,
    trl: bool,
) -> None:
    fp16_owner, bf16_owner = _owner(list(ta), "fp16"), _owner(list(ta), "bf16")
    fp16 = as_bool(fp16_owner, "fp16", fp16_owner.take("fp16")) if fp16_owner else False
    bf16 = (
        as_bool(bf16_owner, "bf16", bf16_owner.take("bf16")) if bf16_owner else (trl and not fp16)
    )
    if bf16 and fp16:
        raise (bf16_owner or c).error("bf16", "bf16 and fp16 are both true; choose one.")
    owner = next(
        (s for s in (model_kw, c) if s is not None for k in ("dtype", "torch_dtype") if s.has(k)),
        None,
    )
    if owner is not None:
        key = "dtype" if owner.has("dtype") else "torch_dtype"
        dtype = as_dtype(owner, key, owner.take(key), checkpoint_dtype)
        owner.set("dtype", dtype, FILE, key, "the dtype from_pretrained loads the weights in")
        owner.ignore("torch_dtype", "dtype is given (transformers 5 renamed torch_dtype to it)")
    elif trl:
        c.set(
            "dtype",
            "fp32",
            TOOL,
            note=TRL + "model_config.py: dtype=float32 (weights loaded in fp32)",
        )
    elif fp16:
        c.set(
            "dtype",
            "fp16",
            FILE,
            fp16_owner.name("fp16") if fp16_owner else None,
            "fp16 mixed precision",
        )
    else:
        c.set(
            "dtype",
            checkpoint_dtype or "bf16",
            OURS,
            note="from_pretrained's dtype='auto' (transformers 5): the checkpoint's dtype",
        )
    if not bf16 and not fp16:
        c.notes.append(
            "bf16 and fp16 are off (TrainingArguments bf16=False): full precision without autocast, "
            "which vramcalc does not model; estimated under bf16 autocast"
        )
    elif fp16 and c.fields["dtype"].value != "fp16":
        c.notes.append("fp16 mixed precision: estimated with the loaded dtype under autocast")
