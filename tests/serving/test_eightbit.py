"""LLM.int8 bases served on fake tensors: what peft's merge and DoRA allocate on an int8
weight, event by event, from the sources of peft 0.21 and bitsandbytes 0.50.2."""

from __future__ import annotations

from dataclasses import replace

from tests.conftest import TINY_LLAMA
from tests.serving.test_fourbit import HIDDEN, LINEARS, _sizes
from vramcalc.serve_plan import serve_plan
from vramcalc.serving.servereplay import replay, whole_run
from vramcalc.serving.servetrace import trace_serving
from vramcalc.trace.steptrace import CUBLAS_WORKSPACE_BYTES


def _plan(**kw):
    kw = {"adapters": 0, "batch": 2, "prompt_tokens": 16, "new_tokens": 7, **kw}
    return serve_plan("tiny", quant="int8", rank=4, **kw)


def test_merging_dequantizes_adds_the_delta_and_quantizes_again():
    """peft's ``Linear8bitLt.merge`` on the first targeted linear (q_proj, 64 x 64):
    ``int8_vectorwise_dequant`` (``A * SCB.view(-1, 1)`` in fp32, then ``* (1 / 127)``), the
    fp32 delta ``B @ A * scaling`` (the first matmul: its output, then the cuBLAS workspace;
    the order the allocator's trace of the same merge on an H100 shows), their sum,
    ``Int8Params(...).to(device)`` (the host copy back on the device in fp16, then
    ``int8_vectorwise_quant``'s fp32 row scales and int8 rows; the fp16 copy freed), then
    the old weight (a stand-in of 0 bytes for its loaded data and scales), the merge's
    locals and the adapter freed."""
    n = HIDDEN * HIDDEN
    plan = _plan(adapters=1, mode="merged", targets=("q_proj",))
    trace = trace_serving(TINY_LLAMA, plan, rounds=(1, 1))
    start = dict(trace.markers)["merge"]
    assert _sizes(trace.events, start, 18) == [
        ("+", 4 * n), ("+", 4 * n), ("-", 4 * n),  # int8_vectorwise_dequant
        ("+", 4 * n), ("+", CUBLAS_WORKSPACE_BYTES), ("+", 4 * n), ("-", 4 * n),  # the delta
        ("+", 4 * n),  # output + delta
        ("+", 2 * n), ("+", 4 * HIDDEN), ("+", n), ("-", 2 * n),  # Int8Params._quantize
        ("-", 0), ("-", 4 * n), ("-", 4 * n), ("-", 4 * n),  # old weight, merge's locals
        ("-", 4 * 4 * HIDDEN), ("-", 4 * HIDDEN * 4),  # lora_A, lora_B (fp32)
    ]  # fmt: skip


def test_a_merged_int8_base_holds_what_it_loaded_and_the_workspace():
    """Each merged weight is quantized again to tensors of the loaded ones' sizes (int8 rows,
    fp32 scales) and the old ones are freed: the card holds what loading left and the
    cuBLAS workspace of the merge's first matmul."""
    loaded = replay(*whole_run(TINY_LLAMA, _plan()))["loaded_allocated_bytes"]
    merged = replay(*whole_run(TINY_LLAMA, _plan(adapters=1, mode="merged")))
    assert merged["loaded_allocated_bytes"] == loaded + CUBLAS_WORKSPACE_BYTES
    largest = max(o * i for o, i in LINEARS)  # down_proj: 4 fp32 copies and the fp16 one
    assert merged["phase_allocated_bytes"]["merge"] >= loaded + 18 * largest


def test_dora_dequantizes_the_int8_weight_for_its_magnitude():
    """DoRA's magnitude (``DoraLinearLayer.update_layer``) dequantizes an int8 weight as peft's
    ``dequantize_module_weight`` does (no copy of the layer: peft copies only a
    ``Linear4bit``): after the adapter's copies (fp32: peft casts an adapter to its base
    layer's dtype only when that is a float type, and int8 is not), the fp32 product and the
    scaled weight, then ``B @ A`` and the cuBLAS workspace its matmul (the first) makes."""
    n = HIDDEN * HIDDEN
    plan = _plan(adapters=1, targets=("q_proj",))
    plan = replace(plan, adapters=tuple(replace(a, dora=True) for a in plan.adapters))
    trace = trace_serving(TINY_LLAMA, plan, rounds=(1, 1))
    start = dict(trace.markers)["adapters"]
    assert _sizes(trace.events, start, 7) == [
        ("+", 4 * 4 * HIDDEN), ("+", 4 * HIDDEN * 4),  # lora_A, lora_B in fp32
        ("+", 4 * n), ("+", 4 * n), ("-", 4 * n),  # int8_vectorwise_dequant
        ("+", 4 * n), ("+", CUBLAS_WORKSPACE_BYTES),  # B @ A, then the first matmul's workspace
    ]  # fmt: skip


def test_a_merge_onto_int8_weights_is_simulated(tiny_llama_dir):
    from vramcalc.serving.serve import prepare_serving
    from vramcalc.serving.serve_planner import serve_memory

    plan = serve_plan(
        str(tiny_llama_dir), quant="int8", adapters=1, mode="merged", batch=2,
        prompt_tokens=16, new_tokens=8,
    )  # fmt: skip
    memory = serve_memory(prepare_serving(plan), plan, None, "simulate")
    assert memory.allocator_model == "simulated"
    assert memory.peak_phase in ("merge", "prefill", "decode")
    assert not any("APPROXIMATE" in a for a in memory.assumptions)
