"""Activation memory of the decoder layers under the project recipe: ``estimate_activations``.

The rule is an *abstract autograd*: each architecture's decoder layer is
written out op by op, as transformers 5 runs it, over symbolic tensors that
carry only ``numel``, dtype, ``requires_grad`` and an identity. Every op
applies the autocast policy of CUDA (``linear``/``matmul``/SDPA cast their
floating inputs to bf16, a fresh copy per call, except fp32 leaf weights
whose casts are cached for the forward) and the save rules of
``tools/autograd/derivatives.yaml`` (``mm`` keeps its input only when the
weight needs a gradient and the weight only when the input does; ``mul``
keeps each side only for the other's gradient; ``silu``/``gelu`` keep their
input, ``relu``/``softmax``/``rsqrt`` their output, flash attention keeps q,
k, v, out and the fp32 logsumexp). What a layer keeps is the union of the
storages saved, deduplicated, each rounded up to ``round_to`` bytes like the
CUDA caching allocator. Because ``requires_grad`` flows through the graph,
the first decoder layer of a LoRA run (its input, the frozen embedding
output, needs no gradient) saves less than the others, k-bit linears keep no
input (bitsandbytes ``MatMul4Bit`` saves only the packed weight), and
``prepare_model_for_kbit_training``'s fp32 norms and embeddings make the
residual stream, q/k after RoPE (fp32 cos/sin) and the k-bit projections'
outputs (``Linear4bit`` returns ``.to(input dtype)``) fp32.

Sources: transformers ``models/*/modeling_*.py`` (5.x), peft
``tuners/lora/layer.py`` and ``lora/bnb.py`` (0.21), bitsandbytes
``autograd/_functions.py`` (0.50), torch ``utils/checkpoint.py`` and
``ATen/autocast_mode.cpp``. ``tests/memory/test_activations.py`` checks every number
against ``tests/memory/memtrace.py`` (a test instrument) on real tiny models run on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramcalc.inventory import ModelInventory
from vramcalc.memory.autograd import ITEMSIZE, ROUND_TO, Graph, T, round_up
from vramcalc.memory.layers import MODELLED, Layer, Recipe, recipe_for
from vramcalc.training_plan import TrainingPlan

__all__ = [
    "ITEMSIZE",
    "ROUND_TO",
    "ActivationEstimate",
    "Graph",
    "estimate_activations",
    "recipe_for",
]


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes that the decoder stack holds for backward; see the module docstring."""

    per_layer_saved_bytes: int  # one decoder layer whose input needs a gradient, no checkpointing
    first_layer_saved_bytes: int  # layer 0 (LoRA without checkpointing: input needs no gradient)
    shared_saved_bytes: int  # saved once for all layers (RoPE cos/sin)
    final_norm_saved_bytes: int  # the final norm (its input is the last layer's output)
    layers_saved_bytes: (
        int  # all of the above live at the end of forward (checkpointing: kept inputs)
    )
    checkpoint_input_bytes: int  # per layer under checkpointing: the kept layer input (0 otherwise)
    recompute_layer_bytes: int  # checkpointing: one layer's saved tensors re-made in backward
    backward_transient_bytes: int  # largest short-lived extra inside one layer's backward
    forward_transient_bytes: int  # largest short-lived extra inside one layer's forward
    attention_mask_bytes: int  # model-level mask live during forward (eager attention)
    exact: bool  # False where the rule approximates (int8 outliers, unknown architecture)
    rule: str


# -- the estimate ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerRun:
    """One abstract layer run: its graph and what it saved."""

    graph: Graph
    layer: Layer
    input: T
    shared_keys: frozenset[int]

    @property
    def saved_bytes(self) -> int:
        return self.graph.bytes(
            t for t in self.graph.saved.values() if t.key not in self.shared_keys
        )

    @property
    def shared_bytes(self) -> int:
        return self.graph.bytes(t for t in self.graph.saved.values() if t.key in self.shared_keys)

    @property
    def saves_input(self) -> bool:
        return self.input.key in self.graph.saved


