"""Prefill and decode tokens/s of a serving plan, priced with the training path's roofline.

A forward of ``generate`` is a list of kernels, each priced as ``throughput.py`` prices a
training kernel, with the same fitted constants (``data/calibration.json``)::

    kernel GPU seconds = max(FLOPs / (peak x efficiency), bytes / (bandwidth x bandwidth_efficiency))
                         + kernel_seconds
    host seconds       = python_call_seconds x Python-level calls + dispatch_seconds x ops
    forward seconds    = max(host, GPU)     launches are asynchronous; generate syncs each step

Decoding is bandwidth-bound: each step reads every weight once (k-bit weights packed, but
bitsandbytes dequantizes them to 16 bit first when a step has more than one token, i.e. a
batch above 1) and each sequence's cache, at the mean cache length of the request. Prefill
is one forward over ``batch x prompt`` tokens (causal attention: each query sees half the
prompt on average, sliding layers at most their window).

Unmerged adapters add, per targeted linear of every layer, ``lora_A`` and ``lora_B`` matmuls in
fp32 (peft casts the input to the adapter dtype; the matmuls run at the fp32 peak), the
scaling and the add, and their host calls; ``multi`` runs them once per distinct adapter of
the batch, on its sub-batch, plus the gather and scatter of that sub-batch.

The host counts are by rule, per decoder layer of a llama-style block in transformers 5.17
(``modeling_llama.py``: two RMSNorms, four attention and three MLP projections, RoPE, the
cache update, SDPA, the residual adds) and per ``generate`` step (logits processors,
stopping criteria, the next inputs); they are not traced. No serving measurement backs the
constants yet: the harness has no inference case kind so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vramcalc.catalog import Gpu
from vramcalc.memory import DTYPE_BYTES
from vramcalc.serve_plan import ServePlan
from vramcalc.serving.serve import ServeModel, base_weight_bytes
from vramcalc.speed.throughput import ThroughputCalibration, peak_tflops_for

# host work by rule: (dispatched ops, Python-level calls, kernels)
BLOCK_HOST = (60, 25, 30)  # one decoder layer, bf16 weights
KBIT_LINEAR_HOST = (3, 3, 1)  # each bitsandbytes linear on top (+1 kernel: dequantize, T > 1)
LORA_HOST = (8, 6, 5)  # each targeted linear, one adapter (dropout, cast, A, B, scale, add)
MULTI_LORA_HOST = (4, 2, 2)  # each targeted linear, each distinct adapter: sub-batch gather/scatter
GENERATE_STEP_HOST = (40, 60, 20)  # one generate step outside the model
# elementwise traffic of one decoder layer per token, in hidden/intermediate widths read+written
ELEMENTWISE_HIDDEN_WIDTHS = 24  # norms (fp32 upcast), residual adds, RoPE over q and k
ELEMENTWISE_INTERMEDIATE_WIDTHS = 4  # activation and gate * up


#: what the committed serving records say of these predictions (``reports/serve_speed.md``:
#: ``python -m vramcalc.serving.servecompare --speed data/measurements/h100_serve*.jsonl``);
#: every ``serve`` table prints it. ``tests/serving/test_servesim.py`` checks it against the
#: report's medians.
SPEED_EVIDENCE = (
    "on 22 H100 serving runs these speeds were above the measured ones by a median 124.0 % "
    "(prefill) and 76.3 % (decode), int8 bases the most: read them as upper bounds "
    "(reports/serve_speed.md)"
)


@dataclass(frozen=True)
class ForwardTime:
    seconds: float
    host_seconds: float
    gpu_seconds: float
    flops: float
    bytes: float

    @property
    def bound(self) -> str:
        return "host" if self.host_seconds > self.gpu_seconds else "gpu"


@dataclass(frozen=True)
class ServeSpeed:
    """Predicted serving speed of one plan on one GPU."""

    gpu: Gpu
    prefill: ForwardTime  # one forward over batch x prompt tokens (all copies)
    decode_step: ForwardTime  # one step of every sequence (all copies)
    base_decode_step_seconds: float  # the same step without adapters
    batch: int
    prompt_tokens: int
    new_tokens: int
    measured: bool

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.batch * self.prompt_tokens / self.prefill.seconds

    @property
    def decode_tokens_per_second(self) -> float:
        return self.batch / self.decode_step.seconds

    @property
    def request_seconds(self) -> float:
        """Prefill then every decoding step: the time of the batch's requests."""
        return self.prefill.seconds + self.new_tokens * self.decode_step.seconds

    @property
    def adapter_overhead_fraction(self) -> float:
        """How much longer a decoding step is with the adapters than without."""
        return self.decode_step.seconds / self.base_decode_step_seconds - 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu.name,
            "prefill_seconds": self.prefill.seconds,
            "prefill_tokens_per_second": self.prefill_tokens_per_second,
            "prefill_bound": self.prefill.bound,
            "decode_step_seconds": self.decode_step.seconds,
            "decode_tokens_per_second": self.decode_tokens_per_second,
            "decode_bound": self.decode_step.bound,
            "decode_bytes_per_step": self.decode_step.bytes,
            "request_seconds": self.request_seconds,
            "adapter_overhead_fraction": self.adapter_overhead_fraction,
            "speed_measured": self.measured,
        }


