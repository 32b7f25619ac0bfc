"""torch's ``tree_leaves``, with the shapes a dispatched op's arguments and outputs take walked
here first.

The recorders list every op's outputs (each new storage an allocation) and, for some, its
inputs. ``torch.utils._pytree.tree_leaves`` costs about 1.5 us for a pair of tensors and 4 us
for ``((t, [t, t], 3), {"a": t})`` (its registry is asked for every node's type); a trace
dispatches a hundred thousand ops. ``make_leaves(torch, tree_leaves)`` gives a function with
the same answers: plain tuples, lists and dicts (values in insertion order, as pytree
flattens them) walked here, tensors, numbers, strings, ``None``, dtypes and devices leaves as
pytree has them, anything else (a named tuple, torch's ``return_types``, a registered class)
handed to ``tree_leaves``. torch comes from the caller: importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def make_leaves(torch: Any, tree_leaves: Callable[[Any], list[Any]]) -> Callable[[Any], list[Any]]:
    """``leaves(tree) == tree_leaves(tree)`` (module docstring)."""
    tensor = torch.Tensor
    scalars = (int, float, bool, str, type(None), torch.dtype, torch.device)

    def into(tree: Any, out: list[Any]) -> None:
        kind = type(tree)
        if kind is tuple or kind is list:
            for item in tree:
                into(item, out)
        elif kind is dict:
            for item in tree.values():
                into(item, out)
        elif isinstance(tree, tensor) or kind in scalars:
            out.append(tree)
        else:
            out.extend(tree_leaves(tree))

    def leaves(tree: Any) -> list[Any]:
        if isinstance(tree, tensor):
            return [tree]
        out: list[Any] = []
        into(tree, out)
        return out

    return leaves