def run_layer(
    inventory: ModelInventory,
    recipe: Recipe,
    input_requires_grad: bool = True,
    round_to: int = ROUND_TO,
    final_norm: bool = False,
) -> LayerRun:
    """Run one abstract decoder layer (or the final norm) and keep its graph."""
    r = recipe
    g = Graph(r.low, round_to)
    rope = inventory.model_type != "opt"
    cos = g.new(r.seq * inventory.head_dim, r.res, False) if rope else None
    sin = g.new(r.seq * inventory.head_dim, r.res, False) if rope else None
    layer = Layer(g, inventory, r, cos, sin)
    x = g.new(r.tokens * inventory.hidden_size, r.res, input_requires_grad)
    layer.final_norm(x) if final_norm else layer.forward(x)
    shared = frozenset(t.key for t in (cos, sin) if t is not None)
    return LayerRun(g, layer, x, shared)


def estimate_activations(
    inventory: ModelInventory,
    plan: TrainingPlan,
    *,
    round_to: int = ROUND_TO,
) -> ActivationEstimate:
    """Activation bytes of ``inventory``'s decoder stack under ``plan`` (see module docstring).

    The activation function and dropout rates are the inventory's config facts.
    """
    r = recipe_for(inventory, plan)
    layers = inventory.num_layers
    steady = run_layer(inventory, r, True, round_to)
    # LoRA without checkpointing: the frozen embedding's output needs no gradient; with
    # checkpointing transformers calls enable_input_require_grads() and it does.
    first_rg = r.full or plan.gradient_checkpointing
    first = steady if first_rg else run_layer(inventory, r, False, round_to)
    final = run_layer(inventory, r, True, round_to, final_norm=True)
    per_layer = steady.saved_bytes
    first_layer = first.saved_bytes
    shared = max(steady.shared_bytes, first.shared_bytes)
    final_bytes = final.saved_bytes
    input_bytes = round_up(steady.input.nbytes, round_to)
    if plan.gradient_checkpointing:
        # non-reentrant checkpoint keeps each layer's inputs (hidden states, cos, sin) and
        # in backward re-creates one layer's saved tensors, held until that layer is done
        rope_bytes = steady.graph.bytes(
            t for t in (steady.layer.cos, steady.layer.sin) if t is not None
        )
        position_ids = round_up(
            r.seq * ITEMSIZE["i64"], round_to
        )  # passed to (and kept by) every layer
        layers_saved = layers * input_bytes + rope_bytes + position_ids + final_bytes
        recompute = per_layer - (input_bytes if steady.saves_input else 0) + shared
        checkpoint_input = input_bytes
    else:
        layers_saved = first_layer + (layers - 1) * per_layer + shared + final_bytes
        recompute = 0
        checkpoint_input = 0
    mask = 0
    if r.attn == "eager":
        windows = 2 if inventory.model_type == "gemma2" else 1
        mask = windows * round_up(r.batch * r.seq * r.seq * ITEMSIZE[r.res], round_to)
    forward_transient, backward_transient = _transients(steady, r, inventory)
    head_lora = bool(inventory.output_head) and inventory.output_head in inventory.lora_targets
    linear_adapters = sum(
        grp.count * plan.adapter_rank * (grp.in_features + grp.out_features)
        for grp in inventory.linears
        if grp.lora
    ) + (plan.adapter_rank * (inventory.hidden_size + inventory.vocab_size) if head_lora else 0)
    if plan.method == "adalora":  # + Λ = lora_E (r, 1) per adapted module
        linear_adapters += plan.adapter_rank * (
            sum(grp.count for grp in inventory.linears if grp.lora) + int(head_lora)
        )
    wrapped_params = plan.uses_adapters and (
        inventory.adapter_params != linear_adapters or plan.dora or bool(plan.modules_to_save)
    )
    exact = (
        inventory.model_type in MODELLED
        and r.weight != "int8"
        and not wrapped_params
        and not head_lora
        and plan.method != "adalora"
    )
    return ActivationEstimate(
        per_layer_saved_bytes=per_layer,
        first_layer_saved_bytes=first_layer,
        shared_saved_bytes=shared,
        final_norm_saved_bytes=final_bytes,
        layers_saved_bytes=layers_saved,
        checkpoint_input_bytes=checkpoint_input,
        recompute_layer_bytes=recompute,
        backward_transient_bytes=backward_transient,
        forward_transient_bytes=forward_transient,
        attention_mask_bytes=mask,
        exact=exact,
        rule=_describe(inventory, plan, r, exact, wrapped_params),
    )


