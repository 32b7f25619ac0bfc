"""GPU work the traced CPU code does not do as the GPU does, op by op, from the sources.

``opprofile.py`` counts the ops of a training step on fake CPU tensors. Where the
recipe's GPU code path differs from anything that runs there, the ops are stated
here as bitsandbytes 0.50 and PyTorch run them on CUDA (each function names its
source), and emitted into the recorder with their FLOPs and bytes. ``c`` below is
an int8 layer's number of outlier columns and ``T`` the tokens of the micro-batch.

* ``Linear4bit`` (``nn/modules.py``) → ``MatMul4Bit`` (``autograd/_functions.py``):
  forward ``gemm_4bit`` → ``_dequant_linear_fallback`` (``backends/cuda/ops.py``;
  the fused kernel is only chosen for M ≤ 512 tokens with small weights on
  sm90): with double quantization ``dequantize_blockwise`` of the 8-bit absmax
  and ``+ offset``, then ``dequantize_4bit`` into a ``--dtype`` weight, then
  ``F.linear``. Backward (when the input needs a gradient) dequantizes again
  (``F.dequantize_4bit``: ``dequantize_blockwise``, ``absmax += offset``,
  ``dequantize_4bit``) and multiplies.
* ``Linear8bitLt`` → ``MatMul8bitLt``: ``logger.warning`` (inputs not fp16),
  ``A.to(float16)``, ``int8_vectorwise_quant`` (``A.abs() >= 6``,
  ``outliers.any()`` — a host-device **sync** — ``any(dim=0)``, ``argwhere``,
  the quantization kernel, zeroing outlier columns), ``int8_mixed_scaled_mm``
  (``A[:, cols]``, ``CB[:, cols]`` dequantized, the int8 GEMM into int32,
  ``int8_mm_dequant`` to fp16, ``.to(A.dtype)``, ``addmm`` of the outliers under
  autocast). Backward: ``CB.to(A.dtype, copy=True).mul_(SCB / 127)`` and
  ``grad.to(A.dtype) @ CB`` — in A's dtype, which after
  ``prepare_model_for_kbit_training`` is fp32: an fp32 GEMM outside autocast.
* SDPA on CUDA with no mask and bf16 inputs runs FlashAttention-2
  (``_scaled_dot_product_flash_attention``): one forward kernel (QKᵀ and PV over the
  causal pairs, reading q, k, v and writing out and the log-sum-exp) and one
  backward kernel (5 matmuls: QKᵀ recomputed, dV, dP, dQ, dK), as ``flops.py`` counts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vramcalc.trace.emulation import INT8_THRESHOLD, cuda_sdpa  # noqa: F401  (INT8_THRESHOLD: the outlier threshold)

BNB_BLOCKSIZE = 64  # NF4/FP4 weight blocks (BitsAndBytesConfig default)
BNB_ABSMAX_BLOCKSIZE = 256  # double quantization of the absmax
# MatMul8bitLt / int8_vectorwise_quant dispatches the host makes that are not GPU kernels
# (torch.empty of the outputs, views, the logger.warning about the fp16 cast)
_INT8_FORWARD_LAUNCH_ONLY = ("warning", "reshape", "empty", "empty", "view", "reshape")


def _emit_dequant_4bit(rec: Any, n: int, double_quant: bool, out_bytes: int) -> None:
    """The kernels that rebuild a weight of ``n`` elements from NF4/FP4 (bytes per step)."""
    blocks = -(-n // BNB_BLOCKSIZE)
    if double_quant:
        groups = -(-blocks // BNB_ABSMAX_BLOCKSIZE)
        rec.emit("empty_like", "launch")
        rec.emit(
            "bnb_dequantize_blockwise", "memory", nbytes=(blocks + 4 * groups + 1024 + 4 * blocks,)
        )
        rec.emit("add", "memory", nbytes=(3 * 4 * blocks,))  # absmax + offset
    rec.emit("empty", "launch")
    rec.emit("bnb_dequantize_4bit", "memory", nbytes=(n // 2 + 4 * blocks + out_bytes * n,))


class _Bnb4bit(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, rec: Any, dq: bool
    ) -> torch.Tensor:
        ctx.weight, ctx.rec, ctx.dq = weight, rec, dq
        rec.emit("bnb_gemm_4bit", "launch")  # the custom op's dispatch
        _emit_dequant_4bit(rec, weight.numel(), dq, x.element_size())
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        rec, w = ctx.rec, ctx.weight
        rec.emit("bnb_dequantize_4bit_op", "launch")
        _emit_dequant_4bit(rec, w.numel(), ctx.dq, grad.element_size())
        return torch.matmul(grad, w), None, None, None


def bnb4_forward(module: Any, rec: Any, double_quant: bool) -> Any:
    """``Linear4bit.forward``: input cast to the compute dtype (bf16), ``MatMul4Bit``,
    the result cast back to the input dtype."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        x = x.to(torch.bfloat16)
        out = _Bnb4bit.apply(x, module.weight, rec, double_quant)
        if module.bias is not None:
            out = out + module.bias.to(torch.bfloat16)
        return out.to(inp_dtype)

    return forward