@dataclass
class _Tally:
    """Kernels and host work of one forward, priced as they are added."""

    peak_flops: float
    fp32_flops: float
    bandwidth: float
    cal: ThroughputCalibration
    gpu: float = 0.0
    host: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0

    def kernel(self, flops: float, nbytes: float, count: float = 1, fp32: bool = False) -> None:
        rate = (
            self.fp32_flops * self.cal.fp32_efficiency
            if fp32
            else self.peak_flops * self.cal.compute_efficiency
        )
        self.gpu += max(flops / rate, nbytes / self.bandwidth) + count * self.cal.kernel_seconds
        self.flops += flops
        self.bytes += nbytes

    def attention(self, flops: float, nbytes: float, count: float) -> None:
        rate = self.peak_flops * self.cal.attention_efficiency
        self.gpu += max(flops / rate, nbytes / self.bandwidth) + count * self.cal.kernel_seconds
        self.flops += flops
        self.bytes += nbytes

    def calls(self, host: tuple[int, int, int], times: float) -> None:
        ops, python, kernels = host
        self.host += times * (
            ops * self.cal.dispatch_seconds + python * self.cal.python_call_seconds
        )
        self.gpu += times * kernels * self.cal.kernel_seconds

    def done(self) -> ForwardTime:
        return ForwardTime(max(self.host, self.gpu), self.host, self.gpu, self.flops, self.bytes)


