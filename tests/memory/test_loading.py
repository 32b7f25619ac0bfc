"""``from_pretrained`` as allocation events: a serving process's 4-bit weight quantized in the
order bitsandbytes 0.50.2 allocates (``Params4bit._quantize`` -> ``quantize_4bit``)."""

from __future__ import annotations

import pytest

from vramcalc.memory.allocator import ALLOC, FREE
from vramcalc.memory.loading import from_pretrained_events
from vramcalc.serve_plan import ServePlan

WEIGHT = ("model.layers.0.mlp.up_proj.weight", (128, 64), "bfloat16", False, True)


@pytest.mark.parametrize("first", [True, False])
def test_a_double_quantized_weight_is_loaded_in_bitsandbytes_order(first):
    """The warm-up segment (half a byte per 4-bit parameter), the bf16 staging, the CUDA
    op's fp32 absmax (128 blocks of 64), then the packed weight; ``get_4bit_type``'s code and
    its ``abs().max()``; the offset, the centred absmax, the process's dynamic map (first
    load only), the nested absmax (one block of 256), the uint8 absmax, the nested code;
    what is not kept freed. The weight keeps its data and every tensor of its state."""
    plan = ServePlan("tiny", quant="nf4", double_quant=True)
    events, handles = from_pretrained_events([WEIGHT], plan, first_in_process=first)
    made = [(ALLOC, -1, 4096), (FREE, -1, 0), (ALLOC, -2, 128 * 64 * 2), (ALLOC, -3, 512),
            (ALLOC, -4, 4096), (ALLOC, -5, 64), (ALLOC, -6, 64), (ALLOC, -7, 4),
            (FREE, -6, 0), (FREE, -7, 0), (ALLOC, -8, 4), (ALLOC, -9, 512)]  # fmt: skip
    later = -10
    if first:
        made.append((ALLOC, -10, 1024))
        later = -11
    made += [(ALLOC, later, 4), (ALLOC, later - 1, 128), (ALLOC, later - 2, 1024),
             (FREE, -9, 0), (FREE, -3, 0), (FREE, -2, 0)]  # fmt: skip
    assert events == made
    assert handles == {WEIGHT[0]: (-4, later - 1, -5, -8, later, later - 2)}


def test_without_double_quantization_the_fp32_absmax_is_kept():
    plan = ServePlan("tiny", quant="nf4", double_quant=False)
    events, handles = from_pretrained_events([WEIGHT], plan)
    assert [n for op, _, n in events if op == ALLOC] == [4096, 128 * 64 * 2, 512, 4096, 64, 64, 4]
    assert handles == {WEIGHT[0]: (-4, -3, -5)}
