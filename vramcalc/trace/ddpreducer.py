"""torch DDP's gradient Reducer re-expressed in Python, allocation for allocation.

``DistributedDataParallel`` keeps its buckets in a C++ ``Reducer``
(``torch/csrc/distributed/c10d/reducer.cpp``) that reads tensor values fake tensors do
not have (``sync_bucket_indices`` when it rebuilds the buckets, the unused-parameter
map), so the trace wraps the model in ``DDPLike`` instead, which allocates and frees what
the Reducer does, in the same order, with the arguments accelerate passes from
Trainer's kwargs handler (``gradient_as_bucket_view=False``, ``bucket_cap_mb=25``,
``broadcast_buffers=True``) and the harness's pass-through comm hook:

* construction (``DistributedDataParallel.__init__``): ``_sync_module_states``
  broadcasts every parameter and buffer from rank 0 in coalesced 250 MB buckets (flat
  copies, two in flight; the C++ ``broadcast_coalesced``, run here as it is); the
  bucket assignment of the trainable parameters (``_compute_bucket_assignment_by_size``,
  torch's own function): one bucket for everything when ``find_unused_parameters`` is
  off, else 1 MB first and 25 MB buckets, in reverse parameter order; each bucket one
  flat ``gradients`` tensor (``initialize_buckets``), alive for the whole run; with
  ``find_unused_parameters`` the device copy of the used-parameter map;
* backward (``mark_variable_ready_dense``): each gradient, once accumulated, is copied
  into its bucket view (no allocation: the grad stays, so gradients exist twice); the
  comm hook returns the bucket as it is; ``finalize_backward`` copies the bucket views
  back into the gradients (in place);
* the next forward (``_rebuild_buckets``, once, only without
  ``find_unused_parameters``): the buckets are cleared and re-made in the order the
  gradients became ready, 1 MB first and 25 MB buckets;
* every forward: ``_sync_buffers`` broadcasts the buffers (coalesced flat copy).

Every size here depends on the whole model (buckets cross decoder layers), so the
stand-in sizes them from ``model_tensors``: what each list of the traced model's tensors
stands for in the model simulated (itself, or, for a model traced with fewer decoder
layers than it has, every layer's copy: ``trace/worldunroll.py``). The coalesced
broadcasts (``broadcast_coalesced`` in ``torch/csrc/distributed/c10d/comm.cpp``) and the
bucket assignment (``compute_bucket_assignment_by_size``, ``reducer.cpp``) are
re-expressed in Python for that; ``tests/trace/test_worldunroll.py`` holds them to torch's.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

BROADCAST_BUCKET_BYTES = 250 * 1024 * 1024  # DDP's broadcast_bucket_size (_DEFAULT_BUCKET...)

#: a tensor of the model simulated: (elements, dtype)
Described = tuple[int, torch.dtype]
#: what a list of the traced model's tensors stands for in the model simulated, in order
ModelTensors = Callable[[list[torch.Tensor]], list[Described]]


def as_described(tensors: list[torch.Tensor]) -> list[Described]:
    """The traced model is the model simulated: each tensor stands for itself."""
    return [(t.numel(), t.dtype) for t in tensors]


def bucket_assignment(
    tensors: list[Described], limits: list[int], tensor_indices: list[int] | None = None
) -> list[list[int]]:
    """``compute_bucket_assignment_by_size`` (reducer.cpp): tensors in order, one open bucket
    per dtype, closed once it holds ``limit`` bytes or more (the first bucket of a dtype
    with the first limit, later ones with the next, the last limit repeated), the open
    ones after; sorted by their smallest index unless ``tensor_indices`` (the gradient
    ready order) names each tensor's index, which the buckets then hold."""
    open_: dict[torch.dtype, tuple[list[int], int]] = {}
    step: dict[torch.dtype, int] = {}
    result: list[list[int]] = []
    for position, (numel, dtype) in enumerate(tensors):
        index = position if tensor_indices is None else tensor_indices[position]
        indices, size = open_.get(dtype, ([], 0))
        indices.append(index)
        size += numel * dtype.itemsize
        limit = limits[step.setdefault(dtype, 0)]
        if size >= limit:
            result.append(indices)
            indices, size = [], 0
            step[dtype] = min(step[dtype] + 1, len(limits) - 1)
        open_[dtype] = (indices, size)
    result.extend(indices for indices, _ in open_.values() if indices)
    if tensor_indices is None:
        result.sort(key=min)
    return result


