"""What ``generate`` does on a GPU that a CPU run on fake tensors does not, made to happen.

The serving tracer (``serving/servetrace.py``) runs transformers' real ``generate`` and
peft's real adapter code on CPU fake tensors; these pieces make that run allocate what the
CUDA run allocates, each with its source (torch 2.11, transformers 5.17, peft 0.21,
bitsandbytes 0.50.2):

* ``ServeInt8Linear`` / ``Serve4bitLinear``: bitsandbytes' ``Linear8bitLt`` /
  ``Linear4bit`` at inference (no autograd), allocation for allocation. They *are*
  instances of the bitsandbytes classes, so peft wraps them with its own
  ``lora/bnb.py`` layers, as on the GPU; their weights have the stored dtype (int8, packed
  uint8), so peft leaves the adapters in fp32 as it does on the GPU.
* ``cuda_sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` as the CUDA build
  dispatches it (``aten/src/ATen/native/transformers/attention.cpp``): FlashAttention-2
  (``flash_api.cpp`` ``mha_fwd``: the output, ``softmax_lse``, the split-KV accumulators of
  a short query, the RNG state) when there is no mask, else memory-efficient attention with
  the boolean mask made additive (``convert_boolean_attn_mask``) and padded to a multiple of
  8 (``preprocess_mask``).
* ``host_built_caches``: transformers' cache layers' small host tensors, recorded where
  the GPU run copies them to the device.
* ``value_reads``: the few places ``generate`` reads a value on the host (padding and
  special-token checks: answered False; the stop check: stops at the length asked).

The GPU-dependent choices (FlashAttention's split-KV heuristic, bitsandbytes' choice between
its fused 4-bit kernel and dequantize + matmul) are made for an sm90 GPU with 132 SMs
(H100 SXM, H200): ``DEVICE_PROPERTIES``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from vramcalc.memory.weights import NF4_BLOCKSIZE
from vramcalc.serving import eightbit, fourbit
from vramcalc.trace.emulation import gpu_code_paths
from vramcalc.trace.int8 import INT8_THRESHOLD, OutlierRule

#: (SMs, compute capability major, minor) of the GPU whose kernels are emulated
DEVICE_PROPERTIES = (132, 9, 0)


# -- bitsandbytes at inference ---------------------------------------------------------------
def _bnb() -> Any:
    import bitsandbytes

    return bitsandbytes


def int8_linear_class() -> type:
    """``ServeInt8Linear``: a ``bitsandbytes.nn.Linear8bitLt`` whose forward allocates what
    ``MatMul8bitLt.forward`` allocates without autograd (``autograd/_functions.py``;
    ``backends/cuda/ops.py`` ``int8_vectorwise_quant``, ``int8_linear_matmul``,
    ``int8_mm_dequant``; ``backends/default/ops.py`` ``int8_mixed_scaled_mm``)."""
    return _classes()[0]


def four_bit_linear_class() -> type:
    """``Serve4bitLinear``: a ``bitsandbytes.nn.Linear4bit`` whose forward allocates what
    ``matmul_4bit`` allocates without autograd (``backends/cuda/ops.py`` ``gemm_4bit``: the
    fused kernel's output, or ``_dequant_linear_fallback``'s absmax, 16-bit weight and
    ``F.linear``)."""
    return _classes()[1]


_CLASSES: list[type] = []


def _classes() -> list[type]:
    if _CLASSES:
        return _CLASSES
    bnb = _bnb()

    class ServeInt8Linear(bnb.nn.Linear8bitLt):  # type: ignore[misc,name-defined]
        """int8 weight (out, in) and one fp32 scale per row (SCB, loaded apart; merged and
        dequantized by ``eightbit``)."""

        outlier_rule: OutlierRule | None = None

        def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
            torch.nn.Linear.__init__(self, in_features, out_features, bias, device="meta")
            self.weight = torch.nn.Parameter(
                torch.empty((out_features, in_features), dtype=torch.int8, device="meta"),
                requires_grad=False,
            )
            eightbit.mark(self.weight)  # what peft reads of an Int8Params (eightbit)
            self.state = bnb.MatmulLtState()
            self.state.threshold = INT8_THRESHOLD
            self.state.has_fp16_weights = False
            self.index = None
            self.outlier_cols: torch.Tensor | None = None  # MatmulLtState.idx

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = x.reshape(-1, x.shape[-1])
            rows, k = a.shape
            n = self.out_features
            a16 = a.to(torch.float16)  # MatMul8bitLt: A.to(torch.float16)
            # int8_vectorwise_quant: row_stats, out_row, the |A| >= threshold mask, any()
            row_stats = a.new_empty((rows,), dtype=torch.float32)
            ca = a.new_empty((rows, k), dtype=torch.int8)
            magnitude = a16.abs()
            outliers = magnitude >= INT8_THRESHOLD
            del magnitude
            any_outlier = outliers.any()
            del any_outlier
            columns = self.outlier_rule.columns(rows) if self.outlier_rule is not None else 0
            if columns:
                per_column = outliers.any(dim=0)
                cols = a.new_empty((columns,), dtype=torch.int64)  # argwhere(...).view(-1)
                del per_column
            else:
                cols = a.new_empty((0,), dtype=torch.int64)
            del outliers, a16
            self.outlier_cols = cols  # state.idx: kept until the next call
            sub_a = sub_b = None
            if columns:  # int8_mixed_scaled_mm: the outlier columns in 16 bit
                sub_a = a.new_empty((rows, columns))
                cb_cols = a.new_empty((n, columns), dtype=torch.int8)
                scaled = cb_cols.to(torch.float32)  # int8_vectorwise_dequant
                sub_b = scaled.to(a.dtype)
                del cb_cols, scaled
            out32 = a.new_empty((rows, n), dtype=torch.int32)  # int8_linear_matmul
            out16 = a.new_empty((rows, n), dtype=torch.float16)  # int8_mm_dequant
            out = out16.to(a.dtype)
            del out16, out32
            if sub_b is not None:
                out = out.addmm(sub_a, sub_b.t())
                del sub_b
            del ca, row_stats, sub_a
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
            return out.view(*x.shape[:-1], n)

    class Serve4bitLinear(bnb.nn.Linear4bit):  # type: ignore[misc,name-defined]
        """Packed 4-bit weight ((out * in + 1) // 2, 1) uint8 with what ``Params4bit``
        keeps on it, its quantization state loaded apart (``fourbit``)."""

        def __init__(
            self,
            in_features: int,
            out_features: int,
            bias: bool,
            quant_type: str,
            nested: bool,
            compute_dtype: torch.dtype,
        ) -> None:
            torch.nn.Linear.__init__(self, in_features, out_features, bias, device="meta")
            packed = (in_features * out_features + 1) // 2
            self.weight = torch.nn.Parameter(
                torch.empty((packed, 1), dtype=torch.uint8, device="meta"), requires_grad=False
            )
            # BitsAndBytesConfig(bnb_4bit_compute_dtype=--dtype): peft moves the adapters
            # to the base layer in this dtype (then upcasts them), as on the GPU
            self.compute_dtype = compute_dtype
            self.quant_storage = torch.uint8
            # quantized from the weight staged in --dtype (Params4bit._quantize)
            self.quant_state = fourbit.QuantState(
                (out_features, in_features), compute_dtype, quant_type, nested
            )
            fourbit.mark(self.weight, self.quant_state, self)
            self.nested = nested

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            k, n = self.in_features, self.out_features
            rows = x.numel() // k
            blocks = -(-n * k // NF4_BLOCKSIZE)
            if use_fused_4bit_kernel(x.dtype, rows, n, k):  # the bias fused
                return x.new_empty((*x.shape[:-1], n))
            absmax = None  # _dequant_linear_fallback
            if self.nested:
                absmax_dq = x.new_empty((blocks,), dtype=torch.float32)
                absmax = absmax_dq + 0.0  # absmax_dq + absmax_offset
            weight = x.new_empty((n, k))
            out = F.linear(x, weight, self.bias)
            del weight, absmax
            return out

        def __deepcopy__(self, memo: dict[int, Any]) -> Any:
            return fourbit.copied(self, memo)

    # peft tells a 4-bit layer by its class name (DoRA copies a ``Linear4bit`` before
    # dequantizing it)
    Serve4bitLinear.__name__ = "Linear4bit"

    _CLASSES.extend([ServeInt8Linear, Serve4bitLinear])
    return _CLASSES


def use_fused_4bit_kernel(dtype: torch.dtype, rows: int, n: int, k: int) -> bool:
    """Whether bitsandbytes 0.50.2's ``gemm_4bit`` runs its fused kernel (else it
    dequantizes and calls ``F.linear``) for ``rows`` x ``k`` inputs and an ``n`` x ``k``
    weight on the ``DEVICE_PROPERTIES`` GPU: its own ``_gemm_4bit_use_custom_cuda``."""
    if rows > 1536 or k % NF4_BLOCKSIZE:
        return False
    ops = _bnb_cuda_ops()
    return bool(ops._gemm_4bit_use_custom_cuda(0, dtype, rows, n, k))


_CUDA_OPS: list[Any] = []


def _bnb_cuda_ops() -> Any:
    """bitsandbytes' CUDA backend module, imported on a CPU build of torch for its dispatch
    heuristic only (its import reads one CUDA binding, stood in for while it loads)."""
    if _CUDA_OPS:
        return _CUDA_OPS[0]
    missing = not hasattr(torch._C, "_cuda_getCurrentRawStream")
    if missing:
        torch._C._cuda_getCurrentRawStream = None  # type: ignore[attr-defined]
    try:
        import bitsandbytes.backends.cuda.ops as ops
    finally:
        if missing:
            del torch._C._cuda_getCurrentRawStream  # type: ignore[attr-defined]
    ops._gpu_dispatch_props = lambda index: DEVICE_PROPERTIES
    _CUDA_OPS.append(ops)
    return ops


# -- scaled_dot_product_attention on CUDA ----------------------------------------------------
def num_splits_heuristic(batch_heads_mblocks: int, num_sms: int, n_blocks: int, most: int) -> int:
    """FlashAttention-2's split-KV count (``flash_api.cpp`` ``num_splits_heuristic``)."""
    if batch_heads_mblocks >= 0.8 * num_sms:
        return 1
    most = min(most, num_sms, n_blocks)

    def eligible(splits: int) -> bool:
        return splits == 1 or -(-n_blocks // splits) != -(-n_blocks // (splits - 1))

    efficiency = []
    for splits in range(1, most + 1):
        if not eligible(splits):
            efficiency.append(0.0)
            continue
        waves = batch_heads_mblocks * splits / num_sms
        efficiency.append(waves / math.ceil(waves))
    best = max(efficiency, default=0.0)
    for splits in range(1, most + 1):
        if eligible(splits) and efficiency[splits - 1] >= 0.85 * best:
            return splits
    return 1


def _flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``_scaled_dot_product_flash_attention`` -> ``mha_fwd`` (q, k, v as (B, H, S, D))."""
    batch, heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    swapped = seq_q == 1 and heads > kv_heads  # seqlenq_ngroups_swapped
    rows, units = (heads // kv_heads, kv_heads) if swapped else (seq_q, heads)
    out = q.new_empty((batch, rows, units, dim))  # empty_like(q_padded)
    lse = q.new_empty((batch, units, rows), dtype=torch.float32)
    block_n = 256 if dim <= 64 else (128 if dim <= 128 else 64)
    dim_rounded = -(-dim // 32) * 32 if dim <= 128 else -(-dim // 64) * 64
    splits = num_splits_heuristic(
        batch * units * -(-rows // 64), DEVICE_PROPERTIES[0] * 2, -(-seq_k // block_n), 128
    )
    if splits > 1:
        lse_accum = q.new_empty((splits, batch, units, rows), dtype=torch.float32)
        out_accum = q.new_empty((splits, batch, units, rows, dim_rounded), dtype=torch.float32)
        del lse_accum, out_accum
    rng_state = q.new_empty((2,), dtype=torch.int64)
    unused = q.new_empty((), dtype=torch.int64)
    if swapped:  # out.transpose(1, 2).reshape(batch, 1, heads, dim): a copy
        out = out.transpose(1, 2).reshape(batch, 1, heads, dim)
    del lse, rng_state, unused
    return out.transpose(1, 2)


def _efficient_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The memory-efficient kernel with a mask: ``convert_boolean_attn_mask``,
    ``preprocess_mask`` (pad to a multiple of 8 unless aligned), the output (B, M, H, Kv);
    no logsumexp without autograd."""
    if mask.dtype == torch.bool:
        inverted = mask.logical_not()
        zero = q.new_zeros(())  # at::scalar_tensor(0.0)
        mask = torch.where(inverted, -math.inf, zero)
        del inverted, zero
    aligned = all(s % 8 == 0 for s in mask.stride()[:-1]) and mask.stride(-1) == 1
    if not aligned:
        last = mask.shape[-1]
        mask = F.pad(mask, (0, 8 - last % 8))[..., :last]
    batch, heads, seq_q, _ = q.shape
    out = q.new_empty((batch, seq_q, heads, v.shape[-1]))
    del mask
    return out.transpose(1, 2)


def cuda_sdpa(original: Any) -> Any:
    """``scaled_dot_product_attention`` as the CUDA build dispatches it (module docstring);
    what neither fused kernel takes (fp32, head dim > 256, dropout) runs ``original``."""

    def sdpa(
        query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
        enable_gqa=False,
    ):  # type: ignore[no-untyped-def]  # fmt: skip
        fused = (
            dropout_p == 0.0
            and query.dtype in (torch.bfloat16, torch.float16)
            and query.shape[-1] <= 256
            and query.shape[-1] % 8 == 0
        )
        if fused and attn_mask is None:
            return _flash_forward(query, key, value)
        if fused and not enable_gqa:
            return _efficient_forward(query, key, value, attn_mask)
        return original(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa,
        )  # fmt: skip

    return sdpa


# -- generate's reads of values --------------------------------------------------------------
class StopAt:
    """The length at which the stop check ends the decoding loop (``generate`` stops at
    ``max_length``, or earlier when a trace takes only its first steps)."""

    length = 0


@contextlib.contextmanager
def generate_on_fake_tensors(stop: StopAt, on_step: Any) -> Iterator[None]:
    """``generate``'s stop check decides by length (it reads ``unfinished.max() == 0`` on
    the host: computed, not read), and ``on_step`` is called at each loop test
    (``_has_unfinished_sequences``): before every decoding step and once at the end."""
    import transformers.generation.utils as gen_utils

    check, unfinished = (
        gen_utils.StopCheck.__call__,
        gen_utils.GenerationMixin._has_unfinished_sequences,
    )

    def stop_check(self, unfinished_sequences, tokens, length):  # type: ignore[no-untyped-def]
        if self.streamer is not None:
            self.streamer.put(tokens.cpu())
        unfinished_sequences.max() == 0  # noqa: B015 - allocated on the GPU, read there
        return length >= stop.length

    def has_unfinished(model, this_peer_finished, synced_gpus, device):  # type: ignore[no-untyped-def]
        on_step()
        return unfinished(model, this_peer_finished, synced_gpus, device)

    gen_utils.StopCheck.__call__ = stop_check  # type: ignore[method-assign]
    gen_utils.GenerationMixin._has_unfinished_sequences = has_unfinished  # type: ignore[method-assign]
    try:
        yield
    finally:
        gen_utils.StopCheck.__call__ = check  # type: ignore[method-assign]
        gen_utils.GenerationMixin._has_unfinished_sequences = unfinished  # type: ignore[method-assign]


@contextlib.contextmanager
def host_built_caches(recorder: Any) -> Iterator[None]:
    """transformers' cache layers make small tensors on the host in ``__init__`` (a static
    layer's ``cumulative_length``, a sliding one's ``_sliding_window_tensor``) and copy them
    to the device in ``lazy_initialization``, inside the first layer forward: on fake CPU
    tensors the copy is the tensor itself, so ``recorder`` (``servetrace.ServeRecorder``)
    records none at ``__init__`` and each at the copy, in the layer that runs."""
    import transformers.cache_utils as cache_utils

    classes = [
        c for c in vars(cache_utils).values()
        if isinstance(c, type) and issubclass(c, cache_utils.CacheLayerMixin)
    ]  # fmt: skip
    saved: list[tuple[type, str, Any]] = []

    def paused_init(original: Any) -> Any:
        def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            before, recorder.paused = recorder.paused, True
            try:
                original(self, *args, **kwargs)
            finally:
                recorder.paused = before

        return init

    def copied_to_device(original: Any) -> Any:
        def lazy_initialization(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            original(self, *args, **kwargs)
            for value in list(vars(self).values()):
                if isinstance(value, torch.Tensor):
                    recorder.track(value, recorder.layer)

        return lazy_initialization

    for cls in classes:
        for name, wrap in (("__init__", paused_init), ("lazy_initialization", copied_to_device)):
            if name in vars(cls):
                saved.append((cls, name, vars(cls)[name]))
                setattr(cls, name, wrap(vars(cls)[name]))
    try:
        yield
    finally:
        for cls, name, original in reversed(saved):
            setattr(cls, name, original)


@contextlib.contextmanager
def inference_code_paths() -> Iterator[None]:
    """The training tracer's GPU code paths (``trace/emulation.gpu_code_paths``: no
    padding or packed sequences found, transformers not ``is_tracing``), with SDPA as the
    CUDA build dispatches it at inference (``cuda_sdpa``)."""
    original = F.scaled_dot_product_attention
    with gpu_code_paths():
        flash_like = F.scaled_dot_product_attention
        sdpa = cuda_sdpa(original)
        F.scaled_dot_product_attention = sdpa  # type: ignore[assignment]
        torch.nn.functional.scaled_dot_product_attention = sdpa
        try:
            yield
        finally:
            F.scaled_dot_product_attention = flash_like  # type: ignore[assignment]
            torch.nn.functional.scaled_dot_product_attention = flash_like
