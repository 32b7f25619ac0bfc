"""Activation rules against the tracer: real tiny models, one forward on CPU, exact bytes.

Each case builds a tiny model of the architecture under the project recipe
(``build_cpu_recipe``), runs forward + loss under ``torch.autocast("cpu",
bf16)`` and reads what autograd saved, per decoder layer, with
``tests/memory/memtrace.py``'s ``saved_bytes`` (storages rounded to 512 B like the CUDA
allocator). The rule in ``vramcalc.memory.activations`` must give the same
bytes exactly.

Where CPU and CUDA differ, ``cuda_recipe_on_cpu`` makes the CPU run do what
the GPU does, each difference named:

* ``layer_norm``: CUDA autocast runs it in fp32 (input, weight and bias cast
  to fp32, fp32 output); CPU autocast has no fp32 list entry for it.
* ``dropout``: CUDA uses the fused ``native_dropout`` (keeps a bool mask);
  CPU multiplies by a noise tensor of the input's dtype.
* peft's ``lora.bnb`` layers test ``torch.is_autocast_enabled()`` (CUDA only)
  to skip their fp32 input cast; under CPU autocast it reads False.

bitsandbytes is not needed: ``Emulated4bit``/``Emulated8bit`` replace the
quantized linears with autograd functions that keep exactly what
bitsandbytes' ``MatMul4Bit`` (the packed weight only) and ``MatMul8bitLt``
(the input ``A``) keep, with their dtype behaviour (``Linear4bit`` computes in
bf16 and returns ``.to(input dtype)``; ``MatMul8bitLt`` returns the input's
dtype), and the LoRA layers on them run peft's ``lora.bnb`` forward.
``test_emulation_matches_bitsandbytes`` checks the emulation against the
real library when it is installed (bitsandbytes 0.50 runs on CPU).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.memory.memtrace import SavedReport, saved_bytes
from vramcalc.inventory import build_inventory
from vramcalc.memory.activations import estimate_activations
from vramcalc.training_plan import TrainingPlan

BASE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "use_cache": False,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {**BASE, "model_type": "llama", "intermediate_size": 176, "num_key_value_heads": 2},
    "qwen2": {**BASE, "model_type": "qwen2", "intermediate_size": 176, "num_key_value_heads": 2},
    "mistral": {
        **BASE,
        "model_type": "mistral",
        "intermediate_size": 160,
        "num_key_value_heads": 1,
        "sliding_window": None,
    },
    "gemma2": {
        **BASE,
        "model_type": "gemma2",
        "intermediate_size": 160,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 64,
    },
    "phi3": {
        **BASE,
        "model_type": "phi3",
        "intermediate_size": 160,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
    },
    "mixtral": {
        **BASE,
        "model_type": "mixtral",
        "intermediate_size": 96,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
    "opt": {
        **BASE,
        "model_type": "opt",
        "ffn_dim": 128,
        "word_embed_proj_dim": 64,
        "do_layer_norm_before": True,
        "enable_bias": True,
        "dropout": 0.1,
        "pad_token_id": 1,
    },
}
BATCH, SEQ = 2, 32


# -- the recipe on CPU ------------------------------------------------------------------------
class _MatMul4BitLike(torch.autograd.Function):
    """bitsandbytes MatMul4Bit: dequantize, F.linear; keeps only the (packed) weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight  # bnb: ctx.tensors = (None, B), outside save_for_backward
        return F.linear(x, weight.clone())  # the clone stands for the dequantized weight

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.weight.clone().to(grad.dtype), None


class _MatMul8bitLtLike(torch.autograd.Function):
    """bitsandbytes MatMul8bitLt: keeps its input A; returns A's dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)  # bnb keeps A in ctx.tensors: the same memory
        ctx.weight = weight
        with torch.autocast("cpu", enabled=False):
            return F.linear(x.to(torch.bfloat16), weight).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return (grad.to(x.dtype) @ ctx.weight.to(x.dtype)), None


class Emulated4bit(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _MatMul4BitLike.apply(x.to(torch.bfloat16), self.weight)
        if self.bias is not None:
            out = out + self.bias.to(torch.bfloat16)
        return out.to(x.dtype)


class Emulated8bit(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _MatMul8bitLtLike.apply(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def _bnb_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft lora.bnb.Linear4bit/8bitLt.forward under CUDA autocast (no input cast)."""
    result = self.base_layer(x, *args, **kwargs)
    if isinstance(self.base_layer, Emulated4bit):
        result = result.clone()
    for name in self.active_adapters:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        result = result + lora_b(lora_a(self.lora_dropout[name](x))) * self.scaling[name]
    return result


