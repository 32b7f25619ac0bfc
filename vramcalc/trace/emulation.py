"""What the GPU recipe does that a CPU run of the same code does not, made to happen on CPU.

The step tracer (``memory/steptrace.py``) runs the recipe's real model code on
CPU fake tensors; these pieces make that run allocate what the CUDA run
allocates, each difference named with its source:

* ``cuda_autocast``: CPU bf16 autocast plus the CUDA behaviours the recipe
  meets: ``layer_norm`` runs in fp32 (CUDA autocast's fp32 list; CPU's has no
  entry), dropout is the fused ``native_dropout`` (keeps a bool mask; CPU
  multiplies by a noise tensor), and ``torch.is_autocast_enabled()`` reads the
  autocast state (peft's ``lora.bnb`` layers skip their fp32 input cast under
  CUDA autocast).
* ``Emulated4bit`` / ``Emulated8bit``: bitsandbytes' ``Linear4bit`` /
  ``Linear8bitLt`` as autograd functions that allocate and keep what
  ``MatMul4Bit`` (the dequantized weight, transiently; the packed weight) and
  ``MatMul8bitLt`` keep. ``MatMul8bitLt`` stores its input ``A`` and the
  outlier columns ``subA`` on ``ctx.tensors``, not through
  ``save_for_backward`` (bitsandbytes/autograd/_functions.py), so gradient
  checkpointing cannot free them and they live until the graph is freed.
* ``bnb_lora_forward``: peft's ``lora.bnb`` forward for LoRA on those layers.
* ``FLASH_BACKWARD_WORKSPACES``: the fp32 buffers FlashAttention-2's backward
  allocates besides its outputs (PyTorch ``aten/src/ATen/native/transformers/
  cuda/flash_attn/flash_api.cpp`` ``mha_bwd``).

``tests/test_activations.py`` checks the layer emulation against the rules and
against the real bitsandbytes (its CPU backend) where installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from vramcalc.trace.int8 import INT8_THRESHOLD


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
    """bitsandbytes ``MatMul8bitLt`` with a frozen int8 weight, allocation for allocation
    (autograd/_functions.py; backends/cuda/ops.py ``int8_vectorwise_quant``,
    ``int8_mm_dequant``; backends/default/ops.py ``int8_mixed_scaled_mm``):

    forward: ``A.to(fp16)``; its quantization (int8 ``CA``, fp32 row stats, the
    ``abs() >= 6`` outlier mask); with outliers ``subA = A[:, cols]`` and the dequantized
    weight columns; the int32 GEMM result, its fp16 dequantization and ``.to(A.dtype)``,
    made while the int32 result is still held (``int8_scaled_mm`` keeps ``out_i32`` until
    ``int8_mm_dequant`` returns the converted tensor: the fp16 one is freed first, then the
    int32 one, as an H100's allocator trace shows, ``probe_zeroint8_2026-12-07``); with
    outliers the autocast ``addmm`` adding them back (bf16 result). Keeps ``A`` and ``subA``
    on ``ctx`` (not ``save_for_backward``: checkpointing cannot free them).
    backward: the weight dequantized to A's dtype (``CB.to(dtype_A, copy=True)``), the
    gradient cast to A's dtype, their product.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, outlier_columns: int
    ) -> torch.Tensor:
        a = x.reshape(-1, x.shape[-1])
        tokens, k = a.shape
        n = weight.shape[0]
        a16 = a.to(torch.float16)
        row_stats = a.new_empty((tokens,), dtype=torch.float32)
        ca = a.new_empty((tokens, k), dtype=torch.int8)
        magnitude = a16.abs()
        mask = magnitude >= INT8_THRESHOLD
        del magnitude, mask, a16
        c = outlier_columns
        sub_a = a.new_empty((tokens, c))
        if c:
            sub_cb = a.new_empty((n, c), dtype=torch.int8)
            sub_b = a.new_empty((n, c), dtype=torch.float32)
            del sub_cb
        out32 = a.new_empty((tokens, n), dtype=torch.int32)
        out16 = a.new_empty((tokens, n), dtype=torch.float16)
        out = out16.to(a.dtype)  # int8_mm_dequant's return, int8_scaled_mm's out_i32 held
        del out16, out32
        if c:  # output.addmm(subA, subB) under autocast: bf16 operands and result
            casts = (out.to(torch.bfloat16), sub_a.to(torch.bfloat16), sub_b.to(torch.bfloat16))
            result = a.new_empty((tokens, n), dtype=torch.bfloat16)
            del casts, sub_b
            out = result
        del ca, row_stats
        ctx.tensors = (sub_a, a)
        ctx.weight_shape = (n, k)
        return out.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        _, a = ctx.tensors
        g = grad.reshape(-1, grad.shape[-1])
        cb = a.new_empty(ctx.weight_shape)  # CB.to(dtype_A, copy=True), scaled in place
        scale = a.new_empty((ctx.weight_shape[0], 1))
        del scale
        grad_a = g.to(a.dtype) @ cb
        return grad_a.view(*grad.shape[:-1], a.shape[-1]), None, None


