"""The stream each backward node runs on, for a trace on CPU fake tensors.

On a GPU the autograd engine runs a node's backward on the stream that was current when its
forward op ran (``Node::stream()``, from the ``InputMetadata`` of the op's outputs: the
engine's ``evaluate_function`` guards onto it), and it accumulates the gradients several
producers send to one input of a node on that consumer's stream, after ``record_stream``-ing
the incoming gradients onto it (``InputBuffer::add``, torch 2.11-2.13). On CPU nothing has a
stream, so a fake-device trace would run every backward op on the compute stream.

FSDP1 makes the views of an unsharded flat parameter (``FlatParamHandle._use_unsharded_views``:
``split`` then ``view`` per original parameter) inside ``with stream(unshard_stream)``
(``_runtime_utils._unshard``), so the flat parameter's ``AccumulateGrad`` node and, in
backward, the ``SplitWithSizesBackward`` that concatenates a unit's parameter gradients into
its flat gradient (a ``cat`` of the unsharded flat parameter's size) run on the unshard
stream, and so does the ``add`` of the two gradients of a parameter used twice (an embedding
tied to the LM head, held by the root unit). The allocator keeps those blocks in the unshard
stream's pool: the allocator traces of rank 0 of Llama-3.2-1B FSDP full fine-tuning
(``data/measurements/h100_fsdptrace_2026-12-06_traces``) have every unit's gradient ``cat``
and the tied embedding's gradient ``add`` there, which costs two more 502 MiB segments and
one more 118 MiB segment of reserve than the compute stream would.

``NodeStreams`` carries that rule into the trace: ``made_under(stream)`` (entered by the fake
device handle's ``stream`` context) notes the stream of every autograd node made there;
``hook(loss)`` before a backward makes each such node run on its stream (the recorder's
current stream, set by a pre-hook and reset by a post-hook) and has every producer of a
gradient for it bind that gradient to the node's stream (its accumulation runs there, and it
is used on that stream: ``record_stream``); ``accumulation_stream`` tells the recorder where
an ``add`` of bound gradients runs.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from vramcalc.trace.steptrace import graph_nodes

DEFAULT_STREAM = 0


class NodeStreams:
    """Autograd nodes made on a stream other than the default one, and the gradients bound to
    them. ``set_stream(index)`` makes a stream current; ``use_on(tensor, index)`` is
    ``record_stream``; ``key(tensor)`` names a tensor's storage."""

    def __init__(
        self,
        set_stream: Callable[[int], None],
        use_on: Callable[[Any, int], None],
        key: Callable[[Any], int],
    ) -> None:
        self._set_stream, self._use_on, self._key = set_stream, use_on, key
        self.made_on: dict[Any, int] = {}  # autograd node -> its stream (not the default)
        self._bound: dict[int, int] = {}  # storage key of a gradient on its way -> stream
        self._hooks: list[Any] = []  # this backward's hook handles

    @contextlib.contextmanager
    def made_under(self, stream: int) -> Iterator[None]:
        """Nodes the ops in here make (and an ``AccumulateGrad`` they make for a leaf) run
        their backward on ``stream``."""
        import torch

        if stream == DEFAULT_STREAM or not torch.is_grad_enabled():
            # with grad off no op makes a node (DeepSpeed's gathers and bucket copies run on
            # its side streams under ``no_grad``): no torch-function mode on every call there
            yield
            return
        from torch.overrides import TorchFunctionMode

        made_on = self.made_on

        class _Note(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                out = func(*args, **(kwargs or {}))
                _note_nodes(out, stream, made_on)
                return out

        with _Note():
            yield

    def hook(self, loss: Any) -> None:
        """Before ``loss.backward()``: each noted node of the graph runs on its stream, and
        each producer of a gradient for one binds that gradient to the node's stream."""
        if not self.made_on:
            return
        for node in graph_nodes(loss):
            consumers = [self.made_on.get(fn) for fn, _ in node.next_functions]
            if any(stream is not None for stream in consumers):
                self._hooks.append(node.register_hook(self._binder(consumers)))
            if (stream := self.made_on.get(node)) is not None:
                self._hooks.append(node.register_prehook(self._entry(stream)))
                self._hooks.append(node.register_hook(self._exit))

    def _entry(self, stream: int) -> Callable[..., None]:
        def prehook(grad_outputs: Any) -> None:
            for grad in grad_outputs:  # delivered: no longer on their way
                if grad is not None:
                    self._bound.pop(self._key(grad), None)
            self._set_stream(stream)

        return prehook

    def _exit(self, grad_inputs: Any, grad_outputs: Any) -> None:
        self._set_stream(DEFAULT_STREAM)

    def _binder(self, consumers: list[int | None]) -> Callable[..., None]:
        def bind(grad_inputs: Any, grad_outputs: Any) -> None:
            for grad, stream in zip(grad_inputs, consumers, strict=True):
                if grad is not None and stream is not None:
                    self._use_on(grad, stream)
                    self.bind(grad, stream)

        return bind

    def accumulation_stream(self, args: Any) -> int | None:
        """The stream an ``add`` of these arguments runs on in backward: the consumer's, when
        it adds a gradient bound to a noted node (the engine accumulating); else None."""
        import torch

        for arg in args:
            if isinstance(arg, torch.Tensor) and (stream := self._bound.get(self._key(arg))):
                for other in args:
                    if isinstance(other, torch.Tensor):
                        self._use_on(other, stream)
                return stream
        return None

    def bind(self, tensor: Any, stream: int) -> None:
        """``tensor``, a gradient on its way to a node of ``stream``, is accumulated there
        (until the node takes it, or its storage dies and the key may name another)."""
        storage = tensor.untyped_storage()
        key = self._key(tensor)
        if key not in self._bound:
            weakref.finalize(storage, self._bound.pop, key, None)
        self._bound[key] = stream

    def clear(self) -> None:
        """After a backward: its nodes, hooks and gradients are done with."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.made_on.clear()
        self._bound.clear()


def _note_nodes(out: Any, stream: int, made_on: dict[Any, int]) -> None:
    import torch
    from torch.utils._pytree import tree_leaves

    if not torch.is_grad_enabled():
        return  # no node is made
    for tensor in tree_leaves(out):
        if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
            continue
        try:
            node = tensor.grad_fn
        except RuntimeError:  # a no_grad view of a base changed since: made by no op here
            continue
        if node is None or node in made_on:
            continue
        made_on[node] = stream
        for fn, _ in node.next_functions:  # a leaf's AccumulateGrad, made with its first use
            if fn is not None and type(fn).__name__ == "AccumulateGrad" and fn not in made_on:
                made_on[fn] = stream
