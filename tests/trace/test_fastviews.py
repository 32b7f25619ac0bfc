"""View ops answered by their meta kernel (vramcalc/trace/fastviews.py) give FakeTensorMode's
own outputs, and the traces that use them are the same event for event without them."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from tests.conftest import TINY_LLAMA
from vramcalc.trace import fastviews
from vramcalc.trace.fastviews import ANSWERED, VIEWS, make_call
from vramcalc.training_plan import TrainingPlan

aten = torch.ops.aten


def _cases(x, y, z):  # noqa: ANN001, ANN202 - a (4, 6, 8), a (6, 8) and a (1, 6, 1) tensor
    return {
        "detach.default": (x,),
        "alias.default": (x,),
        "view.default": (x, [4, 48]),
        "view.dtype": (x, torch.int16),
        "_unsafe_view.default": (x, [24, 8]),
        "_reshape_alias.default": (x, [24, 8], [8, 1]),
        "slice.Tensor": (x, 1, 2, 5),
        "select.int": (x, 0, 1),
        "t.default": (y,),
        "transpose.int": (x, 0, 2),
        "permute.default": (x, [2, 0, 1]),
        "expand.default": (z, [4, 6, 8]),
        "unsqueeze.default": (x, 1),
        "squeeze.default": (z,),
        "squeeze.dim": (z, 0),
        "squeeze.dims": (z, [0, 2]),
        "as_strided.default": (x, [2, 2], [1, 2], 3),
        "diagonal.default": (y,),
        "split.Tensor": (x, 2, 1),
        "split_with_sizes.default": (x, [1, 3], 0),
        "unbind.int": (x, 0),
    }


def _facts(out, source):  # noqa: ANN001, ANN202
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return [
        (
            type(t),
            tuple(t.shape),
            t.stride(),
            t.storage_offset(),
            t.dtype,
            t.device,
            t.requires_grad,
            t.untyped_storage()._cdata == source.untyped_storage()._cdata,
        )
        for t in outs
    ]


def _op(name: str):  # noqa: ANN202
    packet, _, overload = name.partition(".")
    return getattr(getattr(aten, packet), overload)


def test_each_view_op_gives_fake_tensor_modes_own_output():
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    call = make_call(torch)
    with mode:
        x = torch.empty(4, 6, 8, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(6, 8, device="cuda", dtype=torch.bfloat16)
        z = torch.empty(1, 6, 1, device="cuda", dtype=torch.bfloat16)
        cases = _cases(x, y, z)
        assert sorted(cases) == sorted(VIEWS)
        for name, args in cases.items():
            before = ANSWERED[0]
            want = _facts(_op(name)(*args), args[0])
            got = _facts(call(_op(name), args, {}), args[0])
            assert ANSWERED[0] == before + 1, name
            assert got == want, name
            assert all(kind is FakeTensor and same for kind, *_, same in got), name
            assert got[0][5] == torch.device("cuda:0")


def test_other_calls_go_through_fake_tensor_mode():
    """Ops not in VIEWS, keyword arguments, a fake tensor holding a constant and a real
    tensor: FakeTensorMode's own path (a constant's view keeps the constant there)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    call = make_call(torch)
    before = ANSWERED[0]
    with mode:
        x = torch.empty(4, 6, device="cuda")
        constant = torch.tensor(2.0)  # one element: FakeTensorMode keeps its value
        assert constant.constant is not None
        assert tuple(call(aten.mul.Tensor, (x, x), {}).shape) == (4, 6)
        assert tuple(call(aten.transpose.int, (x,), {"dim0": 0, "dim1": 1}).shape) == (6, 4)
        assert call(aten.detach.default, (constant,), {}).constant is not None
    real = call(aten.detach.default, (torch.ones(2),), {})
    assert type(real) is torch.Tensor and real.tolist() == [1.0, 1.0]
    assert ANSWERED[0] == before


