"""Exact parameter inventory of a model under a plan, counted on the meta device.

The real transformers model class is built from its config under
``accelerate.init_empty_weights()`` (no memory is allocated) and, for LoRA
plans, wrapped by the real peft ``get_peft_model``. Walking the modules gives
exact parameter counts by *role*:

``linear``        weights of ``nn.Linear`` layers that bitsandbytes replaces
                  when the base model is loaded in 8/4 bit (transformers'
                  ``replace_with_bnb_linear`` converts ``type(m) is nn.Linear``
                  except ``get_keys_to_not_convert``: output head, tied keys,
                  the last module);
``linear_bias``   their biases (bitsandbytes keeps biases unquantized);
``lm_head``       the output projection when it is *not* tied to the input
                  embedding (tied heads are counted once, as ``embedding``);
``embedding``     ``nn.Embedding`` weights (token and learned positions);
``norm``          LayerNorm / RMSNorm weights and biases;
``other``         everything else (MoE expert tensors stored as 3-D
                  parameters, routers, ...), kept in the load dtype;
``adapter``       LoRA A/B matrices (and DoRA magnitudes) added by peft; for AdaLoRA
                  the SVD-form P, Λ, Q (``lora_A``, ``lora_E``, ``lora_B``) at
                  the initial rank.

Building costs ~0.5 s after ~3 s of imports, so results are cached on disk
(``vramcalc.cache``), keyed by config, targets, rank and library versions.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vramcalc import progress
from vramcalc.adapters import adapter_config, default_target_modules, make_ranknum_trainable
from vramcalc.cache import cache_dir
from vramcalc.catalog import causal_lm_config, config_facts, config_int, one_line
from vramcalc.errors import ConfigError, InvalidPlanError, VramcalcError
from vramcalc.training_plan import ALL_LINEAR, TrainingPlan
from vramcalc.versions import installed_versions

ROLES = ("linear", "linear_bias", "lm_head", "embedding", "norm", "other", "adapter")
CACHE_VERSION = 6  # 4: config facts; 5: only causal-LM configs with positive sizes are built;
# 6: AdaLoRA's ranknum is trainable


@dataclass(frozen=True)
class LinearGroup:
    """All ``nn.Linear`` modules of one leaf name and shape, e.g. 32 x ``q_proj``."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    count: int
    quantizable: bool
    lora: bool

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelInventory:
    """Exact parameter facts of one model (+ adapters) that memory rules need."""

    model_type: str
    architecture: str
    total_params: int  # base model, tied weights once, without adapters
    adapter_params: int  # LoRA A/B (+ DoRA magnitudes), fp32
    trainable_params: int  # for the plan's method (adapters + modules_to_save copies)
    params_by_role: dict[str, int]
    linears: tuple[LinearGroup, ...]
    lora_targets: tuple[str, ...]  # leaf names wrapped by LoRA ("" for full)
    tied_embeddings: bool
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int  # 0 for dense models
    experts_per_token: int
    linear_module_names: tuple[str, ...]  # every distinct Linear leaf name (for error messages)
    # shape -> how many trainable tensors have it (optimizer rules need per-tensor sizes)
    trainable_shapes: tuple[tuple[tuple[int, ...], int], ...] = ()
    # peft modules_to_save: trainable copies of whole modules, kept in the base dtype
    saved_copy_params: int = 0
    saved_copy_shapes: tuple[tuple[tuple[int, ...], int], ...] = ()
    library_versions: dict[str, str] = field(default_factory=dict)
    # What the memory rules read from the config besides shapes, as the built
    # ``PretrainedConfig`` states them (architecture defaults included), so that no
    # caller has to pass the config next to the inventory.
    hidden_act: str = ""  # hidden_activation / hidden_act / activation_function, "" if none
    dropout: float = 0.0  # config.dropout (OPT's residual-branch dropout)
    attention_dropout: float = 0.0
    attn_logit_softcapping: float | None = None  # gemma2
    final_logit_softcapping: float | None = None  # gemma2
    context_length: int | None = None  # max_position_embeddings (or the architecture's name for it)
    output_head: str = ""  # leaf name of the output projection ("lm_head"): a valid LoRA target

    @property
    def total_params_with_adapters(self) -> int:
        return self.total_params + self.adapter_params + self.saved_copy_params

    @property
    def largest_quantizable_linear_params(self) -> int:
        sizes = [g.weight_params for g in self.linears if g.quantizable]
        return max(sizes, default=0)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["linears"] = [asdict(g) for g in self.linears]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInventory:
        data = dict(data)
        data["linears"] = tuple(LinearGroup(**g) for g in data["linears"])
        data["lora_targets"] = tuple(data["lora_targets"])
        data["linear_module_names"] = tuple(data["linear_module_names"])
        data["trainable_shapes"] = tuple((tuple(s), c) for s, c in data["trainable_shapes"])
        data["saved_copy_shapes"] = tuple((tuple(s), c) for s, c in data["saved_copy_shapes"])
        return cls(**data)


