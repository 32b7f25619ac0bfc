"""What a trace runs under: the frozen heap (``fakemodel.frozen_heap``) and the streams of
autograd nodes (``nodestreams.NodeStreams.made_under``)."""

from __future__ import annotations

import gc
import weakref

import pytest

from vramcalc.trace.fakemodel import frozen_heap


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_a_trace_collects_its_own_garbage_and_not_what_was_there_before():
    gc.collect()
    older = _Cycle()
    older_ref = weakref.ref(older)
    del older  # garbage from before the trace: left alone while it runs
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        made = _Cycle()
        made_ref = weakref.ref(made)
        del made
        gc.collect()
        assert made_ref() is None  # the trace's own cycle
        assert older_ref() is not None
        with frozen_heap():  # nested: frozen until the outer one ends
            pass
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert older_ref() is None  # back in the collector's reach


def test_the_heap_is_given_back_when_a_trace_fails():
    with pytest.raises(RuntimeError), frozen_heap():
        raise RuntimeError("a failing trace")
    assert gc.get_freeze_count() == 0


def test_nodes_made_on_a_side_stream_are_noted_only_where_grad_makes_nodes():
    import torch

    from vramcalc.trace.nodestreams import NodeStreams

    streams = NodeStreams(lambda index: None, lambda tensor, index: None, id)
    leaf = torch.ones(3, requires_grad=True)
    with torch.no_grad(), streams.made_under(1):
        assert torch._C._len_torch_function_stack() == 0  # no mode on every call there
        out = leaf * 2
    assert out.grad_fn is None and streams.made_on == {}
    with streams.made_under(1):
        assert torch._C._len_torch_function_stack() == 1
        out = leaf * 2
    assert streams.made_on.get(out.grad_fn) == 1