def test_an_index_lifted_from_a_list_of_one_is_not_a_constant_for_indexing():
    """``x[[i]]`` (peft's sub-batch of one request per adapter): FakeTensorMode keeps the
    lifted index's value and answers the op without its cache; a twin without the value
    gives the same output. A boolean mask keeps its value (the output's size is its count)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    call = make_call(torch)
    with mode:
        x = torch.empty(4, 6, dtype=torch.bfloat16)
        index = torch.tensor([2])
        mask = torch.tensor([True])
        assert index.constant is not None and mask.constant is not None
        want = _facts(aten.index.Tensor(x, [index]), x)
        before = ANSWERED[0]
        got = _facts(call(aten.index.Tensor, (x, [index]), {}), x)
        assert ANSWERED[0] == before + 1 and got == want and want[0][1] == (1, 6)
        values = torch.empty(1, 6, dtype=torch.bfloat16)
        assert call(aten.index_put_.default, (x, [index], values, True), {}) is x
        assert ANSWERED[0] == before + 2
        small = torch.empty(1, 6, dtype=torch.bfloat16)
        assert tuple(call(aten.index.Tensor, (small, [mask]), {}).shape) == (1, 6)
        assert ANSWERED[0] == before + 2


def test_new_empty_tensors_are_fake_tensor_modes_own():
    """``empty``, ``empty_strided`` and ``new_empty`` under a mode that routes them through
    ``call``: the same tensors as FakeTensorMode alone makes (storage bytes and pinning too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    call = make_call(torch)

    class Through(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            return call(func, args, kwargs or {})

    def facts(t):  # noqa: ANN001, ANN202
        pinned = t.is_pinned() if t.device.type == "cpu" else None
        return (*_facts(t, t)[0][:7], t.untyped_storage().nbytes(), pinned)

    cuda, host = torch.device("cuda"), torch.device("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(4, 6, device="cuda", dtype=torch.bfloat16)
        cases = [
            (aten.empty.memory_format, ([3, 5],), {"dtype": torch.float32, "device": cuda}),
            (aten.empty.memory_format, ([3, 5],), {"dtype": torch.float16}),
            (aten.empty.memory_format, ([0],), {"dtype": torch.bfloat16, "device": cuda}),
            (
                aten.empty.memory_format,
                ([8],),
                {"dtype": torch.float32, "device": host, "pin_memory": True},
            ),
            (aten.empty_strided.default, ([3, 5], [1, 3]), {"dtype": torch.int8, "device": cuda}),
            (aten.new_empty.default, (x, [7]), {}),
            (aten.new_empty.default, (x, [7, 2]), {"dtype": torch.float32}),
            (aten.new_empty.default, (x, [7]), {"device": host, "pin_memory": False}),
        ]
        for func, args, kwargs in cases:
            want = facts(func(*args, **kwargs))
            before = ANSWERED[0]
            with Through():
                got = facts(func(*args, **kwargs))
            assert ANSWERED[0] == before + 1, (func, args, kwargs)
            assert got == want, (func, args, kwargs)
        assert facts(x.new_empty(3))[5] == torch.device("cuda:0")


def _trace(kind: str):  # noqa: ANN202
    if kind == "step-qlora":
        from vramcalc.trace.steptrace import trace_at

        plan = TrainingPlan("tiny", method="qlora", seq_len=16, batch_size=2)
        return trace_at(TINY_LLAMA, plan, 2, None)
    if kind.startswith("world"):
        pytest.importorskip("deepspeed")
        from vramcalc.trace.worldtrace import trace_world

        plan = TrainingPlan(
            "tiny",
            method="lora",
            seq_len=16,
            batch_size=2,
            num_gpus=2,
            strategy=kind.split("-")[1],
            gradient_checkpointing=True,
        )
        return trace_world(TINY_LLAMA, plan)
    from vramcalc.serve_plan import serve_plan
    from vramcalc.serving.servetrace import trace_serving

    if kind == "serve-int8":
        plan = serve_plan(
            "tiny", quant="int8", rank=4, adapters=1, batch=2, prompt_tokens=16, new_tokens=7
        )
    else:  # peft's mixed batch: a sub-batch of one request for each of four adapters
        plan = serve_plan(
            "tiny", quant="nf4", rank=4, adapters=4, mode="multi", batch=4, prompt_tokens=16,
            new_tokens=7,
        )  # fmt: skip
    return trace_serving(TINY_LLAMA, plan, rounds=(1, 1))


@pytest.mark.parametrize(
    "kind", ["step-qlora", "world-zero3", "world-fsdp", "serve-int8", "serve-multi"]
)
def test_traces_are_the_same_event_for_event_without_the_fast_views(kind):
    before = ANSWERED[0]
    fast = _trace(kind)
    assert ANSWERED[0] - before > 50
    fastviews.ENABLED[0] = False
    try:
        slow = _trace(kind)
    finally:
        fastviews.ENABLED[0] = True
    assert fast == slow
