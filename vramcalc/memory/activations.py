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
``ATen/autocast_mode.cpp``. ``tests/test_activations.py`` checks every number
against ``vramcalc.memtrace`` on real tiny models run on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vramcalc.inventory import LinearGroup, ModelInventory
from vramcalc.plan import TrainingPlan

ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "i64": 8, "i32": 4, "bool": 1}
ROUND_TO = 512  # CUDA caching allocator granularity (memtrace.CUDA_ALLOCATION_GRANULARITY)


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes that the decoder stack holds for backward; see the module docstring."""

    per_layer_saved_bytes: int  # one decoder layer whose input needs a gradient, no checkpointing
    first_layer_saved_bytes: int  # layer 0 (LoRA without checkpointing: input needs no gradient)
    shared_saved_bytes: int  # saved once for all layers (RoPE cos/sin)
    final_norm_saved_bytes: int  # the final norm (its input is the last layer's output)
    layers_saved_bytes: int  # all of the above live at the end of forward (checkpointing: kept inputs)
    checkpoint_input_bytes: int  # per layer under checkpointing: the kept layer input (0 otherwise)
    recompute_layer_bytes: int  # checkpointing: one layer's saved tensors re-made in backward
    backward_transient_bytes: int  # largest short-lived extra inside one layer's backward
    forward_transient_bytes: int  # largest short-lived extra inside one layer's forward
    attention_mask_bytes: int  # model-level mask live during forward (eager attention)
    exact: bool  # False where the rule approximates (int8 outliers, unknown architecture)
    rule: str


# -- the abstract autograd ------------------------------------------------------------------
@dataclass(frozen=True)
class T:
    """A symbolic tensor: one storage of ``numel`` elements."""

    key: int
    numel: int  # elements of this (possibly view) tensor
    dtype: str
    rg: bool  # requires grad
    param: bool = False
    storage_numel: int = 0  # elements of the storage when this is a view of a larger one

    @property
    def nbytes(self) -> int:
        """Bytes of the storage (what saving a view keeps alive)."""
        return max(self.numel, self.storage_numel) * ITEMSIZE[self.dtype]


def promote(a: str, b: str) -> str:
    if a == b:
        return a
    return "fp32" if "fp32" in (a, b) else a


class Graph:
    """Records the storages autograd saves while an abstract layer runs."""

    def __init__(self, low: str, round_to: int = ROUND_TO) -> None:
        self.low = low
        self.round_to = round_to
        self.saved: dict[int, T] = {}
        self.weight_casts: dict[int, T] = {}
        self.transient = 0  # largest single short-lived forward buffer seen
        self._next = 0

    def new(self, numel: int, dtype: str, rg: bool, param: bool = False) -> T:
        self._next += 1
        return T(self._next, numel, dtype, rg, param)

    def param(self, numel: int, dtype: str, rg: bool) -> T:
        return self.new(numel, dtype, rg, param=True)

    def view(self, t: T, numel: int) -> T:
        """A slice of ``t`` (chunk of a fused projection): same storage, fewer elements."""
        return T(t.key, numel, t.dtype, t.rg, t.param, max(t.numel, t.storage_numel))

    def save(self, *ts: T) -> None:
        for t in ts:
            if not t.param:
                self.saved.setdefault(t.key, t)

    def bytes(self, ts: Any = None) -> int:
        ts = self.saved.values() if ts is None else ts
        return sum(_round(t.nbytes, self.round_to) for t in ts)

    def note_transient(self, nbytes: int) -> None:
        self.transient = max(self.transient, nbytes)

    # elementwise and casts
    def to(self, x: T, dtype: str) -> T:
        return x if x.dtype == dtype else self.new(x.numel, dtype, x.rg)

    def autocast(self, x: T) -> T:
        """CUDA autocast input cast to the low dtype (fp32 leaf weights cached per forward)."""
        if x.dtype == self.low:
            return x
        if x.param and x.rg:
            cast = self.weight_casts.get(x.key)
            if cast is None:
                cast = self.weight_casts[x.key] = self.new(x.numel, self.low, True)
            return cast
        return self.new(x.numel, self.low, x.rg)

    def mul(self, a: T, b: T, numel: int | None = None) -> T:
        if a.rg:
            self.save(b)
        if b.rg:
            self.save(a)
        return self.new(numel or max(a.numel, b.numel), promote(a.dtype, b.dtype), a.rg or b.rg)

    def scale(self, a: T) -> T:  # times a Python number: saves nothing
        return self.new(a.numel, a.dtype, a.rg)

    def add(self, a: T, b: T) -> T:
        return self.new(max(a.numel, b.numel), promote(a.dtype, b.dtype), a.rg or b.rg)

    def act(self, x: T, kind: str, numel: int | None = None) -> T:
        """silu/gelu keep their input; relu (and tanh) keep their output."""
        out = self.new(numel or x.numel, x.dtype, x.rg)
        if x.rg:
            self.save(out if kind == "relu" else x)
        return out

    def dropout(self, x: T, p: float) -> T:
        if p <= 0:
            return x
        mask = self.new(x.numel, "bool", False)
        out = self.new(x.numel, x.dtype, x.rg)
        if x.rg:
            self.save(mask)
        return out

    # matmuls
    def linear(self, x: T, w: T, out_numel: int) -> T:
        xc, wc = self.autocast(x), self.autocast(w)
        if w.rg:
            self.save(xc)
        if x.rg:
            self.save(wc)
        return self.new(out_numel, self.low, x.rg or w.rg)

    def matmul(self, a: T, b: T, out_numel: int) -> T:
        ac, bc = self.autocast(a), self.autocast(b)
        if b.rg:
            self.save(ac)
        if a.rg:
            self.save(bc)
        return self.new(out_numel, self.low, a.rg or b.rg)


def _round(nbytes: int, granularity: int) -> int:
    if nbytes <= 0 or granularity <= 1:
        return max(nbytes, 0)
    return math.ceil(nbytes / granularity) * granularity


# -- the recipe's facts ---------------------------------------------------------------------
# transformers model types whose decoder layer is written out below
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "mixtral", "phi3")
MODELLED = (*LLAMA_LIKE, "opt")
# models that do not support SDPA fall back to eager attention (gemma2: softcapping)
NO_SDPA = ("gemma2",)


@dataclass(frozen=True)
class Recipe:
    """Dtypes and sizes that decide what a layer keeps (derived from inventory + plan)."""

    batch: int
    seq: int
    low: str  # autocast dtype
    res: str  # residual stream / norm / embedding dtype
    weight: str  # base linear weights: a float dtype, or "nf4"/"fp4"/"int8"
    full: bool  # every parameter trains
    rank: int
    lora_dropout: float
    attn: str  # "flash" (sdpa, flash_attention_2) or "eager"
    act: str  # "silu", "gelu", "gelu_tanh", "relu"
    hidden_dropout: float  # residual-branch dropout of the architecture (OPT: config.dropout)
    attention_dropout: float
    softcap: float | None  # gemma2 attention logit softcapping

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def kbit(self) -> bool:
        return self.weight in ("nf4", "fp4", "int8")


def recipe_for(inventory: ModelInventory, plan: TrainingPlan, config_dict: dict[str, Any] | None = None) -> Recipe:
    cfg = config_dict or {}
    model_type = inventory.model_type
    low = "fp16" if plan.dtype == "fp16" else "bf16"
    res = "fp32" if plan.is_kbit else plan.dtype
    attn = "eager" if plan.attn == "eager" or model_type in NO_SDPA and plan.attn == "sdpa" else "flash"
    default_act = {"gemma": "gelu_tanh", "gemma2": "gelu_tanh", "opt": "relu"}.get(model_type, "silu")
    act_name = str(cfg.get("hidden_activation") or cfg.get("hidden_act") or cfg.get("activation_function") or default_act)
    act = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}.get(act_name, act_name)
    if act not in ("silu", "gelu", "gelu_tanh", "relu"):
        act = "silu" if act == "swish" else "gelu"
    hidden_dropout = float(cfg.get("dropout", 0.1 if model_type == "opt" else 0.0) or 0.0) if model_type == "opt" else 0.0
    softcap = cfg.get("attn_logit_softcapping", 50.0 if model_type == "gemma2" else None)
    return Recipe(
        batch=plan.batch_size,
        seq=plan.seq_len,
        low=low,
        res=res,
        weight=plan.quant if plan.is_kbit else plan.dtype,
        full=plan.method == "full",
        rank=plan.rank,
        lora_dropout=plan.dropout if plan.uses_adapters else 0.0,
        attn=attn,
        act=act,
        hidden_dropout=hidden_dropout,
        attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        softcap=float(softcap) if softcap and attn == "eager" else None,
    )


class Layer:
    """One decoder layer of ``inventory`` written over a ``Graph``."""

    def __init__(self, g: Graph, inv: ModelInventory, r: Recipe, cos: T | None, sin: T | None) -> None:
        self.g, self.inv, self.r, self.cos, self.sin = g, inv, r, cos, sin
        self.groups = {grp.name: grp for grp in inv.linears}
        if inv.model_type not in MODELLED:
            self.groups = _llama_groups(inv)
        self.dequant_bytes = 0

    def has(self, name: str) -> bool:
        return name in self.groups

    # building blocks
    def proj(self, x: T, name: str) -> T:
        g, r, grp = self.g, self.r, self.groups[name]
        out_numel = r.tokens * grp.out_features
        if r.kbit and grp.quantizable:
            self.dequant_bytes = max(self.dequant_bytes, grp.weight_params * ITEMSIZE[r.low])
            if r.weight == "int8":  # MatMul8bitLt keeps A (and outlier columns) in ctx.tensors
                if x.rg:
                    g.save(x)
                out = g.new(out_numel, x.dtype, x.rg)
            else:  # Linear4bit: x.to(compute dtype) -> MatMul4Bit (keeps nothing) -> .to(input dtype)
                out = g.to(g.new(out_numel, r.low, x.rg), x.dtype)
                g.to(x, r.low)
        else:
            w = g.param(grp.weight_params, r.weight if not r.kbit else r.res, r.full)
            out = g.linear(x, w, out_numel)
        if grp.lora:
            out = self.lora(x, out, grp)
        return out

    def lora(self, x: T, result: T, grp: LinearGroup) -> T:
        g, r = self.g, self.r
        bnb = r.kbit and grp.quantizable  # peft lora.bnb: no input cast under autocast
        xa = x if bnb else g.to(x, "fp32")
        xd = g.dropout(xa, r.lora_dropout)
        a = g.linear(xd, g.param(r.rank * grp.in_features, "fp32", True), r.tokens * r.rank)
        b = g.linear(a, g.param(grp.out_features * r.rank, "fp32", True), result.numel)
        out = g.add(result, g.scale(b))
        return out if bnb else g.to(out, result.dtype)

    def norm(self, x: T, kind: str = "rms") -> T:
        g, r, h = self.g, self.r, self.inv.hidden_size
        w = g.param(h, r.res, r.full)
        if kind == "layer":  # CUDA autocast runs layer_norm in fp32 (input, weight, bias cast)
            xc = g.to(x, "fp32")
            wc, bc = g.to(w, "fp32"), g.to(g.param(h, r.res, r.full), "fp32")
            if x.rg or r.full:
                g.save(xc, wc, bc, g.new(r.tokens, "fp32", False), g.new(r.tokens, "fp32", False))
            return g.new(x.numel, "fp32", x.rg or r.full)
        hf = g.to(x, "fp32")
        rs = g.new(r.tokens, "fp32", hf.rg)
        if hf.rg:
            g.save(hf, rs)
        n = g.new(x.numel, "fp32", hf.rg)
        if kind == "gemma":  # (x * rsqrt) * (1 + w.float()), then .type_as(x)
            w1 = g.new(h, "fp32", w.rg)
            return g.to(g.mul(n, w1, x.numel), x.dtype)
        return g.mul(w, g.to(n, x.dtype), x.numel)  # llama: w * n.to(input dtype)

    def rope(self, q: T, numel: int) -> T:
        g = self.g
        if self.cos is None or self.sin is None:
            return q
        m1 = g.mul(q, self.cos, numel)
        m2 = g.mul(g.new(numel, q.dtype, q.rg), self.sin, numel)
        out = g.add(m1, m2)
        if self.inv.model_type == "phi3":  # partial rotary: cat([rotated, pass-through])
            out = g.new(numel, out.dtype, out.rg)
        return out

    def attention(self, q: T, k: T, v: T) -> T:
        g, r, inv = self.g, self.r, self.inv
        nh, nkv, hd = inv.num_attention_heads, inv.num_key_value_heads, inv.head_dim
        rg = q.rg or k.rg or v.rg
        out_numel = r.tokens * nh * hd
        if r.attn == "flash":  # flash kernel: keeps q, k, v (GQA unrepeated), out, fp32 logsumexp
            qc, kc, vc = g.autocast(q), g.autocast(k), g.autocast(v)
            out = g.new(out_numel, r.low, rg)
            if rg:
                g.save(qc, kc, vc, out, g.new(r.batch * nh * r.seq, "fp32", False))
            return out
        scores_numel = r.batch * nh * r.seq * r.seq
        rep = nh // nkv
        kr = k if rep == 1 else g.new(out_numel, k.dtype, k.rg)  # repeat_kv copies
        vr = v if rep == 1 else g.new(out_numel, v.dtype, v.rg)
        s = g.scale(g.matmul(q, kr, scores_numel))
        if r.softcap:
            t = g.act(g.scale(s), "relu")  # tanh keeps its output
            s = g.scale(t)
        s = g.add(s, g.new(r.batch * r.seq * r.seq, r.res, False))  # + causal mask (embedding dtype)
        p = g.new(scores_numel, "fp32", s.rg)  # softmax(dtype=fp32) keeps its output
        if s.rg:
            g.save(p)
        p = g.dropout(g.to(p, q.dtype), r.attention_dropout)
        o = g.matmul(p, vr, out_numel)
        return g.new(out_numel, o.dtype, o.rg)  # transpose(1, 2).contiguous()

    def gated_mlp(self, gate: T, up: T, numel: int) -> T:
        """act(gate) * up (gate/up may be views of one gate_up storage)."""
        return self.g.mul(self.g.act(gate, self.r.act, numel), up, numel)

    def moe(self, x: T) -> T:
        """Mixtral-style sparse MoE, transformers 5 ``grouped_mm`` experts (no per-expert slices)."""
        g, r, inv = self.g, self.r, self.inv
        n, e, k = r.tokens, inv.num_experts, inv.experts_per_token
        h, i = inv.hidden_size, inv.intermediate_size
        wdt = r.res if r.kbit else r.weight  # 3-D expert tensors are not quantized
        logits = g.linear(x, g.param(e * h, wdt, r.full), n * e)
        probs = g.new(n * e, "fp32", logits.rg)  # softmax(logits.float()) keeps its output
        g.to(logits, "fp32")
        top = g.new(n * k, "fp32", logits.rg)
        if logits.rg:  # topk keeps its indices; top /= top.sum() keeps result and divisor
            g.save(probs, g.new(n * k, "i64", False), top, g.new(n, "fp32", False))
        tok_idx, perm, inv_perm = (g.new(n * k, "i64", False) for _ in range(3))
        offsets = g.new(e, "i32", False)
        sel = g.new(n * k * h, x.dtype, x.rg)  # hidden_states[perm // k]
        weights = g.new(n * k, "fp32", top.rg)  # top_k_weights[perm]
        if x.rg:
            g.save(tok_idx)
        if top.rg:
            g.save(perm)
        gu = self.grouped(g.to(sel, wdt), g.param(e * 2 * i * h, wdt, r.full), n * k * 2 * i, offsets)
        p = self.gated_mlp(g.view(gu, n * k * i), g.view(gu, n * k * i), n * k * i)
        d = self.grouped(p, g.param(e * h * i, wdt, r.full), n * k * h, offsets)
        wo = g.mul(d, weights, n * k * h)
        if wo.rg:
            g.save(inv_perm)
        return g.to(g.new(n * h, wo.dtype, wo.rg), x.dtype)  # [inv_perm].view().sum(1).to(x.dtype)

    def grouped(self, x: T, w: T, out_numel: int, offsets: T) -> T:
        """torch._grouped_mm (not autocast: runs in the expert weights' dtype)."""
        if w.rg:
            self.g.save(x)
        if x.rg or w.rg:
            self.g.save(offsets)
        return self.g.new(out_numel, x.dtype, x.rg or w.rg)

    # whole layers
    def forward(self, x: T) -> T:
        if self.inv.model_type == "opt":
            return self.forward_opt(x)
        return self.forward_llama(x)  # also the approximation for unmodelled types

    def forward_llama(self, x: T) -> T:
        g, r, inv = self.g, self.r, self.inv
        kind = "gemma" if inv.model_type in ("gemma", "gemma2") else "rms"
        sandwich = inv.model_type == "gemma2"
        q_numel = r.tokens * inv.num_attention_heads * inv.head_dim
        kv_numel = r.tokens * inv.num_key_value_heads * inv.head_dim
        h = self.norm(x, kind)
        if self.has("qkv_proj"):  # phi3: q, k, v are views of one output
            qkv = self.proj(h, "qkv_proj")
            q, k, v = g.view(qkv, q_numel), g.view(qkv, kv_numel), g.view(qkv, kv_numel)
        else:
            q, k, v = self.proj(h, "q_proj"), self.proj(h, "k_proj"), self.proj(h, "v_proj")
        a = self.attention(self.rope(q, q_numel), self.rope(k, kv_numel), v)
        if inv.model_type == "phi3":
            # cat() leaves q in (B, H, S, D) memory; the kernel's output follows q's layout,
            # so attn_output.transpose(1, 2).contiguous() copies
            a = g.new(a.numel, a.dtype, a.rg)
        o = self.proj(a, "o_proj")
        if sandwich:
            o = self.norm(o, kind)
        x = g.add(x, o)
        h = self.norm(x, kind)
        if inv.num_experts:
            m = self.moe(h)
        else:
            numel = r.tokens * inv.intermediate_size
            if self.has("gate_up_proj"):
                gu = self.proj(h, "gate_up_proj")
                gate, up = g.view(gu, numel), g.view(gu, numel)
            else:
                gate, up = self.proj(h, "gate_proj"), self.proj(h, "up_proj")
            m = self.proj(self.gated_mlp(gate, up, numel), "down_proj")
        if sandwich:
            m = self.norm(m, kind)
        return g.add(x, m)

    def forward_opt(self, x: T) -> T:
        g, r = self.g, self.r
        h = self.norm(x, "layer")
        q = g.scale(self.proj(h, "q_proj"))
        a = self.attention(q, self.proj(h, "k_proj"), self.proj(h, "v_proj"))
        x = g.add(x, g.dropout(self.proj(a, "out_proj"), r.hidden_dropout))
        h = self.norm(x, "layer")
        f = g.act(self.proj(h, "fc1"), "relu")
        return g.add(x, g.dropout(self.proj(f, "fc2"), r.hidden_dropout))

    def final_norm(self, x: T) -> T:
        kind = {"opt": "layer", "gemma": "gemma", "gemma2": "gemma"}.get(self.inv.model_type, "rms")
        return self.norm(x, kind)


def _llama_groups(inv: ModelInventory) -> dict[str, LinearGroup]:
    """Llama-shaped projections for an architecture not written out (an approximation).

    LoRA is assumed on q/v when the plan has adapters, quantization on all projections.
    """
    h, i = inv.hidden_size, inv.intermediate_size
    q, kv = inv.num_attention_heads * inv.head_dim, inv.num_key_value_heads * inv.head_dim
    lora = bool(inv.lora_targets)
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return {
        name: LinearGroup(name, fin, fout, False, inv.num_layers, True, lora and name in ("q_proj", "v_proj"))
        for name, (fin, fout) in shapes.items()
    }


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
        return self.graph.bytes(t for t in self.graph.saved.values() if t.key not in self.shared_keys)

    @property
    def shared_bytes(self) -> int:
        return self.graph.bytes(t for t in self.graph.saved.values() if t.key in self.shared_keys)

    @property
    def saves_input(self) -> bool:
        return self.input.key in self.graph.saved


def run_layer(
    inventory: ModelInventory, recipe: Recipe, input_requires_grad: bool = True,
    round_to: int = ROUND_TO, final_norm: bool = False,
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
    inventory: ModelInventory, plan: TrainingPlan, config_dict: dict[str, Any] | None = None,
    round_to: int = ROUND_TO,
) -> ActivationEstimate:
    """Activation bytes of ``inventory``'s decoder stack under ``plan`` (see module docstring).

    ``config_dict`` (the model's ``config.json``) supplies the activation
    function and dropout rates; without it the architecture's defaults apply.
    """
    r = recipe_for(inventory, plan, config_dict)
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
    input_bytes = _round(steady.input.nbytes, round_to)
    if plan.gradient_checkpointing:
        # non-reentrant checkpoint keeps each layer's inputs (hidden states, cos, sin) and
        # in backward re-creates one layer's saved tensors, held until that layer is done
        rope_bytes = steady.graph.bytes(
            t for t in (steady.layer.cos, steady.layer.sin) if t is not None
        )
        position_ids = _round(r.seq * ITEMSIZE["i64"], round_to)  # passed to (and kept by) every layer
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
        mask = windows * _round(r.batch * r.seq * r.seq * ITEMSIZE[r.res], round_to)
    forward_transient, backward_transient = _transients(steady, r, inventory)
    linear_adapters = sum(
        grp.count * plan.rank * (grp.in_features + grp.out_features) for grp in inventory.linears if grp.lora
    )
    wrapped_params = plan.uses_adapters and inventory.adapter_params != linear_adapters
    exact = inventory.model_type in MODELLED and r.weight != "int8" and not wrapped_params
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


def _describe(inv: ModelInventory, plan: TrainingPlan, r: Recipe, exact: bool, wrapped: bool) -> str:
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
        parts.append("INT8 MatMul8bitLt also keeps outlier columns of its input (data dependent, not counted)")
    if wrapped:
        parts.append(
            "adapters on non-Linear parameters (peft ParamWrapper on MoE experts/router) are not "
            "modelled: their merged expert weights are saved too"
        )
    if not exact and inv.model_type not in MODELLED:
        parts.append(f"{inv.model_type} is not written out; the llama layer is used as an approximation")
    return "; ".join(parts) + "."