def broadcast_coalesced(tensors: list[Described], bucket_bytes: int, like: torch.Tensor) -> None:
    """``broadcast_coalesced`` (comm.cpp): the tensors in ``bucket_bytes`` buckets, each
    flattened into one new tensor (``flatten_dense_tensors``: a bucket of one tensor is a
    view of it), broadcast, copied back and freed; at most two buckets in flight."""
    in_flight: list[torch.Tensor | None] = []
    for bucket in bucket_assignment(tensors, [bucket_bytes]):
        if len(in_flight) >= 2:
            in_flight.pop(0)  # finish(): copied back in place, the flat tensor freed
        if len(bucket) == 1:
            in_flight.append(None)
            continue
        dtype = tensors[bucket[0]][1]
        in_flight.append(like.new_empty((sum(tensors[i][0] for i in bucket),), dtype=dtype))
    while in_flight:  # the front first
        in_flight.pop(0)


class DDPLike(torch.nn.Module):
    """A ``DistributedDataParallel`` stand-in with the Reducer's allocations (module docstring)."""

    def __init__(
        self,
        module: torch.nn.Module,
        find_unused_parameters: bool,
        bucket_cap_mb: int,
        model_tensors: ModelTensors = as_described,
    ):
        super().__init__()
        self.module = module
        self.find_unused_parameters = find_unused_parameters
        self._bucket_cap = int(bucket_cap_mb * 1024 * 1024)
        self._model_tensors = model_tensors
        states = [*module.parameters(), *module.buffers()]
        self._like = states[0]
        # _sync_module_states: every parameter and buffer broadcast from rank 0
        broadcast_coalesced(model_tensors(states), BROADCAST_BUCKET_BYTES, self._like)
        seen: set[int] = set()
        self._params: list[torch.Tensor] = []
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self._params.append(p)
        described = model_tensors(self._params)
        limits = [sys.maxsize] if not find_unused_parameters else self._limits()
        indices = bucket_assignment(described, limits)
        self._buckets: list[torch.Tensor] = []
        self._make_buckets(described, list(reversed(indices)))
        self._used_map = (
            self._like.new_empty((len(described),), dtype=torch.int32)
            if find_unused_parameters
            else None
        )
        self._ready_order: list[int] = []
        self._rebuilt = find_unused_parameters  # rebuilt only without it (should_rebuild_buckets)
        self.require_backward_grad_sync = True
        for index, p in enumerate(self._params):
            p.register_post_accumulate_grad_hook(functools.partial(self._ready, index))

    def _limits(self) -> list[int]:
        import torch.distributed as dist

        return [dist._DEFAULT_FIRST_BUCKET_BYTES, self._bucket_cap]

    def _make_buckets(self, described: list[Described], indices: list[list[int]]) -> None:
        """``initialize_buckets``: one flat ``gradients`` tensor per bucket (each gradient,
        once ready, is copied into its view of it: in place, no allocation)."""
        self._buckets = [
            self._like.new_empty(
                (sum(described[i][0] for i in bucket),), dtype=described[bucket[0]][1]
            )
            for bucket in indices
        ]

    def _ready(self, index: int, param: torch.Tensor) -> None:
        if not self.require_backward_grad_sync or param.grad is None:
            return
        if not self._rebuilt:
            self._ready_order.append(index)

    def _rebuild_buckets(self) -> None:
        if self._rebuilt or not self._ready_order:
            return
        self._rebuilt = True
        order = list(dict.fromkeys(self._ready_order))
        described = self._model_tensors([self._params[i] for i in order])
        indices = bucket_assignment(described, self._limits(), list(range(len(described))))
        self._buckets = []  # buckets_.clear(), then initialize_buckets
        self._make_buckets(described, indices)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            self._rebuild_buckets()
        buffers = list(self.module.buffers())
        if buffers:  # _sync_buffers: broadcast_buffers
            broadcast_coalesced(self._model_tensors(buffers), BROADCAST_BUCKET_BYTES, self._like)
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        previous, self.require_backward_grad_sync = self.require_backward_grad_sync, False
        try:
            yield
        finally:
            self.require_backward_grad_sync = previous