def _transients(run: LayerRun, r: Recipe, inv: ModelInventory) -> tuple[int, int]:
    """Short-lived extras inside one layer, beyond what it saved (approximate, see tests).

    Backward, read off the tracer at the peak of a layer's backward: the gradient of the
    residual stream, plus the MLP's three intermediate gradients alive together (of the
    down projection's input, of the activation output, of the up projection; fp32 when the
    k-bit outputs are upcast), or for eager attention the score gradients (bf16 + two fp32),
    plus a k-bit layer's dequantized weight. Forward: the largest of the dequantized
    weight with its input copy, the eager fp32 scores, two MLP intermediates.
    """
    resid = r.tokens * inv.hidden_size * ITEMSIZE[r.res]
    rows = r.tokens * max(inv.experts_per_token, 1)
    mlp_bytes = 4 if r.kbit else ITEMSIZE[r.low]
    inter = rows * inv.intermediate_size * mlp_bytes
    dequant = run.layer.dequant_bytes
    if r.weight == "int8":  # MatMul8bitLt backward: CB dequantized to the input's dtype
        dequant = dequant // ITEMSIZE[r.low] * ITEMSIZE[r.res]
    scores = r.batch * inv.num_attention_heads * r.seq * r.seq if r.attn == "eager" else 0
    forward = max(dequant + resid, 4 * scores, 2 * inter)
    backward = resid + max(3 * inter, (2 + 4 + 4) * scores) + dequant
    return forward, backward


def _describe(
    inv: ModelInventory, plan: TrainingPlan, r: Recipe, exact: bool, wrapped: bool
) -> str:
    parts = [
        f"{inv.model_type}: abstract autograd over one decoder layer (CUDA autocast {r.low}, "
        f"residual stream {r.res}, base weights {r.weight}, attention {r.attn})",
        "each saved storage counted once and rounded up to 512 B",
    ]
    if plan.uses_adapters and not plan.gradient_checkpointing:
        parts.append("layer 0 saves less: its input (frozen embedding output) needs no gradient")
    if plan.gradient_checkpointing:
        parts.append(
            "checkpointing (use_reentrant=False) keeps each layer's input plus cos/sin; backward "
            "re-creates one layer's saved set at a time"
        )
    if r.weight == "int8":
        parts.append(
            "INT8 MatMul8bitLt also keeps outlier columns of its input (data dependent, not counted)"
        )
    if plan.dora:
        parts.append(
            "DoRA's extra saved tensors (base output and magnitude scaling per adapted module) and its "
            "per-step weight-norm temporaries are NOT modelled: activations are an under-estimate"
        )
    if plan.modules_to_save:
        parts.append(
            f"modules_to_save ({', '.join(plan.modules_to_save)}) train whole modules whose inputs are "
            "then saved too; not modelled"
        )
    if wrapped and not (plan.dora or plan.modules_to_save):
        parts.append(
            "adapters on non-Linear parameters (peft ParamWrapper on MoE experts/router) are not "
            "modelled: their merged expert weights are saved too"
        )
    if plan.method == "adalora":
        parts.append(
            f"AdaLoRA's SVD-form branch (x @ (P*Λ)ᵀ @ Qᵀ, scaled in fp32) is modelled as a LoRA "
            f"branch at init_r={plan.adapter_rank}: same saved bf16 copies of x, P·Λ, Q and the "
            "rank-r intermediate; its fp32 output temporary is not"
        )
    if inv.output_head and inv.output_head in inv.lora_targets:
        parts.append(
            f"LoRA on the output head ({inv.output_head}) is not modelled: its fp32 input copy "
            "and rank-r output, and the B x S x V adapter output added to the logits, are missing"
        )
    if not exact and inv.model_type not in MODELLED:
        parts.append(
            f"{inv.model_type} is not written out; the llama layer is used as an approximation"
        )
    return "; ".join(parts) + "."