def _forward(
    model: ServeModel,
    plan: ServePlan,
    tally: _Tally,
    batch: int,
    tokens: int,
    attended: float,
    adapters_in_batch: int,
    positions: int,
) -> None:
    """Add one forward of ``batch`` sequences x ``tokens`` tokens seeing ``attended`` keys."""
    base, layout, d = model.base, model.layout, DTYPE_BYTES[plan.dtype]
    t = batch * tokens
    layers = base.num_layers
    # linears: the weights once, activations in and out
    kbit_bytes = (
        base_weight_bytes(base, plan) - (base.total_params - base.params_by_role["linear"]) * d
    )
    for g in base.linears:
        n = g.weight_params * g.count
        act = t * (g.in_features + g.out_features) * d * g.count
        if plan.is_kbit and g.quantizable:
            packed = kbit_bytes * n / max(base.params_by_role["linear"], 1)
            if t > 1:  # dequantize to 16 bit, then a 16-bit matmul
                tally.kernel(0, packed + 2 * n, g.count)
                tally.kernel(2 * t * n, 2 * n + act, g.count)
            else:  # gemv on packed weights
                tally.kernel(2 * t * n, packed + act, g.count)
            tally.calls(KBIT_LINEAR_HOST, g.count)
        else:
            tally.kernel(2 * t * n, n * d + act, g.count)
    # the output head and the embedding lookup
    head = base.vocab_size * base.hidden_size
    tally.kernel(2 * batch * positions * head, head * d + batch * positions * base.vocab_size * d)
    tally.kernel(0, t * base.hidden_size * d * 2)
    # attention over the cache
    q_width = base.num_attention_heads * base.head_dim
    for window in layout.windows:
        seen = min(attended, window) if window else attended
        # decoding reads each sequence's cache; prefill reads its own k and v once
        kv = layout.token_bytes(plan.dtype) * (batch * seen if tokens == 1 else t)
        tally.attention(4 * t * q_width * seen, kv + 2 * t * q_width * d, 1)
    # elementwise work of the blocks, and their host calls
    widths = ELEMENTWISE_HIDDEN_WIDTHS * base.hidden_size
    widths += ELEMENTWISE_INTERMEDIATE_WIDTHS * base.intermediate_size
    tally.kernel(0, layers * t * widths * d)
    tally.calls(BLOCK_HOST, layers)
    # unmerged adapters: fp32 small matmuls per targeted linear, per distinct adapter
    if plan.mode != "merged" and model.adapters and adapters_in_batch:
        adapter = model.adapters[0]
        for g in adapter.targeted:
            r = adapter.spec.rank
            lora = r * (g.in_features + g.out_features)
            act = t * (g.in_features + 2 * r + 3 * g.out_features) * 4
            tally.kernel(
                2 * t * lora * g.count,
                (lora * 4 * adapters_in_batch + act) * g.count,
                3 * g.count * adapters_in_batch,
                fp32=True,
            )
            tally.calls(LORA_HOST, g.count * adapters_in_batch)
            if plan.mode == "multi":
                tally.calls(MULTI_LORA_HOST, g.count * adapters_in_batch)


def _adapters_in_batch(plan: ServePlan, batch: int) -> int:
    if not plan.adapters or plan.mode == "merged":
        return 0
    return min(len(plan.adapters), batch) if plan.mode == "multi" else 1


def estimate_serve_speed(
    model: ServeModel, plan: ServePlan, gpu: Gpu, cal: ThroughputCalibration
) -> ServeSpeed:
    """Prefill and decode speed of ``plan`` on ``gpu`` (merged copies run one after another)."""
    dense = peak_tflops_for(gpu, "fp16" if plan.dtype == "fp16" else "bf16") * 1e12
    fp32 = (gpu.fp32_tflops or 0) * 1e12 or dense
    peak = fp32 if plan.dtype == "fp32" else dense
    bandwidth = float(gpu.memory_bandwidth_gbps or 0) * 1e9 * cal.bandwidth_efficiency
    copies = plan.model_copies
    per_copy = plan.copy_batch
    positions = 1 if plan.logits == "last" else plan.prompt_tokens
    mean_cache = plan.prompt_tokens + plan.new_tokens / 2

    def run(tokens: int, attended: float, with_adapters: bool, pos: int) -> ForwardTime:
        tally = _Tally(peak, fp32, bandwidth, cal)
        for _ in range(copies):
            used = _adapters_in_batch(plan, per_copy) if with_adapters else 0
            _forward(model, plan, tally, per_copy, tokens, attended, used, pos)
            tally.calls(GENERATE_STEP_HOST, 1)
        return tally.done()

    prefill = run(plan.prompt_tokens, (plan.prompt_tokens + 1) / 2, True, positions)
    decode = run(1, mean_cache, True, 1)
    base_decode = run(1, mean_cache, False, 1)
    return ServeSpeed(
        gpu,
        prefill,
        decode,
        base_decode.seconds,
        plan.batch,
        plan.prompt_tokens,
        plan.new_tokens,
        measured=False,
    )
