"""Matmul FLOPs of one training step, counted from the model's own layers.

Counted from the ``ModelInventory`` (real module shapes) and the plan, not
from ``6·N·T``. Conventions, one line each in ``FLOP_RULES``:

* A matmul of ``(m × k) @ (k × n)`` is ``2·m·k·n`` FLOPs (a multiply-add is
  two). Only matmuls count: bias adds, norms, activations, RoPE, softmax,
  cross-entropy and the optimizer are memory-bound and priced as time
  elsewhere (``throughput.py``), not as FLOPs.
* ``T = batch_size · seq_len`` tokens per micro-batch; a step is
  ``grad_accum`` micro-batches on each GPU.
* Forward of a linear: ``2·T·in·out``. Backward: the input gradient
  ``2·T·in·out`` when the linear's input requires grad, plus the weight
  gradient ``2·T·in·out`` when the weight trains (full fine-tuning).
* Input gradients are needed wherever any earlier parameter trains. With
  adapters and no gradient checkpointing the embedding output does not require
  grad, so in the *first* decoder layer the linears before the first adapter
  compute no input gradient, and neither do their LoRA ``A`` matrices.
  transformers' checkpointing calls ``enable_input_require_grads`` and turns
  this off. Applied only to the sequential block layouts in
  ``SEQUENTIAL_MODEL_TYPES``; elsewhere every input gradient is counted.
* LoRA on ``in → out`` with rank ``r``: forward ``2·T·r·(in+out)``; backward
  the ``A`` and ``B`` weight gradients ``2·T·r·(in+out)``, the gradient through
  ``B`` ``2·T·r·out`` and, when the input requires grad, through ``A``
  ``2·T·r·in``.
* Output head: forward ``2·T·hidden·vocab`` on every position; backward the
  input gradient, plus the weight gradient in full fine-tuning (tied or not).
* Attention scores ``QKᵀ`` and context ``PV``: ``2·B·heads·head_dim`` FLOPs
  per (query, key) pair each. ``eager`` multiplies the full ``S×S`` matrix;
  ``sdpa`` and ``flash_attention_2`` run causal kernels that skip masked
  blocks, counted as the ``S·(S+1)/2`` unmasked pairs. Backward: fused
  kernels (sdpa, flash) recompute ``QKᵀ`` and do four gradient matmuls (dV,
  dP, dQ, dK) = 2.5 × forward; eager does the four gradient matmuls that are
  needed (2 × forward in every layer after the first).
* Gradient checkpointing recomputes the forward of every decoder layer
  (linears, adapters, attention) once in backward; the head is not recomputed.
* MoE: every token runs ``experts_per_token`` of ``num_experts`` experts, so
  expert weights count ``k/E`` of their size; the router counts in full.
* Parameters the inventory cannot place (non-``nn.Linear`` subclasses such as
  ``FalconLinear``, adapters on non-Linear tensors) are per-token matmul
  weights of the decoder layers: ``2·T`` per parameter forward, and backward
  as a linear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from vramcalc.inventory import LinearGroup, ModelInventory
from vramcalc.training_plan import TrainingPlan

FLOP_RULES = (
    "matmul FLOPs only, 2 per multiply-add; elementwise ops are priced as memory time, not FLOPs",
    "linear forward 2·T·in·out; backward input grad 2·T·in·out where the input requires grad, "
    "weight grad 2·T·in·out where the weight trains",
    "adapters without checkpointing: first-layer linears before the first adapter compute no input grad",
    "LoRA forward 2·T·r·(in+out); backward 2·T·r·(in+out) weight grads + 2·T·r·out through B "
    "(+ 2·T·r·in through A where the input requires grad)",
    "head: forward 2·T·hidden·vocab, backward input grad (+ weight grad in full fine-tuning)",
    "attention: QKᵀ and PV, 2·B·heads·head_dim per pair each; eager = S² pairs, sdpa/flash causal "
    "kernels = S(S+1)/2 pairs; backward 2.5× (fused: QKᵀ recompute + 4 grads) or 2× (eager)",
    "gradient checkpointing: one more forward of every decoder layer (not the head)",
    "MoE: experts count experts_per_token/num_experts of their weights; router in full",
)

#: Block layouts whose first layer is attention-input → attention → output
#: projection → MLP, in that order (not parallel attention/MLP blocks).
SEQUENTIAL_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "opt",
        "phi3",
        "olmo",
        "olmo2",
        "granite",
    }
)
#: Position of a linear's input inside a sequential decoder layer.
_STAGE = {
    "q_proj": 0,
    "k_proj": 0,
    "v_proj": 0,
    "qkv_proj": 0,
    "o_proj": 2,
    "out_proj": 2,
    "gate_proj": 3,
    "up_proj": 3,
    "gate_up_proj": 3,
    "fc1": 3,
    "gate": 3,
    "down_proj": 4,
    "fc2": 4,
}
_MLP_STAGE = 3
_QKV = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "qkv_proj": "qkv"}
CAUSAL_KERNELS = frozenset({"sdpa", "flash_attention_2"})
FUSED_BACKWARD_MATMULS = 5  # flash/sdpa: QKᵀ recomputed + dV, dP, dQ, dK (2.5 × the 2 forward)
EAGER_BACKWARD_MATMULS = 4  # dQ, dK, dP, dV


@dataclass(frozen=True)
class StepFlops:
    """Matmul FLOPs of one optimizer step on one GPU (``grad_accum`` micro-batches)."""

    tokens: int  # seq_len · batch_size · grad_accum, on this GPU
    forward_linear: int  # base linears of the model (router, experts, opaque weights), not the head
    backward_linear: int
    lm_head_forward: int
    lm_head_backward: int
    lora_forward: int
    lora_backward: int
    attention_forward: int
    attention_backward: int
    recompute: int  # gradient checkpointing's second forward of the decoder layers
    first_layer_rule: bool  # the first-layer input-gradient rule was applied
    notes: tuple[str, ...] = ()

    @property
    def lm_head(self) -> int:
        return self.lm_head_forward + self.lm_head_backward

    @property
    def lora(self) -> int:
        return self.lora_forward + self.lora_backward

    @property
    def attention(self) -> int:
        return self.attention_forward + self.attention_backward

    @property
    def forward(self) -> int:
        return (
            self.forward_linear + self.lm_head_forward + self.lora_forward + self.attention_forward
        )

    @property
    def backward(self) -> int:
        return (
            self.backward_linear
            + self.lm_head_backward
            + self.lora_backward
            + self.attention_backward
        )

    @property
    def total(self) -> int:
        """Everything the GPU multiplies, recompute included ("hardware FLOPs")."""
        return self.forward + self.backward + self.recompute

    @property
    def model_flops(self) -> int:
        """What the method needs, without recompute ("model FLOPs", PaLM appendix B)."""
        return self.forward + self.backward

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "forward_linear_flops": self.forward_linear,
            "backward_linear_flops": self.backward_linear,
            "lm_head_flops": self.lm_head,
            "lora_flops": self.lora,
            "attention_flops": self.attention,
            "recompute_flops": self.recompute,
            "forward_flops": self.forward,
            "backward_flops": self.backward,
            "model_flops": self.model_flops,
            "total_flops": self.total,
            "first_layer_rule": self.first_layer_rule,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class _Weights:
    """One family of base weights, with the share of instances computing an input gradient."""

    params: Fraction  # weight elements over all instances (the active share for experts)
    in_layers: bool
    input_grad_share: Fraction


def _active_share(group: LinearGroup, inventory: ModelInventory) -> Fraction:
    """``k/E`` for expert linears stored as one ``nn.Linear`` per expert, else 1."""
    experts = inventory.num_experts
    if experts and inventory.experts_per_token and group.count == inventory.num_layers * experts:
        return Fraction(inventory.experts_per_token, experts)
    return Fraction(1)


def _expert_share(inventory: ModelInventory) -> Fraction:
    if inventory.num_experts and inventory.experts_per_token:
        return Fraction(inventory.experts_per_token, inventory.num_experts)
    return Fraction(1)


def _opaque_params(inventory: ModelInventory) -> tuple[int, int]:
    """(expert/opaque weight params, router params) that no ``LinearGroup`` describes."""
    in_other = sum(
        g.count * (g.weight_params + (g.out_features if g.bias else 0))
        for g in inventory.linears
        if not g.quantizable
    )
    residual = max(inventory.params_by_role.get("other", 0) - in_other, 0)
    if not inventory.num_experts or not residual:
        return residual, 0
    router_is_linear = any(g.out_features == inventory.num_experts for g in inventory.linears)
    router = (
        0
        if router_is_linear
        else inventory.num_layers * inventory.num_experts * inventory.hidden_size
    )
    return max(residual - router, 0), min(router, residual)


def _lora_group_params(group: LinearGroup, rank: int) -> int:
    return rank * (group.in_features + group.out_features) * group.count


@dataclass(frozen=True)
class _FirstLayer:
    """Which parts of the first decoder layer get gradients (sequential blocks)."""

    first_trainable_stage: float  # inf when nothing in the layer trains
    qkv_grad: dict[str, bool]

    def input_grad(self, stage: int) -> bool:
        return stage > self.first_trainable_stage


def _first_layer(
    inventory: ModelInventory, plan: TrainingPlan, residual_adapters: int
) -> _FirstLayer | None:
    """The first-layer rule, or ``None`` where every input gradient is computed."""
    if not plan.uses_adapters or plan.gradient_checkpointing:
        return None
    if inventory.model_type not in SEQUENTIAL_MODEL_TYPES:
        return None
    layer_groups = [g for g in inventory.linears if g.count % max(inventory.num_layers, 1) == 0]
    if any(g.name not in _STAGE for g in layer_groups):
        return None
    opaque, _ = _opaque_params(inventory)
    if opaque and not inventory.num_experts:
        return None  # weights we cannot place in the block
    stages = [_STAGE[g.name] for g in layer_groups if g.lora]
    if residual_adapters:
        if not inventory.num_experts:
            return None
        stages.append(_MLP_STAGE)
    first = float(min(stages)) if stages else float("inf")
    lora_names = {g.name for g in layer_groups if g.lora}
    qkv = {"q": False, "k": False, "v": False}
    for name, part in _QKV.items():
        if name in lora_names:
            for key in ("q", "k", "v") if part == "qkv" else (part,):
                qkv[key] = True
    return _FirstLayer(first, qkv)


def _attention(
    inventory: ModelInventory, plan: TrainingPlan, first: _FirstLayer | None
) -> tuple[int, int]:
    """(forward, backward) FLOPs of the score and context matmuls, one micro-batch."""
    s = plan.seq_len
    pairs = s * (s + 1) // 2 if plan.attn in CAUSAL_KERNELS else s * s
    per_matmul = 2 * plan.batch_size * inventory.num_attention_heads * inventory.head_dim * pairs
    layers = inventory.num_layers
    forward = 2 * per_matmul * layers
    fused = plan.attn in CAUSAL_KERNELS
    per_layer_backward = (FUSED_BACKWARD_MATMULS if fused else EAGER_BACKWARD_MATMULS) * per_matmul
    backward = per_layer_backward * layers
    if first is not None and layers:
        q, k, v = (first.qkv_grad[key] for key in ("q", "k", "v"))
        if fused:
            layer0 = per_layer_backward if (q or k or v) else 0
        else:  # eager: dQ, dK from the scores; dP (needs q or k), dV from the context
            layer0 = per_matmul * (int(q) + int(k) + int(q or k) + int(v))
        backward += layer0 - per_layer_backward
    return forward, backward


def _residual_adapters(inventory: ModelInventory, plan: TrainingPlan) -> int:
    """Adapter parameters on no ``LinearGroup`` (3-D expert tensors, Linear subclasses)."""
    if not plan.uses_adapters:
        return 0
    in_groups = sum(_lora_group_params(g, plan.adapter_rank) for g in inventory.linears if g.lora)
    if plan.method == "adalora":  # Λ = lora_E (r, 1) per adapted module
        in_groups += plan.adapter_rank * sum(g.count for g in inventory.linears if g.lora)
    return max(inventory.adapter_params - in_groups, 0)


def _share_rule(
    inventory: ModelInventory, plan: TrainingPlan
) -> tuple[_FirstLayer | None, Callable[[int | None], Fraction]]:
    """The first-layer rule (or None) and stage -> share of instances computing an input grad."""
    first = _first_layer(inventory, plan, _residual_adapters(inventory, plan))
    layers = max(inventory.num_layers, 1)

    def share(stage: int | None) -> Fraction:
        if first is None or stage is None or first.input_grad(stage):
            return Fraction(1)
        return 1 - Fraction(1, layers)  # every layer but the first

    return first, share


def linear_input_grad_shares(inventory: ModelInventory, plan: TrainingPlan) -> dict[str, Fraction]:
    """Per ``LinearGroup`` name: the share of its modules whose backward computes an input grad."""
    _, share = _share_rule(inventory, plan)
    layers = max(inventory.num_layers, 1)
    return {
        g.name: share(_STAGE.get(g.name) if g.count % layers == 0 else None)
        for g in inventory.linears
    }


def estimate_flops(inventory: ModelInventory, plan: TrainingPlan) -> StepFlops:
    """Matmul FLOPs of one optimizer step of ``plan`` on one GPU, by part."""
    tokens = plan.batch_size * plan.seq_len
    layers = max(inventory.num_layers, 1)
    full = plan.method == "full"
    notes: list[str] = []
    residual_adapters = _residual_adapters(inventory, plan)
    first, input_grad_share = _share_rule(inventory, plan)

    weights: list[_Weights] = []
    lora_fwd = lora_bwd = Fraction(0)
    for group in inventory.linears:
        in_layers = group.count % layers == 0
        grads = input_grad_share(_STAGE.get(group.name) if in_layers else None)
        count = group.count * _active_share(group, inventory)
        weights.append(_Weights(group.weight_params * count, in_layers, grads))
        if group.lora:
            r = plan.adapter_rank
            fwd = 2 * tokens * r * (group.in_features + group.out_features) * count
            lora_fwd += fwd
            lora_bwd += fwd + 2 * tokens * r * count * (
                group.out_features + group.in_features * grads
            )
        if not in_layers:
            notes.append(
                f"{group.name} ({group.count}x) sits outside the decoder layers: not recomputed"
            )

    opaque, router = _opaque_params(inventory)
    moe_stage = _MLP_STAGE if inventory.num_experts else None
    if opaque:
        weights.append(
            _Weights(opaque * _expert_share(inventory), True, input_grad_share(moe_stage))
        )
        if not inventory.num_experts:
            notes.append(
                f"{opaque:,} parameters outside nn.Linear counted as per-token matmul weights "
                "(e.g. FalconLinear)"
            )
    if router:
        weights.append(_Weights(Fraction(router), True, input_grad_share(_MLP_STAGE)))
    if residual_adapters:
        fwd = 2 * tokens * residual_adapters * _expert_share(inventory)
        lora_fwd += fwd
        lora_bwd += fwd * (1 + input_grad_share(moe_stage))  # weight grads + input grads
        notes.append(
            f"{residual_adapters:,} adapter parameters on non-Linear tensors counted as per-token matmuls"
        )

    weight_grad = 1 if full else 0
    forward_linear = sum(2 * tokens * w.params for w in weights)
    backward_linear = sum(
        2 * tokens * w.params * (w.input_grad_share + weight_grad) for w in weights
    )
    layer_forward = sum(2 * tokens * w.params for w in weights if w.in_layers)

    head_fwd = 2 * tokens * inventory.hidden_size * inventory.vocab_size
    head_bwd = head_fwd * (1 + weight_grad)
    attn_fwd, attn_bwd = _attention(inventory, plan, first)
    recompute = layer_forward + lora_fwd + attn_fwd if plan.gradient_checkpointing else 0

    accum = plan.grad_accum
    return StepFlops(
        tokens=tokens * accum,
        forward_linear=round(forward_linear * accum),
        backward_linear=round(backward_linear * accum),
        lm_head_forward=head_fwd * accum,
        lm_head_backward=head_bwd * accum,
        lora_forward=round(lora_fwd * accum),
        lora_backward=round(lora_bwd * accum),
        attention_forward=attn_fwd * accum,
        attention_backward=attn_bwd * accum,
        recompute=round(recompute * accum),
        first_layer_rule=first is not None,
        notes=tuple(dict.fromkeys(notes)),
    )