class Emulated4bit(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _MatMul4BitLike.apply(x.to(torch.bfloat16), self.weight)
        if self.bias is not None:
            out = out + self.bias.to(torch.bfloat16)
        return out.to(x.dtype)


class Emulated8bit(torch.nn.Linear):
    """``outlier_columns``: how many input columns carry an |x| >= 6 entry (set by the tracer)."""

    outlier_columns = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _MatMul8bitLtLike.apply(x, self.weight, self.outlier_columns)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def bnb_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft 0.21 ``lora.bnb.Linear4bit`` / ``Linear8bitLt.forward`` (vanilla LoRA): the base
    layer (4-bit: its result cloned), then each adapter. Outside autocast (DeepSpeed runs
    none) peft casts the input to ``lora_A.weight``'s dtype and the adapter's output back to
    the result's: reading ``lora_A.weight`` there is, under ZeRO-3, DeepSpeed's
    ``ZeROOrderedDict.__getitem__``, which gathers the weight at once (on the current
    stream) and registers it as an external parameter of the running module
    (``parameter_offload.py`` 79-91)."""
    result = self.base_layer(x, *args, **kwargs)
    if isinstance(self.base_layer, Emulated4bit):
        result = result.clone()
    for name in self.active_adapters:
        if name not in self.lora_A:  # peft: self.lora_A.keys()
            continue
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        requires_conversion = not torch.is_autocast_enabled()
        if requires_conversion:
            expected_dtype = result.dtype
            x = self._cast_input_dtype(x, lora_a.weight.dtype)
        output = lora_b(lora_a(self.lora_dropout[name](x))) * self.scaling[name]
        if requires_conversion:
            output = output.to(expected_dtype)
        result = result + output
    return result


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype = torch.bfloat16, enabled: bool = True) -> Iterator[None]:
    """CPU autocast with the CUDA behaviours the recipe depends on (module docstring)."""
    with cuda_functions(), torch.autocast("cpu", dtype=dtype, enabled=enabled):
        yield


@contextlib.contextmanager
def cuda_functions() -> Iterator[None]:
    """The CUDA behaviours of ``layer_norm``, dropout and ``is_autocast_enabled`` (module
    docstring). Keep them on through backward: checkpointing re-runs the forward there."""
    layer_norm, dropout, is_enabled = F.layer_norm, F.dropout, torch.is_autocast_enabled

    def fp32_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):  # type: ignore[no-untyped-def]
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.float() if t is not None and torch.is_autocast_enabled("cpu") else t

        return layer_norm(cast(x), shape, cast(weight), cast(bias), eps)

    def fused_dropout(x, p=0.5, training=True, inplace=False):  # type: ignore[no-untyped-def]
        if training and 0 < p < 1:
            return torch.native_dropout(x, p, True)[0]
        return dropout(x, p, training, inplace)

    F.layer_norm, F.dropout = fp32_layer_norm, fused_dropout  # type: ignore[assignment]
    torch.is_autocast_enabled = lambda *a: is_enabled(*a) if a else is_enabled("cpu")  # type: ignore[assignment]
    grouped = {
        owner: getattr(owner, name)
        for owner, name in ((torch, "_grouped_mm"), (F, "grouped_mm"))
        if hasattr(owner, name)
    }
    for owner, original in grouped.items():
        setattr(owner, original.__name__, grouped_mm_any_dtype(original))
    try:
        yield
    finally:
        F.layer_norm, F.dropout, torch.is_autocast_enabled = layer_norm, dropout, is_enabled  # type: ignore[assignment]
        for owner, original in grouped.items():
            setattr(owner, original.__name__, original)


class _GroupedMMLike(torch.autograd.Function):
    """``_grouped_mm`` of a 2-D input and 3-D expert weights in a dtype other than bf16.

    CUDA runs it (``GroupedBlas.cpp``: no bf16 fast path, the per-group fallback writing one
    output); its meta function accepts bf16 only, so fake tensors refuse what the GPU runs
    (a QLoRA MoE: transformers 5.17 leaves the fused experts unquantized, and
    ``prepare_model_for_kbit_training`` makes them fp32). Forward: the (tokens, out) result;
    saves the weight for the input's gradient and the input for the weight's. Backward: the
    gradients, one grouped product each."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.experts = b.shape[0]
        ctx.save_for_backward(a if b.requires_grad else None, b if a.requires_grad else None)
        return a.new_empty((a.shape[0], b.shape[-1]))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, b = ctx.saved_tensors
        grad_a = grad.new_empty((grad.shape[0], b.shape[-2])) if b is not None else None
        grad_b = a.new_empty((ctx.experts, a.shape[-1], grad.shape[-1])) if a is not None else None
        return grad_a, grad_b


def grouped_mm_any_dtype(original: Any) -> Any:
    """``torch._grouped_mm`` / ``F.grouped_mm`` that runs non-bf16 2-D x 3-D products as CUDA
    does (``_GroupedMMLike``); everything else as ``original``."""

    def grouped_mm(mat_a, mat_b, *args, **kwargs):  # type: ignore[no-untyped-def]
        if mat_a.dtype == torch.bfloat16 or mat_a.dim() != 2 or mat_b.dim() != 3:
            return original(mat_a, mat_b, *args, **kwargs)
        return _GroupedMMLike.apply(mat_a, mat_b)

    grouped_mm.__name__ = original.__name__
    return grouped_mm


#: (dim, multiple) pairs for the allocation being made: a dim that is a length rounded up to a
#: multiple (FlashAttention-2's workspaces), which the step recorder notes beside the shape so
#: that a trace at one sequence length tells the size at another (``trace/recipe.py``)
ROUNDED_DIMS: list[tuple[tuple[int, int], ...]] = []


@contextlib.contextmanager
def rounded_dims(*dims: tuple[int, int]) -> Iterator[None]:
    """Allocations made inside have these (dim, multiple) dims rounded up (see ROUNDED_DIMS)."""
    ROUNDED_DIMS.append(dims)
    try:
        yield
    finally:
        ROUNDED_DIMS.pop()


def flash_backward_workspaces(batch: int, seq_q: int, heads: int, head_dim: int) -> tuple[int, ...]:
    """Bytes of the fp32 buffers FlashAttention-2's backward allocates (``mha_bwd``):
    ``softmax_d`` (batch, heads, seq rounded to 128) and ``dq_accum`` (batch, seq rounded
    to 128, heads, head_dim rounded to 32), both fp32, freed when the kernel returns."""
    seq_rounded = -(-seq_q // 128) * 128
    head_dim_rounded = -(-head_dim // 32) * 32
    return (
        batch * heads * seq_rounded * 4,
        batch * seq_rounded * heads * head_dim_rounded * 4,
    )


class _FlashAttentionLike(torch.autograd.Function):
    """SDPA's FlashAttention-2 path on CUDA (``_scaled_dot_product_flash_attention``): what it
    allocates and keeps. Forward: ``out`` (batch, seq, heads, dim) in the input dtype and
    ``softmax_lse`` (batch, heads, seq) fp32; saves q, k, v, out, lse. Backward
    (``mha_bwd``): dq, dk, dv; for grouped-query attention dk/dv expanded to every query
    head, then summed into dk/dv; ``softmax_d`` and ``dq_accum`` fp32 workspaces."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, heads, seq, dim = q.shape
        out = q.new_empty((batch, seq, heads, dim))
        lse = q.new_empty((batch, heads, seq), dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out, lse = ctx.saved_tensors
        batch, heads, seq, dim = q.shape
        kv_heads, seq_k = k.shape[1], k.shape[2]
        grad = grad.transpose(1, 2).contiguous()
        dq = q.new_empty((batch, seq, heads, dim))
        dk = k.new_empty((batch, seq_k, kv_heads, dim))
        dv = v.new_empty((batch, seq_k, kv_heads, dim))
        expanded = kv_heads != heads
        if expanded:
            dk_expanded = k.new_empty((batch, seq_k, heads, dim))
            dv_expanded = v.new_empty((batch, seq_k, heads, dim))
        # mha_bwd: softmax_d (batch, heads, seq rounded to 128) and dq_accum (batch, seq
        # rounded to 128, heads, head dim rounded to 32), fp32 (flash_backward_workspaces)
        seq_rounded = -(-seq // 128) * 128
        dim_rounded = -(-dim // 32) * 32
        with rounded_dims((2, 128)):
            softmax_d = q.new_empty((batch, heads, seq_rounded), dtype=torch.float32)
        with rounded_dims((1, 128)):
            dq_accum = q.new_empty((batch, seq_rounded, heads, dim_rounded), dtype=torch.float32)
        del dq_accum
        if expanded:
            del dk_expanded, dv_expanded
        del softmax_d, grad
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def cuda_sdpa(original: Any, flash: Any) -> Any:
    """``F.scaled_dot_product_attention`` routed as CUDA routes it: fp32 inputs cast to the
    autocast dtype first (SDPA is on CUDA autocast's lower-precision list; CPU autocast's is
    not), then ``flash(query, key, value)`` where CUDA takes FlashAttention-2 (no mask, no
    dropout, fp16/bf16, one head dim <= 256), anything else as ``original``. The step trace
    (``flash_like_sdpa``) and the op trace (``kbit_ops.flash_sdpa``) both route through it."""

    def sdpa(
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
    ):  # type: ignore[no-untyped-def]  # noqa: E501
        if torch.is_autocast_enabled("cpu") and query.dtype == torch.float32:
            low = torch.get_autocast_dtype("cpu")
            query, key, value = query.to(low), key.to(low), value.to(low)
        if (
            attn_mask is None
            and dropout_p == 0.0
            and query.dtype in (torch.bfloat16, torch.float16)
            and query.shape[-1] <= 256
            and query.shape[-1] == key.shape[-1] == value.shape[-1]
        ):
            return flash(query, key, value)
        return original(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa,
        )  # fmt: skip

    return sdpa


def flash_like_sdpa(original: Any) -> Any:
    """SDPA as CUDA runs it, FlashAttention-2 allocating what it allocates there."""
    return cuda_sdpa(original, _FlashAttentionLike.apply)


@contextlib.contextmanager
def gpu_code_paths() -> Iterator[None]:
    """Make library code take the branches it takes on a GPU while tensors are fake:
    transformers skips the causal mask for SDPA unless it ``is_tracing`` (which counts a
    FakeTensor as tracing); it looks for packed sequences in ``position_ids`` and (5.17) for
    padding in the attention mask by reading their values (the recipe's batches are whole
    unpadded sequences: none are found, no padding);
    SDPA runs FlashAttention-2 (``flash_like_sdpa``)."""
    import transformers.masking_utils as masking_utils
    import transformers.utils.import_utils as import_utils

    is_fake, sdpa = import_utils.is_fake_tensor, F.scaled_dot_product_attention
    find_packed = masking_utils.find_packed_sequence_indices
    fast_all = getattr(masking_utils, "fast_all", None)
    import_utils.is_fake_tensor = lambda tensor: False  # type: ignore[assignment]
    masking_utils.find_packed_sequence_indices = lambda position_ids: None  # type: ignore[assignment]
    if fast_all is not None:  # transformers 5.17 reads the padding mask's values: no padding
        masking_utils.fast_all = lambda tensor: True  # type: ignore[attr-defined,assignment,return-value]
    F.scaled_dot_product_attention = flash_like_sdpa(sdpa)  # type: ignore[assignment]
    torch.nn.functional.scaled_dot_product_attention = F.scaled_dot_product_attention
    try:
        yield
    finally:
        import_utils.is_fake_tensor = is_fake  # type: ignore[assignment]
        masking_utils.find_packed_sequence_indices = find_packed  # type: ignore[assignment]
        if fast_all is not None:
            masking_utils.fast_all = fast_all  # type: ignore[attr-defined]
        F.scaled_dot_product_attention = sdpa  # type: ignore[assignment]
