"""4-bit (NF4/FP4) bases served on fake tensors: what loading keeps, checked against the
tensors bitsandbytes itself makes (its CPU backend quantizes with the same ``quantize_4bit``),
and what peft's merge and DoRA allocate, event by event, from their sources."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.conftest import TINY_LLAMA
from vramcalc.cli import cli
from vramcalc.memory.allocator import ALLOC, MIN_BLOCK_BYTES
from vramcalc.serve_plan import serve_plan
from vramcalc.serving.servereplay import replay, whole_run
from vramcalc.serving.servetrace import trace_serving
from vramcalc.trace.steptrace import CUBLAS_WORKSPACE_BYTES

HIDDEN, INTER, VOCAB = TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"], 256
KV = TINY_LLAMA["num_key_value_heads"] * HIDDEN // TINY_LLAMA["num_attention_heads"]
#: (out, in) of each quantized linear of a tiny llama layer: q, k, v, o, gate, up, down
LINEARS = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
           (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]  # fmt: skip


def _block(nbytes: int) -> int:
    """What the caching allocator hands out for ``nbytes`` (a multiple of 512)."""
    return -(-nbytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES


def _bitsandbytes_kept(out_features: int, in_features: int, quant: str, nested: bool) -> int:
    """Bytes of the tensors one quantized weight keeps, as bitsandbytes makes them: its
    packed data and every tensor of its ``QuantState`` (``state2``'s with double
    quantization), each its own allocation."""
    import torch
    from bitsandbytes.functional import quantize_4bit

    weight = torch.zeros((out_features, in_features), dtype=torch.bfloat16)
    packed, state = quantize_4bit(weight, compress_statistics=nested, quant_type=quant)
    tensors = [packed, state.absmax, state.code]
    if nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return sum(_block(t.numel() * t.element_size()) for t in tensors)


def _plan(quant: str = "nf4", **kw):
    kw = {"adapters": 0, "batch": 2, "prompt_tokens": 16, "new_tokens": 7, **kw}
    return serve_plan("tiny", quant=quant, rank=4, **kw)


@pytest.mark.parametrize(("quant", "nested"), [("nf4", True), ("nf4", False), ("fp4", True)])
def test_loading_keeps_the_packed_weights_and_their_quantization_state(quant, nested):
    """Once loaded, the card holds every 16-bit parameter (embeddings, head, norms) and, per
    quantized linear, what ``quantize_4bit`` keeps; with double quantization also the dynamic
    map bitsandbytes makes once per process (256 fp32 entries)."""
    import bitsandbytes.functional as bnb_functional

    plan = _plan(quant, double_quant=nested)
    layers = TINY_LLAMA["num_hidden_layers"]
    sixteen_bit = [VOCAB * HIDDEN] * 2 + [HIDDEN] * (2 * layers + 1)
    expected = sum(_block(2 * n) for n in sixteen_bit)
    expected += layers * sum(_bitsandbytes_kept(o, i, quant, nested) for o, i in LINEARS)
    if nested:
        dynamic = bnb_functional.name2qmap["dynamic"]
        expected += _block(dynamic.numel() * dynamic.element_size())
    observed = replay(*whole_run(TINY_LLAMA, plan))
    assert observed["loaded_allocated_bytes"] == expected


def _sizes(events, start: int, count: int) -> list[tuple[str, int]]:
    return [("+" if op == ALLOC else "-", n) for op, _, n in events[start : start + count]]


def test_merging_dequantizes_adds_the_delta_and_quantizes_again():
    """peft's ``Linear4bit.merge`` on the first targeted linear (q_proj, 64 x 64: 64 blocks
    of 64), from the sources of peft 0.21 and bitsandbytes 0.50.2: ``dequantize_4bit`` (the
    absmax back in fp32, the bf16 weight), the fp32 delta ``B @ A * scaling`` (the first
    matmul: its output, then the cuBLAS workspace), their sum, ``Params4bit(...).to(device)``
    (the host copy back on the device, ``quantize_4bit``'s absmax and packed weight, the code
    and its ``abs().max()``, the offset, the centred absmax, the nested absmax, the uint8
    absmax, the nested code), then the old weight (a stand-in of 0 bytes for its loaded
    tensors), the transients and the adapter freed."""
    n, blocks = HIDDEN * HIDDEN, HIDDEN * HIDDEN // 64
    plan = _plan(adapters=1, mode="merged", targets=("q_proj",))
    trace = trace_serving(TINY_LLAMA, plan, rounds=(1, 1))
    start = dict(trace.markers)["merge"]
    assert _sizes(trace.events, start, 30) == [
        ("+", 4 * blocks), ("+", 2 * n), ("-", 4 * blocks),  # dequantize_4bit
        ("+", 4 * n), ("+", CUBLAS_WORKSPACE_BYTES), ("+", 4 * n), ("-", 4 * n),  # the delta
        ("+", 4 * n), ("+", 4 * n),  # output + delta; .to(device)
        ("+", 4 * blocks), ("+", n // 2), ("+", 64), ("+", 64), ("+", 4), ("-", 64), ("-", 4),
        ("+", 4), ("+", 4 * blocks), ("+", 4), ("+", blocks), ("+", 1024),
        ("-", 4 * blocks), ("-", 4 * blocks), ("-", 4 * n),  # centred, absmax, device copy
        ("-", 0), ("-", 2 * n), ("-", 4 * n), ("-", 4 * n),  # old weight, merge's locals
        ("-", 4 * 4 * HIDDEN), ("-", 4 * HIDDEN * 4),  # lora_A, lora_B (fp32)
    ]  # fmt: skip


def test_a_merged_base_holds_what_it_loaded_and_the_workspace():
    """After merging, each weight is quantized again to the same tensors and the old ones,
    the adapter and the merge's transients are freed: the card holds what loading left
    and the cuBLAS workspace the merge's first matmul made."""
    loaded = replay(*whole_run(TINY_LLAMA, _plan()))["loaded_allocated_bytes"]
    merged = replay(*whole_run(TINY_LLAMA, _plan(adapters=1, mode="merged")))
    assert merged["loaded_allocated_bytes"] == loaded + CUBLAS_WORKSPACE_BYTES
    assert merged["phase_allocated_bytes"]["merge"] > merged["loaded_allocated_bytes"]