def library_versions() -> dict[str, str]:
    """Versions that change how models are built (part of the cache key)."""
    return dict(installed_versions())


def cache_key(config_dict: dict[str, Any], plan: TrainingPlan) -> str:
    """Everything that changes an inventory, hashed."""
    payload = {
        "v": CACHE_VERSION,
        "config": config_dict,
        "lora": lora_key(plan),
        "libs": library_versions(),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def lora_key(plan: TrainingPlan) -> dict[str, Any] | None:
    """The part of a plan that changes the inventory (None: no adapters)."""
    if not plan.uses_adapters:
        return None
    key: dict[str, Any] = {
        "rank": plan.rank,
        "targets": list(plan.targets) if plan.targets else None,
        "dora": plan.dora,
        "modules_to_save": list(plan.modules_to_save) if plan.modules_to_save else None,
    }
    if plan.method == "adalora":  # the schedule changes values, not shapes
        key.update(adalora=True, rank=plan.init_rank)
    return key


def build_inventory(
    config_dict: dict[str, Any], plan: TrainingPlan, use_cache: bool = True, where: str = "config"
) -> ModelInventory:
    """The inventory of ``config_dict`` under ``plan`` (cached on disk).

    A config that transformers or peft cannot build becomes a ``ConfigError`` naming
    ``where`` (the ``--model`` value); only configs that built are cached.
    """
    path = cache_dir("inventory") / f"{cache_key(config_dict, plan)}.json"
    if use_cache and path.is_file():
        try:
            return ModelInventory.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            pass  # stale or corrupt entry: rebuild below
    try:
        inventory = _from_structure(config_dict, plan, use_cache, where) or _build_on_meta(
            config_dict, plan, where
        )
    except VramcalcError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure inside transformers/peft is the config's
        raise ConfigError(
            f"--model {where}: transformers cannot build the model from this config "
            f"({type(err).__name__}: {one_line(err)})"
        ) from err
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(inventory.to_json()))
            tmp.replace(path)
        except OSError:
            pass  # a read-only cache only costs speed
    return inventory


# LoRA's tensors are linear in the rank: A is (r, in), B is (out, r), a MoE expert
# wrapper's (k*r, in), DoRA's magnitude (out,) does not depend on it. One peft build at
# this rank, a prime that divides no model dimension, gives every other rank of the same
# targets exactly, by putting k*r where k times this number stands in an adapter shape.
STRUCTURE_RANK = 8191


def _from_structure(
    config_dict: dict[str, Any], plan: TrainingPlan, use_cache: bool, where: str
) -> ModelInventory | None:
    """The inventory at ``plan.rank`` derived from the (cached) one at ``STRUCTURE_RANK``.

    None when the plan has no adapters, is itself the structure build, or a
    model dimension is a multiple of ``STRUCTURE_RANK`` (the shapes would be
    ambiguous): build directly then.
    """
    if not plan.uses_adapters or plan.rank == STRUCTURE_RANK or plan.method == "adalora":
        return None  # AdaLoRA is built at its own init_rank: a small build, not derived
    structure = build_inventory(
        config_dict, plan.with_(rank=STRUCTURE_RANK), use_cache=use_cache, where=where
    )
    base_dims = {d for g in structure.linears for d in (g.in_features, g.out_features)}
    base_dims |= {structure.vocab_size, structure.hidden_size, structure.intermediate_size}
    dims = {d for shape, _ in structure.trainable_shapes for d in shape}
    if any(d % STRUCTURE_RANK == 0 for d in base_dims) or any(
        d % (STRUCTURE_RANK * STRUCTURE_RANK) == 0 for d in dims
    ):
        return None

    def at_rank(shape: tuple[int, ...]) -> tuple[int, ...]:
        # d = k * STRUCTURE_RANK: k rank-sized blocks (e.g. one per MoE expert)
        return tuple(
            d // STRUCTURE_RANK * plan.rank if d % STRUCTURE_RANK == 0 else d for d in shape
        )

    def numel(shape: tuple[int, ...]) -> int:
        out = 1
        for d in shape:
            out *= d
        return out

    adapter: dict[tuple[int, ...], int] = {}
    for shape, count in structure.trainable_shapes:  # adapter tensors only
        adapter[at_rank(shape)] = adapter.get(at_rank(shape), 0) + count
    adapter_params = sum(numel(s) * c for s, c in adapter.items())
    roles = dict(structure.params_by_role, adapter=adapter_params)
    return replace(
        structure,
        adapter_params=adapter_params,
        trainable_params=adapter_params + structure.saved_copy_params,
        params_by_role=roles,
        trainable_shapes=tuple(sorted(adapter.items())),
    )