class _Bnb8bit(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, rec: Any, p: float
    ) -> torch.Tensor:
        n, k = weight.shape
        a = x.element_size()  # A's bytes per element (fp32 after prepare_model_for_kbit_training)
        ctx.rec, ctx.shape, ctx.a, ctx.x_shape = rec, (n, k), a, x.shape
        c = {"outlier": (p, k)}  # ops whose size grows with the outlier columns c
        for name in _INT8_FORWARD_LAUNCH_ONLY:
            rec.emit(name, "launch")
        # bytes per token unless said otherwise: (constant, per token) coefficients
        rec.emit("_to_copy", "memory", nbytes=(0, (a + 2) * k))  # A.to(float16)
        rec.emit("abs", "memory", nbytes=(0, 4 * k))
        rec.emit("ge", "memory", nbytes=(0, 3 * k))
        rec.emit("any", "memory", nbytes=(1, k), sync=True)  # `if outliers.any()`: host waits
        rec.emit("any", "memory", nbytes=(k, k))  # any(dim=0)
        rec.emit("argwhere", "memory", nbytes=(9 * k,), sync=True)  # nonzero reads its count
        rec.emit("view", "launch")
        rec.emit("bnb_int8_vector_quant", "memory", nbytes=(0, 3 * k + 4))
        rec.emit("index_put_", "memory", c_bytes=(0.0, 1.0), **c)  # out_row[:, cols] = 0
        # int8_mixed_scaled_mm (backends/default/ops.py)
        rec.emit("index", "memory", c_bytes=(0.0, 2.0 * a), **c)  # A[:, cols]
        rec.emit("index", "memory", c_bytes=(2.0 * n, 0.0), **c)  # CB[:, cols]
        rec.emit(
            "bnb_int8_vectorwise_dequant", "memory", nbytes=(4 * n,), c_bytes=(5.0 * n, 0.0), **c
        )
        rec.emit("mul", "memory", c_bytes=(8.0 * n, 0.0), **c)
        rec.emit("empty", "launch")
        rec.emit(
            "bnb_int8_linear_matmul",
            "int8_matmul",
            flops=(0, 2.0 * n * k),
            nbytes=(n * k, k + 4 * n),
        )
        rec.emit("empty", "launch")
        rec.emit("bnb_int8_mm_dequant", "memory", nbytes=(4 * n, 6 * n + 4))
        rec.emit("_to_copy", "memory", nbytes=(0, (2 + a) * n))  # .to(A.dtype)
        # output.addmm(subA, subB) under autocast: bf16 casts of the three, then the GEMM
        rec.emit("_to_copy", "memory", nbytes=(0, (a + 2) * n))
        rec.emit("_to_copy", "memory", c_bytes=(0.0, a + 2.0), **c)
        rec.emit("_to_copy", "memory", c_bytes=(6.0 * n, 0.0), **c)
        rec.emit(
            "addmm",
            "matmul",
            nbytes=(0, 6.0 * n),
            c_flops=(0.0, 2.0 * n),
            c_bytes=(2.0 * n, 2.0),
            **c,
        )
        with rec.pause():
            out = x.new_empty((*x.shape[:-1], n), dtype=torch.bfloat16)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        rec, (n, k), a = ctx.rec, ctx.shape, ctx.a
        rec.emit("reshape", "launch")
        rec.emit("_to_copy", "memory", nbytes=(n * k + a * n * k,))  # CB.to(A.dtype, copy=True)
        rec.emit("unsqueeze", "launch")
        rec.emit("mul", "memory", nbytes=(8 * n,))  # SCB * (1/127)
        rec.emit("mul_", "memory", nbytes=(2 * a * n * k + 4 * n,))
        rec.emit(
            "_to_copy", "memory", nbytes=(0, (grad.element_size() + a) * n)
        )  # grad.to(A.dtype)
        kind = "matmul_fp32" if a == 4 else "matmul"  # outside autocast: A's dtype
        rec.emit("mm", kind, flops=(0, 2.0 * n * k), nbytes=(a * n * k, a * (n + k)))
        rec.emit("view", "launch")
        with rec.pause():
            grad_x = grad.new_empty(ctx.x_shape, dtype=torch.float32 if a == 4 else grad.dtype)
        return grad_x, None, None, None


