"""The instrument first: known allocations and known saved sets read back exactly."""

from __future__ import annotations

import pytest
import torch

from tests.memory.memtrace import MemoryTracer, fake_saved_bytes, round_bytes, saved_bytes


def test_round_bytes_like_the_cuda_allocator():
    assert [round_bytes(n) for n in (0, 1, 512, 513, 4000)] == [0, 512, 512, 1024, 4096]
    assert round_bytes(4000, 1) == 4000


@pytest.mark.parametrize("round_to, expected", [(512, 4096), (1, 4000)])
def test_known_allocation_reads_back_exactly(round_to, expected):
    with MemoryTracer(round_to=round_to) as tracer:
        x = torch.empty(1000, dtype=torch.float32)
        assert tracer.live_bytes == expected
        view = x.view(10, 100)  # a view allocates nothing
        assert tracer.live_bytes == expected
        del x, view
        assert tracer.live_bytes == 0
    report = tracer.report()
    assert report.peak_bytes == expected
    assert report.peak_by_category == {"temporaries": expected}
    assert report.final_bytes == 0


def test_in_place_ops_and_tracked_inputs():
    a = torch.zeros(256)  # 1024 B
    with MemoryTracer(timeline=True) as tracer:
        tracer.track(a, "inputs")
        a.add_(1)  # in place: nothing new
        b = a * 2  # 1024 B new
        assert tracer.live_by_category() == {"inputs": 1024, "temporaries": 1024}
        del b
    report = tracer.report()
    assert report.peak_bytes == 2048
    assert [p.op for p in report.timeline] == ["add_", "mul"]


def test_saved_set_of_a_product_reads_back_exactly():
    x = torch.randn(100, 100, requires_grad=True)
    y = torch.randn(100, 100, requires_grad=True)
    report, out = saved_bytes(lambda: x * y)
    assert report.input_bytes == 0  # x, y were not passed as arguments
    assert report.new_bytes == 2 * 40000  # mul keeps both sides
    report, out = saved_bytes(torch.mul, x, y)
    assert report.input_bytes == 2 * 40000 and report.new_bytes == 0
    report, out = saved_bytes(torch.mul, x, x)  # the same storage twice counts once
    assert report.input_bytes == 40000


def test_saved_set_follows_requires_grad():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(16, 32)  # frozen: mm keeps the weight, not the input
    report, out = saved_bytes(torch.nn.functional.linear, x, w)
    assert [t.kind for t in report.tensors] == ["input"]
    assert report.tensors[0].shape == (32, 16)  # w.t(), a view of w
    report, out = saved_bytes(lambda t: t.sigmoid().sigmoid(), x)  # sigmoid keeps its output
    assert report.new_bytes == 2 * 64 * 32 * 4 and report.input_bytes == 0
    assert {t.created_by for t in report.tensors} == {"sigmoid"}


def test_training_step_categories():
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 128, bias=False)  # 128 KiB of fp32 weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(32, 256)
    with MemoryTracer() as tracer:
        tracer.watch_model(model)
        tracer.watch_optimizer(opt)
        tracer.track(x, "inputs")
        with tracer.phase("forward"):
            loss = model(x).square().mean()
        with tracer.phase("backward"):
            loss.backward()
        with tracer.phase("optimizer"):
            opt.step()
        del loss
    report = tracer.report()
    weight = 256 * 128 * 4
    assert report.final_by_category["parameters"] == weight
    assert report.final_by_category["gradients"] == weight
    assert report.final_by_category["optimizer_states"] == weight  # the momentum buffer
    assert report.final_by_category["inputs"] == 32 * 256 * 4
    assert {"forward", "backward", "optimizer"} <= set(report.peak_by_phase)


def test_fake_mode_measures_a_full_size_layer_without_memory():
    """A Llama-2-7B decoder layer, bf16 weights, 4096 tokens: measured on fake tensors."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32
    )
    config._attn_implementation = "sdpa"
    seq = 4096

    def build():
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            return LlamaDecoderLayer(config, 0)
        finally:
            torch.set_default_dtype(default)

    def inputs():
        x = torch.randn(1, seq, 4096, dtype=torch.bfloat16, requires_grad=True)
        cos = torch.randn(1, seq, 128, dtype=torch.bfloat16)
        return (x,), {"position_embeddings": (cos, cos.clone()), "attention_mask": None}

    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = fake_saved_bytes(build, inputs)
    h, i = seq * 4096, seq * 11008
    # full bf16 fine-tuning, by hand: 2 norms x (fp32 copy of input 4h + rsqrt 4*seq + bf16
    # normed 2h + bf16 output 2h, the projections' input), q/k after RoPE + v + out (2h each,
    # out is o_proj's input) + fp32 logsumexp (4*32*seq), gate + up + silu + product (2i each)
    expected = 2 * (4 * h + 4 * seq + 2 * h + 2 * h) + 4 * 2 * h + 4 * 32 * seq + 4 * 2 * i
    assert report.new_bytes == expected
    assert report.input_bytes == 2 * seq * 128 * 2  # cos, sin: arguments the layer keeps