def _real_linear4bit(module: torch.nn.Linear) -> torch.nn.Module:
    import bitsandbytes as bnb

    new = bnb.nn.Linear4bit(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        compute_dtype=torch.bfloat16,
        quant_type="nf4",
        compress_statistics=True,
    )
    new.weight = bnb.nn.Params4bit(
        module.weight.data.to(torch.bfloat16),
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=True,
    )
    new = new.to("cpu")  # quantizes
    if module.bias is not None:
        new.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
    return new


def _replace_linears(model: torch.nn.Module, cls: Any) -> None:
    from transformers.quantizers.base import get_keys_to_not_convert

    skip = set(get_keys_to_not_convert(model))
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear:
            continue
        if any(name == k or name.endswith("." + k) for k in skip):
            continue
        if cls == "bitsandbytes":
            new = _real_linear4bit(module)
        else:
            new = cls(module.in_features, module.out_features, bias=module.bias is not None)
            new.weight = torch.nn.Parameter(
                module.weight.data.to(torch.bfloat16), requires_grad=False
            )
            new.weight._emulated_kbit = True
            if module.bias is not None:
                new.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)


def build_cpu_recipe(
    config_dict: dict[str, Any], plan: TrainingPlan, seed: int = 0, real_bnb: bool = False
) -> torch.nn.Module:
    """The recipe's model on CPU: load dtype, k-bit emulation + fp32 upcast, peft LoRA.

    ``real_bnb``: quantize with bitsandbytes' own ``Linear4bit`` (CPU backend) instead.
    """
    from transformers import AutoModelForCausalLM

    from vramcalc.catalog import config_from_dict

    attn = plan.attn if plan.attn != "flash_attention_2" else "sdpa"  # same saved set on GPU
    if config_dict["model_type"] == "gemma2" and attn == "sdpa":
        attn = "eager"  # gemma2 does not support sdpa (softcapping)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(
            config_from_dict(config_dict), attn_implementation=attn
        )
    model.config.use_cache = False  # Trainer sets config.use_cache = args.use_cache (False)
    model.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[plan.dtype])
    if plan.is_kbit:
        kind = (
            "bitsandbytes" if real_bnb else Emulated8bit if plan.quant == "int8" else Emulated4bit
        )
        _replace_linears(model, kind)
        # set by transformers' bnb quantizers; peft picks its lora.bnb layers by it
        model.is_loaded_in_4bit = plan.quant != "int8"
        model.is_loaded_in_8bit = plan.quant == "int8"
        for p in model.parameters():  # prepare_model_for_kbit_training: the rest to fp32
            if (
                p.dtype == torch.bfloat16
                and type(p).__name__ != "Params4bit"
                and not getattr(p, "_emulated_kbit", False)
            ):
                p.data = p.data.float()
    if plan.uses_adapters:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        for p in model.parameters():
            p.requires_grad_(False)
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS,
        )

        targets: Any = list(plan.targets) if plan.targets else None
        if plan.targets is None:  # as vramcalc.inventory: peft's default, else all-linear
            targets = DEFAULTS.get(config_dict["model_type"]) or "all-linear"
        if plan.targets == ("all-linear",):
            targets = "all-linear"
        lora = LoraConfig(
            r=plan.rank,
            lora_alpha=plan.lora_alpha,
            lora_dropout=plan.dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, lora)
        for module in model.modules():
            if isinstance(module, LoraLayer) and isinstance(
                module.base_layer, (Emulated4bit, Emulated8bit)
            ):
                module.forward = _bnb_lora_forward.__get__(module)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    return model