def bnb8_forward(module: Any, rec: Any, p: float) -> Any:
    """``Linear8bitLt.forward`` → ``bnb.matmul`` → ``MatMul8bitLt`` (bias added by
    ``int8_mm_dequant``, a separate add for a non-fp16 bias)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        with rec.pause():
            weight = module.weight
        out = _Bnb8bit.apply(x, weight, rec, p)
        if module.bias is not None:
            out = out + module.bias.to(out.dtype)
        return out

    return forward


class _Flash(torch.autograd.Function):
    """FlashAttention-2 through SDPA: one kernel forward, one backward (module docstring)."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rec: Any
    ) -> torch.Tensor:
        batch, heads, seq, dim = q.shape
        kv_heads, size = k.shape[1], q.element_size()
        # causal pairs per sequence S(S+1)/2, QKᵀ and PV: 2·2·heads·dim FLOPs a pair
        # = 2·heads·dim·(T + T·S) for T = batch·seq
        per_pair = 2.0 * heads * dim
        flops = (0.0, per_pair, per_pair)
        # reads q, k, v; writes out and the fp32 log-sum-exp; per token
        per_token = (2 * heads + 2 * kv_heads) * dim * size + 4 * heads
        ctx.rec, ctx.flops, ctx.per_token, ctx.shapes = (
            rec,
            flops,
            per_token,
            (heads, kv_heads, dim, size),
        )
        rec.emit(
            "_scaled_dot_product_flash_attention", "attention", flops=flops, nbytes=(0, per_token)
        )
        with rec.pause():
            out = q.new_empty((batch, seq, heads, dim)).transpose(1, 2)
        ctx.save_for_backward(q, k, v)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v = ctx.saved_tensors
        rec = ctx.rec
        heads, kv_heads, dim, size = ctx.shapes
        # 5 matmuls (QKᵀ recomputed, dV, dP, dQ, dK) = 2.5 x forward; reads q, k, v, out, dout,
        # lse; writes dq, dk, dv, the fp32 dq accumulator and softmax_d
        flops = tuple(2.5 * f for f in ctx.flops)
        per_token = (3 * heads + 2 * kv_heads) * dim * size + (heads + 2 * kv_heads) * dim * size
        per_token += (4 * heads * dim + 4 * heads) + 4 * heads
        rec.emit("contiguous", "memory", nbytes=(0, 2 * heads * dim * size))  # grad_out
        rec.emit(
            "_scaled_dot_product_flash_attention_backward",
            "attention",
            flops=flops,
            nbytes=(0, per_token),
        )
        if kv_heads != heads:  # GQA: dk, dv come out per query head and are summed
            rec.emit("sum", "memory", nbytes=(0, 2 * (heads + kv_heads) * dim * size))
        with rec.pause():
            out = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
        return (*out, None)


def flash_sdpa(original: Any, rec: Any) -> Any:
    """SDPA as CUDA routes it (``emulation.cuda_sdpa``), FlashAttention-2's work recorded."""
    return cuda_sdpa(original, lambda query, key, value: _Flash.apply(query, key, value, rec))