def test_dora_copies_the_layer_before_dequantizing_it():
    """DoRA's magnitude (``DoraLinearLayer.update_layer``) deep-copies a ``Linear4bit``:
    ``Params4bit.__deepcopy__`` copies the quantization state, then the packed data; the
    module's own ``quant_state`` is copied again; then ``dequantize_4bit``. The adapter's
    bf16 copies (peft moves it in the compute dtype) come first."""
    from dataclasses import replace

    n, blocks = HIDDEN * HIDDEN, HIDDEN * HIDDEN // 64
    plan = _plan(adapters=1, targets=("q_proj",))
    plan = replace(plan, adapters=tuple(replace(a, dora=True) for a in plan.adapters))
    trace = trace_serving(TINY_LLAMA, plan, rounds=(1, 1))
    start = dict(trace.markers)["adapters"]
    state = [("+", blocks), ("+", 64), ("+", 4), ("+", 4), ("+", 1024)]
    assert _sizes(trace.events, start, 16) == [
        ("+", 2 * 4 * HIDDEN), ("+", 2 * HIDDEN * 4),  # lora_A, lora_B in bf16
        *state, ("+", n // 2), *state,
        ("+", 4 * blocks), ("+", 2 * n), ("-", 4 * blocks),
    ]  # fmt: skip


def test_an_nf4_plan_is_simulated(tiny_llama_dir):
    from vramcalc.serving.serve import prepare_serving
    from vramcalc.serving.serve_planner import serve_memory

    plan = serve_plan(
        str(tiny_llama_dir), quant="nf4", adapters=1, batch=2, prompt_tokens=16, new_tokens=8
    )
    memory = serve_memory(prepare_serving(plan), plan, None, "simulate")
    assert memory.allocator_model == "simulated"
    assert not any(a.startswith("APPROXIMATE") for a in memory.assumptions)


def test_cli_serves_an_nf4_base_simulated(tiny_llama_dir):
    args = ["serve", "--model", str(tiny_llama_dir), "--quant", "nf4", "--adapters", "2",
            "--mode", "multi", "--prompt-tokens", "16", "--new-tokens", "8", "--gpu", "H200",
            "--allocator-model", "simulate"]  # fmt: skip
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert "allocator model: simulated" in text.output
    assert "APPROXIMATE" not in text.output and "approximate" not in text.output
    data = CliRunner().invoke(cli, [*args, "--json"])
    assert json.loads(data.stdout)["allocator_model"] == "simulated"