def _no_init():
    """transformers' switch that turns torch's and its own initializers into no-ops."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from contextlib import nullcontext

        return nullcontext()
    return no_init_weights()


def _build_on_meta(config_dict: dict[str, Any], plan: TrainingPlan, where: str) -> ModelInventory:
    import logging
    import warnings

    # peft imports bitsandbytes when it is installed; its CPU backend logs a warning about an
    # optional kernel package that has nothing to do with counting parameters.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    progress.note(
        f"building {progress.describe(where or plan.model, plan.method, plan.quant)} on the "
        "meta device to count its parameters (torch, transformers and peft load first)"
    )
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    config = causal_lm_config(config_dict, where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Counting needs shapes, not values: skipping the initializers (which run through
        # torch's reference kernels on meta, about 1 ms per tensor) halves a cold build.
        with init_empty_weights(), _no_init():
            model = AutoModelForCausalLM.from_config(config)
        # init_empty_weights re-wraps every registered Parameter, which undoes the
        # head <-> embedding tie made during construction: tie again.
        model.tie_weights()
    not_convert = set(get_keys_to_not_convert(model))
    output_head = model.get_output_embeddings()
    input_embed = model.get_input_embeddings()
    tied = bool(
        output_head is not None
        and input_embed is not None
        and output_head.weight is input_embed.weight
    )

    try:  # the exact predicate replace_with_bnb_linear uses (transformers >= 5)
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # older transformers: prefix / suffix match

        def should_convert_module(full_name, patterns=None):  # type: ignore[misc]
            return not any(
                full_name == k or full_name.endswith("." + k) or full_name.startswith(k + ".")
                for k in patterns or ()
            )

    def convertible(module_name: str) -> bool:
        return should_convert_module(module_name, sorted(not_convert))

    roles = dict.fromkeys(ROLES, 0)
    seen: set[int] = set()
    base_shapes: dict[tuple[int, ...], int] = {}
    groups: dict[tuple[str, int, int, bool, bool], int] = {}
    head_name = ""
    for module_name, module in model.named_modules():
        if module is output_head:
            head_name = module_name.rsplit(".", 1)[-1]
        is_linear = type(module) is torch.nn.Linear
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            base_shapes[tuple(param.shape)] = base_shapes.get(tuple(param.shape), 0) + 1
            roles[_role(module, module_name, param_name, is_linear, output_head, convertible)] += (
                param.numel()
            )
        if is_linear and module is not output_head:
            key = (
                module_name.rsplit(".", 1)[-1],
                module.in_features,
                module.out_features,
                module.bias is not None,
                convertible(module_name),
            )
            groups[key] = groups.get(key, 0) + 1
    total = sum(roles.values())
    linear_names = tuple(sorted({k[0] for k in groups}))

    lora_names: tuple[str, ...] = ()
    adapter_params = copy_params = 0
    trainable_shapes, copy_shapes = base_shapes, {}
    if plan.uses_adapters:
        module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
        lora_names, adapter_params, trainable_shapes, copy_params, copy_shapes = _apply_lora(
            model, config, plan, linear_names + ((head_name,) if head_name else ()), module_names
        )
    roles["adapter"] = adapter_params
    linears = tuple(
        LinearGroup(name, fin, fout, bias, count, quantizable, name in lora_names)
        for (name, fin, fout, bias, quantizable), count in sorted(groups.items())
    )
    trainable = adapter_params + copy_params if plan.uses_adapters else total
    heads = config_int(config, "num_attention_heads", "n_head")
    hidden = config_int(config, "hidden_size", "n_embd", "d_model")
    return ModelInventory(
        model_type=config.model_type,
        architecture=type(model).__name__,
        total_params=total,
        adapter_params=adapter_params,
        trainable_params=trainable,
        params_by_role=roles,
        linears=linears,
        lora_targets=lora_names,
        tied_embeddings=tied,
        num_layers=config_int(config, "num_hidden_layers", "n_layer"),
        hidden_size=hidden,
        intermediate_size=config_int(config, "intermediate_size", "ffn_dim", "ffn_hidden_size")
        or 4 * hidden,
        num_attention_heads=heads,
        num_key_value_heads=config_int(config, "num_key_value_heads", "num_kv_heads", default=heads)
        if not getattr(config, "multi_query", False)
        or getattr(config, "new_decoder_architecture", False)
        else 1,
        head_dim=config_int(config, "head_dim") or (hidden // heads if heads else 0),
        vocab_size=config_int(config, "vocab_size"),
        num_experts=config_int(config, "num_local_experts", "num_experts"),
        experts_per_token=config_int(config, "num_experts_per_tok"),
        linear_module_names=linear_names,
        trainable_shapes=tuple(sorted(trainable_shapes.items())),
        saved_copy_params=copy_params,
        saved_copy_shapes=tuple(sorted(copy_shapes.items())),
        library_versions=library_versions(),
        output_head=head_name,
        **config_facts(config),
    )


def _role(module, module_name, param_name, is_linear, output_head, convertible) -> str:
    import torch

    if module is output_head:
        return "lm_head"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if is_linear:
        if not convertible(module_name):
            return "other"
        return "linear" if param_name == "weight" else "linear_bias"
    if "norm" in type(module).__name__.lower() or isinstance(module, torch.nn.LayerNorm):
        return "norm"
    return "other"


def _apply_lora(
    model, config, plan: TrainingPlan, linear_names: tuple[str, ...], module_names: set[str]
):
    """Wrap ``model`` with the real peft LoRA on meta.

    Returns the wrapped leaf names, the adapter parameter count and the
    adapter tensors' shapes (shape -> count), and the same two for
    ``modules_to_save`` copies.
    """
    import warnings

    from accelerate import init_empty_weights
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer  # AdaLoRA's SVDLinear is a LoraLayer too

    if plan.targets is None:
        targets: Any = default_target_modules(config.model_type, plan.method)
    elif plan.targets == (ALL_LINEAR,):
        targets = ALL_LINEAR
    else:
        missing = [t for t in plan.targets if t not in linear_names]
        if missing:
            raise InvalidPlanError(
                [
                    f"--targets {', '.join(missing)}: the model has no linear module of that name; "
                    f"its linear modules are {', '.join(linear_names)} (or use all-linear)."
                ]
            )
        targets = list(plan.targets)
    missing_saved = [m for m in plan.modules_to_save or () if m not in module_names]
    if missing_saved:
        raise InvalidPlanError(
            [
                f"--modules-to-save {', '.join(missing_saved)}: the model has no module of that name "
                f"(e.g. {', '.join(sorted(n for n in module_names if not n.isdigit())[:12])})."
            ]
        )
    lora_config = adapter_config(plan, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with init_empty_weights(), _no_init():
            peft_model = get_peft_model(model, lora_config)
    if plan.method == "adalora":
        make_ranknum_trainable(peft_model)
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }
    shapes: dict[tuple[int, ...], int] = {}
    copies: dict[tuple[int, ...], int] = {}
    adapter = copied = 0
    for name, param in peft_model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_" in name or ".ranknum." in name:  # AdaLoRA's ranknum: an adapter tensor
            adapter += param.numel()
            shapes[tuple(param.shape)] = shapes.get(tuple(param.shape), 0) + 1
        elif ".modules_to_save." in name:
            copied += param.numel()
            copies[tuple(param.shape)] = copies.get(tuple(param.shape), 0) + 1
    return tuple(sorted(names)), adapter, shapes, copied, copies
