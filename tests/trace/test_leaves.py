"""``trace.leaves.make_leaves``' function is torch's ``tree_leaves`` on what dispatched ops take and give."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._pytree import tree_leaves

from vramcalc.trace.leaves import make_leaves

leaves = make_leaves(torch, tree_leaves)
T = torch.ones(2)
Pair = collections.namedtuple("Pair", "a b")
TREES = [
    T,
    (T, None),
    [T, 3, 2.5, True, "mean", None],
    ((T, [T, T], 3), {"a": T, "b": [T, (T,)]}),
    {"x": (T,), "y": {"z": T}},
    None,
    7,
    torch.float32,
    torch.device("cpu"),
    torch.return_types.max((T, T)),
    Pair(T, [T, None]),
    collections.OrderedDict(a=T, b=1),
    (torch.Size([1, 2]), T),
    [slice(1, 2), Ellipsis, torch.strided, torch.contiguous_format],
    (),
    [[], {}],
]


@pytest.mark.parametrize("tree", TREES, ids=[type(t).__name__ for t in TREES])
def test_the_same_leaves_as_torch_in_the_same_order(tree):
    want, got = tree_leaves(tree), leaves(tree)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a is b or (not isinstance(a, torch.Tensor) and a == b)