@contextlib.contextmanager
def cuda_recipe_on_cpu() -> Iterator[None]:
    """CPU autocast with the CUDA behaviours the recipe depends on (see module docstring)."""
    layer_norm, dropout, is_enabled = F.layer_norm, F.dropout, torch.is_autocast_enabled

    def fp32_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        cast = (
            (lambda t: t if t is None else t.float())
            if torch.is_autocast_enabled("cpu")
            else (lambda t: t)
        )
        return layer_norm(cast(x), shape, cast(weight), cast(bias), eps)

    def fused_dropout(x, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1:
            return torch.native_dropout(x, p, True)[0]
        return dropout(x, p, training, inplace)

    F.layer_norm, F.dropout = fp32_layer_norm, fused_dropout
    torch.is_autocast_enabled = lambda *a: is_enabled(*a) if a else is_enabled("cpu")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        F.layer_norm, F.dropout, torch.is_autocast_enabled = layer_norm, dropout, is_enabled


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = inner.model
    return list(body.decoder.layers if hasattr(body, "decoder") else body.layers)


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = inner.model
    return body.decoder.final_layer_norm if hasattr(body, "decoder") else body.norm


def measure_saved(
    config_dict: dict[str, Any], plan: TrainingPlan, real_bnb: bool = False
) -> tuple[SavedReport, int]:
    """What autograd saved in forward + loss, tagged by layer; and the layer count."""
    model = build_cpu_recipe(config_dict, plan, real_bnb=real_bnb)
    layers = decoder_layers(model)
    scopes = {f"layer{i}": layer for i, layer in enumerate(layers)}
    scopes["final_norm"] = final_norm(model)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    scopes["embed"] = inner.get_input_embeddings()
    scopes["head"] = inner.get_output_embeddings()
    torch.manual_seed(1)
    ids = torch.randint(2, config_dict["vocab_size"], (plan.batch_size, plan.seq_len))
    with cuda_recipe_on_cpu():
        report, out = saved_bytes(
            lambda: model(input_ids=ids, labels=ids),
            round_to=512,
            parameters=list(model.parameters()),
            scopes=scopes,
        )
    del out
    return report, len(layers)


def plan_for(model_type: str, **kwargs: Any) -> TrainingPlan:
    kwargs.setdefault("seq_len", SEQ)
    kwargs.setdefault("batch_size", BATCH)
    kwargs.setdefault("gradient_checkpointing", False)  # the tracer runs without it
    return TrainingPlan(model=model_type, **kwargs)


VARIANTS = {
    "lora-bf16": {"method": "lora"},
    "qlora-nf4": {"method": "qlora"},
    "full-fp32": {"method": "full", "dtype": "fp32"},
    "full-bf16": {"method": "full", "dtype": "bf16"},
    "lora-all-linear-eager": {"method": "lora", "targets": ("all-linear",), "attn": "eager"},
    "qlora-all-linear": {"method": "qlora", "targets": ("all-linear",)},
    "int8-lora": {"method": "lora", "quant": "int8"},
    "lora-dropout": {"method": "lora", "dropout": 0.1, "rank": 4},
}


def check_layers(model_type: str, variant: str, real_bnb: bool = False) -> None:
    config = CONFIGS[model_type]
    plan = plan_for(model_type, **VARIANTS[variant])
    inventory = build_inventory(config, plan)
    est = estimate_activations(inventory, plan)
    report, n_layers = measure_saved(config, plan, real_bnb=real_bnb)
    measured = {
        scope: report.saved_during(scope).new_bytes
        for scope in [f"layer{i}" for i in range(n_layers)] + ["final_norm"]
    }
    detail = report.table()
    shared = est.shared_saved_bytes
    assert measured["layer0"] == est.first_layer_saved_bytes + shared, detail
    for i in range(1, n_layers):
        assert measured[f"layer{i}"] == est.per_layer_saved_bytes, detail
    assert measured["final_norm"] == est.final_norm_saved_bytes, detail


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_llama_layers_match_tracer(variant: str) -> None:
    check_layers("llama", variant)


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
@pytest.mark.parametrize("variant", ["lora-bf16", "qlora-all-linear", "full-fp32"])
def test_llama_family_layers_match_tracer(model_type: str, variant: str) -> None:
    check_layers(model_type, variant)


@pytest.mark.parametrize(
    "model_type, variant",
    [
        ("gemma2", "lora-bf16"),  # eager (no sdpa), softcapping, sandwich norms, GELU-tanh
        ("gemma2", "full-fp32"),
        ("gemma2", "qlora-all-linear"),
        ("phi3", "lora-bf16"),  # fused qkv_proj / gate_up_proj, partial-rotary cat
        ("phi3", "qlora-all-linear"),
        ("phi3", "full-bf16"),
        ("phi3", "lora-all-linear-eager"),
        ("mixtral", "lora-bf16"),  # router fp32 softmax/top-k, grouped_mm experts
        ("mixtral", "full-fp32"),
        ("mixtral", "full-bf16"),
        ("mixtral", "qlora-nf4"),
        ("mixtral", "int8-lora"),
        ("opt", "lora-bf16"),  # LayerNorm (fp32 under CUDA autocast), ReLU, dropout 0.1
        ("opt", "full-fp32"),
        ("opt", "qlora-all-linear"),
        ("opt", "lora-dropout"),
    ],
)
def test_other_architectures_match_tracer(model_type: str, variant: str) -> None:
    check_layers(model_type, variant)


def test_adapters_outside_linears_are_flagged_inexact() -> None:
    """peft all-linear on Mixtral also wraps the router and the 3-D expert tensors."""
    plan = plan_for("mixtral", method="lora", targets=("all-linear",))
    est = estimate_activations(build_inventory(CONFIGS["mixtral"], plan), plan)
    assert not est.exact and "ParamWrapper" in est.rule


@pytest.mark.parametrize("variant", ["qlora-nf4", "qlora-all-linear"])
def test_emulation_matches_bitsandbytes(variant: str) -> None:
    """The same numbers with bitsandbytes' real Linear4bit and peft's real lora.bnb layers."""
    pytest.importorskip("bitsandbytes")
    check_layers("llama", variant, real_bnb=True)


# -- whole forward / backward with the live-memory tracer -----------------------------------------
def step_memory(config: dict[str, Any], plan: TrainingPlan) -> tuple[int, int, int]:
    """(bytes alive after forward + loss, peak extra over them in backward, grads at that peak).

    Parameters and the input ids are left out; the forward runs under autocast and ends
    before backward, as in Trainer.training_step.
    """
    from tests.memory.memtrace import MemoryTracer

    model = build_cpu_recipe(config, plan)
    torch.manual_seed(1)
    ids = torch.randint(2, config["vocab_size"], (plan.batch_size, plan.seq_len))
    with MemoryTracer() as tracer:
        tracer.watch_model(model)
        tracer.track(ids, "inputs")
        with cuda_recipe_on_cpu():
            loss = model(input_ids=ids, labels=ids).loss
        after = tracer.live_by_category()
        tracer.reset_peak()
        loss.backward()
    report = tracer.report()
    fixed = after.get("parameters", 0) + after.get("inputs", 0)
    saved = sum(after.values()) - fixed
    return saved, report.peak_bytes - fixed - saved, report.peak_by_category.get("gradients", 0)


WIDE = {"vocab_size": 32, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize(
    "model_type, variant",
    [
        ("llama", "lora-bf16"),
        ("llama", "qlora-nf4"),
        ("llama", "full-fp32"),
        ("mixtral", "lora-bf16"),
    ],
)
def test_forward_end_and_backward_peak(model_type: str, variant: str, checkpointing: bool) -> None:
    """After forward exactly layers + head + loss saved (+ the loss); backward within bounds.

    Backward: the rule's transient is what a layer's backward allocates at its peak; the
    tracer sees that minus what was already released (final norm, loss, head saved, and,
    with full fine-tuning, plus the weight gradients made so far), so the measured extra
    must lie between the transient less those releases (and 20 %: the rule takes all three
    MLP gradients at their widest dtype) and the transient itself.
    """
    from vramcalc.memory.logits import estimate_logits

    config = {**CONFIGS[model_type], **WIDE}
    plan = plan_for(
        model_type, gradient_checkpointing=checkpointing, seq_len=64, **VARIANTS[variant]
    )
    inventory = build_inventory(config, plan)
    act = estimate_activations(inventory, plan)
    logits = estimate_logits(inventory, plan)
    saved, extra, grads = step_memory(config, plan)
    loss_scalar = 512
    assert (
        saved
        == act.layers_saved_bytes + logits.head_saved_bytes + logits.loss_saved_bytes + loss_scalar
    )
    released = act.final_norm_saved_bytes + logits.head_saved_bytes + logits.loss_saved_bytes
    expected = act.recompute_layer_bytes + act.backward_transient_bytes
    assert extra - grads <= expected
    if plan.uses_adapters:  # full FT peaks where weight gradients pile up instead
        assert extra >= expected - released - 0.2 * expected


def test_unmodelled_architecture_gets_a_flagged_llama_approximation() -> None:
    config = {
        **BASE,
        "model_type": "falcon",
        "multi_query": True,
        "parallel_attn": True,
        "new_decoder_architecture": False,
        "bias": False,
        "alibi": False,
    }
    plan = plan_for("falcon", method="qlora")
    est = estimate_activations(build_inventory(config, plan), plan)
    assert not est.exact and "approximation" in est.rule
    assert est.per_layer_saved_bytes > 0 and est.layers_saved_bytes > est.per_layer_saved_bytes


def test_full_size_layer_matches_fake_tensor_measurement() -> None:
    """Llama-2-7B, full bf16, 4096 tokens: the rule against the real layer on fake tensors."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from tests.memory.memtrace import fake_saved_bytes

    config = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "num_hidden_layers": 2,
        "vocab_size": 32000,
    }
    seq = 4096
    layer_config = LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    layer_config._attn_implementation = "sdpa"

    def build():
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            return LlamaDecoderLayer(layer_config, 1)
        finally:
            torch.set_default_dtype(default)

    def inputs():
        x = torch.randn(1, seq, 4096, dtype=torch.bfloat16, requires_grad=True)
        cos = torch.randn(1, seq, 128, dtype=torch.bfloat16)
        return (x,), {"position_embeddings": (cos, cos.clone()), "attention_mask": None}

    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = fake_saved_bytes(build, inputs, round_to=512)
    plan = TrainingPlan(model="llama-2-7b", method="full", dtype="bf16", seq_len=seq)
    est = estimate_activations(build_inventory(config, plan), plan)
    assert report.new_bytes == est.per_layer_saved_bytes
    assert report.input_bytes == est.shared_saved_bytes  # cos, sin
