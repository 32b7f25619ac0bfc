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
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from typing import Any

import torch

BROADCAST_BUCKET_BYTES = 250 * 1024 * 1024  # DDP's broadcast_bucket_size (_DEFAULT_BUCKET...)


class DDPLike(torch.nn.Module):
    """A ``DistributedDataParallel`` stand-in with the Reducer's allocations (module docstring)."""

    def __init__(self, module: torch.nn.Module, find_unused_parameters: bool, bucket_cap_mb: int):
        import torch.distributed as dist
        from torch.distributed.utils import _sync_module_states

        super().__init__()
        self.module = module
        self.find_unused_parameters = find_unused_parameters
        self._group = dist.group.WORLD
        self._bucket_cap = int(bucket_cap_mb * 1024 * 1024)
        _sync_module_states(module, self._group, BROADCAST_BUCKET_BYTES, 0, set())
        seen: set[int] = set()
        self._params: list[torch.Tensor] = []
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self._params.append(p)
        limits = [sys.maxsize] if not find_unused_parameters else self._limits()
        indices, _ = dist._compute_bucket_assignment_by_size(
            self._params, limits, [False] * len(self._params)
        )
        self._buckets: list[tuple[torch.Tensor, dict[int, torch.Tensor]]] = []
        self._make_buckets(list(reversed(indices)))
        self._used_map = (
            torch.empty(len(self._params), dtype=torch.int32) if find_unused_parameters else None
        )
        self._ready_order: list[int] = []
        self._rebuilt = find_unused_parameters  # rebuilt only without it (should_rebuild_buckets)
        self.require_backward_grad_sync = True
        for index, p in enumerate(self._params):
            p.register_post_accumulate_grad_hook(functools.partial(self._ready, index))

    def _limits(self) -> list[int]:
        import torch.distributed as dist

        return [dist._DEFAULT_FIRST_BUCKET_BYTES, self._bucket_cap]

    def _make_buckets(self, indices: list[list[int]]) -> None:
        """``initialize_buckets``: one flat ``gradients`` tensor per bucket, views into it."""
        self._buckets = []
        for bucket in indices:
            params = [self._params[i] for i in bucket]
            flat = params[0].new_empty((sum(p.numel() for p in params),))
            views, offset = {}, 0
            for i, p in zip(bucket, params, strict=True):
                views[i] = flat[offset : offset + p.numel()].view(p.shape)
                offset += p.numel()
            self._buckets.append((flat, views))

    def _ready(self, index: int, param: torch.Tensor) -> None:
        if not self.require_backward_grad_sync or param.grad is None:
            return
        if not self._rebuilt:
            self._ready_order.append(index)
        for _, views in self._buckets:
            if index in views:
                with torch.no_grad():
                    views[index].copy_(param.grad)  # mark_variable_ready_dense

    def _rebuild_buckets(self) -> None:
        import torch.distributed as dist

        if self._rebuilt or not self._ready_order:
            return
        self._rebuilt = True
        order = list(dict.fromkeys(self._ready_order))
        indices, _ = dist._compute_bucket_assignment_by_size(
            [self._params[i] for i in order], self._limits(), [False] * len(order), order
        )
        self._buckets = []  # buckets_.clear(), then initialize_buckets
        self._make_buckets(indices)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch.distributed as dist

        if torch.is_grad_enabled():
            self._rebuild_buckets()
        buffers = list(self.module.buffers())
        if buffers:  # _sync_buffers: broadcast_buffers
            dist._broadcast_coalesced(self._group, buffers, BROADCAST_BUCKET_BYTES, 0)
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        previous, self.require_backward_grad_sync = self.require_backward_grad_sync, False
        try:
            yield
        finally:
            self.require_backward_grad_sync = previous
