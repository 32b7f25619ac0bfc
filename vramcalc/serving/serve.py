"""What ``vramcalc serve`` computes: the memory of serving a base model with LoRA adapters.

``prepare_serving`` resolves the model and counts it (and each adapter shape) on the meta
device, once; ``estimate_serve_memory`` is a pure function of those counts, the plan and
the calibration. The peak is the larger of two moments:

``prefill``  the last decoder layer of the prompt's forward: weights, adapters, the cache
             as prefill leaves it, the layer's transient tensors (``memory/inference.py``);
``decode``   the last decoding step: the cache at ``context - 1`` tokens, the update's
             transient (``memory/kvcache.py``), one token's layer transient and the logits.

Merging (``--mode merged``) happens once at load, before any request; its own transient
(``merge_allocated_bytes``) is reported and would set the peak if it were larger.

What peft 0.21 does when merging onto k-bit weights, from its source: ``Linear4bit.merge``
(peft/tuners/lora/bnb.py) dequantizes the weight (``dequantize_bnb_weight``), adds
``get_delta_weight`` and quantizes the sum again into a new ``bnb.nn.Params4bit``
(``Linear8bitLt.merge``: a new ``Int8Params``), so a merged QLoRA model stays 4-bit in memory
and the merge carries the 4-bit rounding of the delta. A 16-bit merged model means merging
onto the base loaded in 16 bit (``--quant none``); its checkpoint size is in ``disk``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vramcalc.catalog import ModelSpec, resolve_model
from vramcalc.inventory import LinearGroup, ModelInventory, build_inventory
from vramcalc.memory import DTYPE_BYTES, alloc_bytes
from vramcalc.memory.overhead import Calibration, allocator_reserve_bytes
from vramcalc.memory.weights import four_bit_linear_bytes, int8_linear_bytes
from vramcalc.serve_plan import AdapterSpec, ServePlan
from vramcalc.serving.inference import ForwardShape, layer_transient_bytes, logits_bytes
from vramcalc.serving.kvcache import (
    CacheLayout,
    cache_layout,
    kv_cache_bytes,
    kv_prefill_bytes,
    kv_update_transient_bytes,
)
from vramcalc.training_plan import TrainingPlan

if TYPE_CHECKING:
    from vramcalc.serving.servereplay import ServeSimulation

#: safetensors: an 8-byte little-endian header length, then a JSON header; about this many
#: bytes of header per tensor entry (name, dtype, shape, offsets; peft's names are long)
SAFETENSORS_HEADER_BYTES_PER_TENSOR = 160
SAFETENSORS_LENGTH_BYTES = 8
COMPONENTS = (
    "weights",
    "adapters",
    "kv_cache",
    "activations",
    "logits",
    "cublas_workspace",
    "trace_difference",
    "allocator_reserve",
    "cuda_context",
    "driver_reserved",
)


@dataclass(frozen=True)
class AdapterCount:
    """One adapter counted by peft on the meta device."""

    spec: AdapterSpec
    params: int  # lora_A / lora_B (+ DoRA magnitudes)
    tensor_shapes: tuple[tuple[tuple[int, ...], int], ...]  # shape -> how many
    saved_copy_params: int  # modules_to_save copies
    saved_copy_tensors: int
    targeted: tuple[LinearGroup, ...]  # the base linears it wraps

    @property
    def tensors(self) -> int:
        return sum(c for _, c in self.tensor_shapes) + self.saved_copy_tensors

    @property
    def targeted_modules(self) -> int:
        """Wrapped linear modules in the whole model."""
        return sum(g.count for g in self.targeted)


@dataclass(frozen=True)
class ServeModel:
    """The model of a serving plan, counted once: the base and each adapter."""

    spec: ModelSpec
    base: ModelInventory
    adapters: tuple[AdapterCount, ...]
    layout: CacheLayout


def _training_plan(plan: ServePlan, adapter: AdapterSpec | None) -> TrainingPlan:
    if adapter is None:
        return TrainingPlan(model=plan.model, method="full")
    return TrainingPlan(
        model=plan.model,
        method="lora",
        rank=adapter.rank,
        alpha=adapter.alpha,
        targets=adapter.targets,
        dora=adapter.dora,
        modules_to_save=adapter.modules_to_save,
    )


def prepare_serving(plan: ServePlan) -> ServeModel:
    """Resolve ``plan.model`` and count the base and every distinct adapter shape."""
    spec = resolve_model(plan.model)
    base = build_inventory(spec.config_dict, _training_plan(plan, None), where=spec.name)
    counted: dict[tuple[Any, ...], AdapterCount] = {}
    adapters = []
    for adapter in plan.adapters:
        key = (adapter.rank, adapter.targets, adapter.dora, adapter.modules_to_save)
        if key not in counted:
            inv = build_inventory(spec.config_dict, _training_plan(plan, adapter), where=spec.name)
            counted[key] = AdapterCount(
                adapter,
                inv.adapter_params,
                inv.trainable_shapes,
                inv.saved_copy_params,
                sum(c for _, c in inv.saved_copy_shapes),
                tuple(g for g in inv.linears if g.lora),
            )
        adapters.append(AdapterCount(adapter, *_fields(counted[key])))
    layout = cache_layout(spec.config, base.num_key_value_heads, base.head_dim)
    return ServeModel(spec, base, tuple(adapters), layout)


def _fields(count: AdapterCount) -> tuple[Any, ...]:
    return (
        count.params,
        count.tensor_shapes,
        count.saved_copy_params,
        count.saved_copy_tensors,
        count.targeted,
    )


# -- weights -----------------------------------------------------------------------------------
def base_weight_bytes(base: ModelInventory, plan: ServePlan) -> int:
    """One copy of the base as ``from_pretrained`` loads it for inference: k-bit linears in
    bitsandbytes storage, every other parameter in ``--dtype`` (no
    ``prepare_model_for_kbit_training``, so no fp32 upcast)."""
    d = DTYPE_BYTES[plan.dtype]
    if not plan.is_kbit:
        return base.total_params * d
    quantized = 0
    for g in base.linears:
        if g.quantizable:
            per = (
                int8_linear_bytes(g.out_features, g.in_features)
                if plan.quant == "int8"
                else four_bit_linear_bytes(g.out_features, g.in_features, plan.double_quant)
            )
            quantized += per * g.count
    return quantized + (base.total_params - base.params_by_role["linear"]) * d


def adapter_memory_bytes(adapter: AdapterCount, dtype: str) -> int:
    """An unmerged adapter on the card: peft loads LoRA tensors in fp32
    (``autocast_adapter_dtype=True`` upcasts bf16/fp16 ones), ``modules_to_save`` copies in
    the base dtype."""
    lora = sum(alloc_bytes(_numel(s) * 4, c) for s, c in adapter.tensor_shapes)
    return lora + adapter.saved_copy_params * DTYPE_BYTES[dtype]


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def merge_transient_bytes(adapter: AdapterCount, plan: ServePlan) -> int:
    """Merging the largest targeted linear: the 16-bit dequantized weight (k-bit only), the
    fp32 delta ``B @ A * scaling`` and the fp32 sum peft quantizes again (k-bit) or adds."""
    widest = max((g.weight_params for g in adapter.targeted), default=0)
    dequantized = alloc_bytes(widest * 2) if plan.is_kbit else 0
    return dequantized + alloc_bytes(widest * 4, 2 if plan.is_kbit else 1)


# -- disk --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskSizes:
    adapter_bytes: tuple[int, ...]  # each adapter's adapter_model.safetensors
    merged_checkpoint_bytes: int  # one merged model saved in --dtype (16-bit for bf16/fp16)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter_bytes": list(self.adapter_bytes),
            "adapters_total_bytes": sum(self.adapter_bytes),
            "merged_checkpoint_bytes": self.merged_checkpoint_bytes,
        }


def _safetensors_bytes(data_bytes: int, tensors: int) -> int:
    header = SAFETENSORS_HEADER_BYTES_PER_TENSOR * tensors
    return SAFETENSORS_LENGTH_BYTES + header + data_bytes


def disk_sizes(model: ServeModel, plan: ServePlan) -> DiskSizes:
    """Adapters as peft's ``save_pretrained`` writes them (fp32 tensors, safetensors), and a
    merged model saved in ``--dtype`` (``merge_and_unload`` onto a 16-bit base, then
    ``save_pretrained``; a tied head is saved once)."""
    d = DTYPE_BYTES[plan.dtype] if plan.dtype != "fp32" else 4
    adapters = tuple(
        _safetensors_bytes(a.params * 4 + a.saved_copy_params * 4, a.tensors)
        for a in model.adapters
    )
    tensors = sum(c for _, c in model.base.trainable_shapes)
    merged = _safetensors_bytes(model.base.total_params * d, tensors)
    return DiskSizes(adapters, merged)


# -- the estimate ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeMemory:
    """Bytes of one serving set-up at its peak; names shared with the training result."""

    plan: ServePlan
    model_name: str
    components: dict[str, int]  # COMPONENTS -> bytes at the peak, summing to device_total
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_total_bytes: int
    peak_phase: str  # prefill, decode or merge
    phase_allocated_bytes: dict[str, int]
    kv_cache_bytes: int  # the cache at the end of the request (context - 1 tokens)
    kv_cache_bytes_per_token: int  # one more token of one sequence, all layers (no window cap)
    base_params: int
    adapter_params: tuple[int, ...]
    disk: DiskSizes
    assumptions: tuple[str, ...] = field(default=())
    # which model gave peak allocated and reserved: "simulated" (generate traced on fake
    # tensors and replayed through the caching-allocator model, servereplay.py) or
    # "approximate" (the rules below and the calibrated fraction for the allocator's slack)
    allocator_model: str = "approximate"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "device_total_bytes": self.device_total_bytes,
            "allocator_model": self.allocator_model,
            "peak_phase": self.peak_phase,
            "phase_allocated_bytes": dict(self.phase_allocated_bytes),
            "components": dict(self.components),
            "kv_cache_bytes": self.kv_cache_bytes,
            "kv_cache_bytes_per_token": self.kv_cache_bytes_per_token,
            "total_params": self.base_params,
            "adapter_params": list(self.adapter_params),
            "disk": self.disk.to_dict(),
            "serve_plan": self.plan.to_dict(),
            "assumptions": list(self.assumptions),
        }


def _lora_rank(model: ServeModel, plan: ServePlan) -> int:
    if plan.mode == "merged" or not model.adapters:
        return 0
    return max(a.spec.rank for a in model.adapters)


def estimate_serve_memory(
    model: ServeModel,
    plan: ServePlan,
    calibration: Calibration,
    simulation: ServeSimulation | None = None,
) -> ServeMemory:
    """The memory of ``plan`` on one GPU: with ``simulation`` (the run traced and replayed,
    ``servereplay.simulate_serving``), its peaks; without, the rules below (a pure function
    of the counts) and the calibrated slack. The components are the rules' either way, the
    difference to the simulated peak as ``trace_difference``."""
    base, layout, dtype = model.base, model.layout, plan.dtype
    weights = base_weight_bytes(base, plan) * plan.model_copies
    adapters = (
        0 if plan.mode == "merged" else sum(adapter_memory_bytes(a, dtype) for a in model.adapters)
    )
    workspace = calibration.cublas_workspace_bytes // 2  # forward thread only: no autograd
    resident = weights + adapters + workspace
    eager, rank = plan.attn == "eager", _lora_rank(model, plan)
    per_copy = plan.copy_batch  # merged copies split the batch

    def shape(tokens: int, attended: int) -> ForwardShape:
        return ForwardShape(per_copy, tokens, attended, dtype, eager, plan.is_kbit, rank)

    positions = 1 if plan.logits == "last" else plan.prompt_tokens
    prefill_kv = kv_prefill_bytes(
        layout, plan.batch, plan.prompt_tokens, plan.cache, plan.cache_tokens, dtype
    )
    prefill_layer = layer_transient_bytes(base, shape(plan.prompt_tokens, plan.prompt_tokens))
    prefill_logits = logits_bytes(base, per_copy, positions, dtype)
    prefill_act = max(
        prefill_layer,
        prefill_logits
        + alloc_bytes(per_copy * plan.prompt_tokens * base.hidden_size * DTYPE_BYTES[dtype], 2),
    )
    decode_kv = kv_cache_bytes(layout, plan.batch, plan.cache_tokens, dtype)
    decode_act = layer_transient_bytes(base, shape(1, plan.cache_tokens))
    decode_act += kv_update_transient_bytes(layout, per_copy, plan.cache_tokens, plan.cache, dtype)
    decode_logits = logits_bytes(base, per_copy, 1, dtype)
    merge = 0
    if plan.mode == "merged" and model.adapters:
        merge = max(merge_transient_bytes(a, plan) for a in model.adapters)
        merge += max(adapter_memory_bytes(a, dtype) for a in model.adapters)
    phases = {
        "prefill": resident + prefill_kv + prefill_act,
        "decode": resident + decode_kv + decode_act + decode_logits,
        "merge": weights + merge,
    }
    peak_phase = max(phases, key=lambda k: phases[k])
    if simulation is not None and simulation.allocated_peak_phase in phases:
        peak_phase = simulation.allocated_peak_phase
    parts = {
        "prefill": (prefill_kv, prefill_act, 0),
        "decode": (decode_kv, decode_act, decode_logits),
        "merge": (0, merge, 0),
    }[peak_phase]
    peak = phases[peak_phase]
    reserve = allocator_reserve_bytes(peak, calibration)
    if simulation is not None:
        peak = simulation.peak_allocated_bytes
        reserve = max(simulation.peak_reserved_bytes - peak, 0)
    context = calibration.cuda_runtime_bytes + (
        calibration.eager_attention_runtime_delta_bytes if eager else 0
    )
    context += calibration.bnb_int8_runtime_bytes if plan.quant == "int8" else 0
    components = {
        "weights": weights,
        "adapters": adapters,
        "kv_cache": parts[0],
        "activations": parts[1],
        "logits": parts[2],
        "cublas_workspace": workspace if peak_phase != "merge" else 0,
        "trace_difference": 0,
        "allocator_reserve": reserve,
        "cuda_context": context,
        "driver_reserved": calibration.driver_reserved_bytes,
    }
    if peak_phase == "merge":
        components["activations"] += resident - weights - adapters
    if simulation is not None:  # what the rules' components miss of the simulated peak
        by_rule = sum(
            components[name] for name in COMPONENTS[: COMPONENTS.index("trace_difference")]
        )
        components["trace_difference"] = peak - by_rule
    total = sum(components.values())
    return ServeMemory(
        plan=plan,
        model_name=model.spec.name,
        components=components,
        peak_allocated_bytes=peak,
        peak_reserved_bytes=peak + reserve,
        device_total_bytes=total,
        peak_phase=peak_phase,
        phase_allocated_bytes=phases
        if simulation is None
        else {k: v for k, v in simulation.phase_allocated_bytes.items() if v},
        kv_cache_bytes=decode_kv,
        kv_cache_bytes_per_token=layout.token_bytes(dtype) * layout.num_layers,
        base_params=base.total_params,
        adapter_params=tuple(a.params + a.saved_copy_params for a in model.adapters),
        disk=disk_sizes(model, plan),
        assumptions=serve_assumptions(model, plan, simulation),
        allocator_model="simulated" if simulation is not None else "approximate",
    )


def serve_assumptions(
    model: ServeModel, plan: ServePlan, simulation: ServeSimulation | None = None
) -> tuple[str, ...]:
    """The facts the serving numbers rest on, in words."""
    notes = [
        f"transformers generate: batch {plan.batch} prefilled at once "
        f"({plan.prompt_tokens:,} prompt tokens each), then {plan.new_tokens:,} decoding steps; "
        f"{plan.cache} cache (cache_utils.py), logits of the "
        + ("last position only (logits_to_keep=1)" if plan.logits == "last" else "every position"),
        f"KV cache GQA-aware: {model.layout.num_key_value_heads} KV heads x head_dim "
        f"{model.layout.head_dim} per layer in {plan.dtype}; "
        + (
            f"{model.layout.sliding_layers} of {model.layout.num_layers} layers slide over "
            f"{max(w or 0 for w in model.layout.windows):,} tokens (a dynamic cache still holds "
            "the whole prompt in them right after prefill)"
            if model.layout.sliding_layers
            else "every layer attends to the full context"
        ),
        *(
            (
                "peak allocated and reserved bytes from the whole run the harness measures "
                "(from_pretrained, the adapters, 1 warm-up and 3 timed rounds of generate) "
                "traced on fake tensors and replayed through the caching-allocator model "
                f"(peak in {simulation.allocated_peak_phase}); the components are the rules', "
                "the rest is trace_difference",
                *(
                    (
                        f"{plan.model_copies} merged copies in one process: the harness "
                        "measures one (serve_limits); the others are loaded, given their "
                        "adapter and merged before it as it is (each with the first adapter's "
                        "shape) and hold no cache while it decodes its "
                        f"{plan.copy_batch} sequences (the copies decode in turn)",
                    )
                    if plan.model_copies > 1
                    else ()
                ),
            )
            if simulation is not None
            else (
                "APPROXIMATE: activations by rule, the largest moment inside one decoder layer "
                "without autograd (memory/inference.py), not traced",
                "APPROXIMATE allocator slack: the training path's calibrated fallback fraction "
                "of peak allocated (data/calibration.json allocator_reserved_fraction), not "
                "simulated (--allocator-model approximate)",
            )
        ),
        "CUDA context, kernel modules and driver reserve as measured on the H200 for training; "
        "one cuBLAS workspace (the forward thread; no autograd thread)",
    ]
    if plan.adapters:
        notes.append(
            {
                "merged": f"{len(plan.adapters)} adapter(s) merged, each into its own copy of the "
                f"base ({plan.model_copies} copies on the card, each decoding its share of the "
                "batch)"
                + (
                    f"; peft 0.21 merges onto {plan.quant} weights by dequantizing, adding the "
                    "delta and quantizing again (lora/bnb.py merge): the merged model stays "
                    f"{plan.quant} and carries its rounding"
                    if plan.is_kbit
                    else ""
                ),
                "unmerged": f"{len(plan.adapters)} adapter(s) kept beside one base in fp32 "
                "(peft autocast_adapter_dtype), one active per batch",
                "multi": f"{len(plan.adapters)} adapter(s) kept beside one base in fp32, mixed in "
                "one batch (peft adapter_names=): each distinct adapter runs its own small matmuls",
            }[plan.mode]
        )
    return tuple(notes)
