"""Each architecture's decoder layer written out op by op over the abstract autograd.

``recipe_for`` turns an inventory + plan (+ config facts) into the dtypes and
sizes that decide what a layer keeps; ``Layer`` runs one decoder layer as
transformers 5 does, for the llama family (llama, mistral, qwen2, gemma,
gemma2, mixtral, phi3) and OPT. See ``memory/activations.py`` for the rules
and their sources.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramcalc.inventory import LinearGroup, ModelInventory
from vramcalc.memory.autograd import ITEMSIZE, Graph, T
from vramcalc.memory.distributed import skips_kbit_upcast
from vramcalc.training_plan import TrainingPlan

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


def recipe_for(inventory: ModelInventory, plan: TrainingPlan) -> Recipe:
    """The recipe of ``plan`` on ``inventory`` (its config facts included)."""
    model_type = inventory.model_type
    low = "fp16" if plan.dtype == "fp16" else "bf16"
    # prepare_model_for_kbit_training's fp32 norms/embeddings make the residual fp32;
    # sharded QLoRA (FSDP/ZeRO-3) skips that preparation
    res = "fp32" if plan.is_kbit and not skips_kbit_upcast(plan) else plan.dtype
    attn = (
        "eager"
        if plan.attn == "eager" or model_type in NO_SDPA and plan.attn == "sdpa"
        else "flash"
    )
    default_act = {"gemma": "gelu_tanh", "gemma2": "gelu_tanh", "opt": "relu"}.get(
        model_type, "silu"
    )
    act_name = inventory.hidden_act or default_act
    act = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}.get(
        act_name, act_name
    )
    if act not in ("silu", "gelu", "gelu_tanh", "relu"):
        act = "silu" if act == "swish" else "gelu"
    softcap = inventory.attn_logit_softcapping
    return Recipe(
        batch=plan.batch_size,
        seq=plan.seq_len,
        low=low,
        res=res,
        weight=str(plan.quant) if plan.is_kbit else plan.dtype,
        full=plan.method == "full",
        rank=plan.adapter_rank,
        lora_dropout=plan.dropout if plan.uses_adapters else 0.0,
        attn=attn,
        act=act,
        hidden_dropout=inventory.dropout if model_type == "opt" else 0.0,
        attention_dropout=inventory.attention_dropout,
        softcap=float(softcap) if softcap and attn == "eager" else None,
    )


class Layer:
    """One decoder layer of ``inventory`` written over a ``Graph``."""

    def __init__(
        self, g: Graph, inv: ModelInventory, r: Recipe, cos: T | None, sin: T | None
    ) -> None:
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
        s = g.add(
            s, g.new(r.batch * r.seq * r.seq, r.res, False)
        )  # + causal mask (embedding dtype)
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
        """Mixtral-style sparse MoE, transformers 5 ``grouped_mm`` experts (no per-expert slices;
        ``integrations/moe.py`` ``grouped_mm_experts_forward``)."""
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
        # transformers 5.17: masked_fill with the expert-parallel sentinel mask before and
        # after each grouped matmul; its backward keeps the (n * k, 1) bool mask
        sentinel = g.new(n * k, "bool", False)
        if sel.rg or r.full:
            g.save(sentinel)
        gu = self.grouped(
            g.to(sel, wdt), g.param(e * 2 * i * h, wdt, r.full), n * k * 2 * i, offsets
        )
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
    shapes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    return {
        name: LinearGroup(
            name, fin, fout, False, inv.num_layers, True, lora and name in ("q_proj", "v_proj")
        )
        for name, (fin, fout) in shapes.items()
    }
