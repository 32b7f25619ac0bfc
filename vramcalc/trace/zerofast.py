"""DeepSpeed ZeRO-3's host-side bookkeeping, with the same answers in less CPU time.

A ZeRO trace runs DeepSpeed's own code on fake tensors (``trace/zerotrace.py``), and two
pieces of that code cost a trace far more CPU than the tensor work they decide on, without
allocating anything themselves:

* ``PartitionedParameterCoordinator.__params_to_release`` (DeepSpeed 0.19.8
  ``runtime/zero/partitioned_param_coordinator.py`` 632-665), asked at every module's
  release once the module order is recorded: it walks the recorded order from the current
  step until ``max_reuse_distance`` elements are passed, listing every module's parameters
  through ``named_parameters`` generators, to keep what is used again soon. With the default
  distance of 10^9 elements that is most of the model's modules for every release: a quarter
  of a Llama-3.2-1B ZeRO-3 trace's CPU time. ``params_to_release`` below walks the same
  modules in the same order, with each module's parameter ids and element count listed once
  (``_module_params``, relisted when a module's parameters change), and stops early once no
  candidate is left (nothing more can be discarded: the answer is the same). Its result is
  cached per (coordinator, module, step) like the original's ``functools.lru_cache``, the
  same set object returned each time (``release_sub_module`` adds to it in backward).
* ``instrument_w_nvtx`` (``utils/nvtx.py``): an NVTX range pushed and popped around each of
  about two million calls, which a fake device has no profiler for; off for the trace
  (``enable_nvtx``, DeepSpeed's own switch).

``tests/trace/test_zerotrace.py`` checks that a ZeRO-3 trace is the same event for event
with and without ``faster_bookkeeping``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any


def _module_params(
    module: Any, recurse: bool, listed: dict[tuple[Any, bool], Any]
) -> tuple[frozenset[int], int]:
    """``(ds_id`` of each parameter ``iter_params(module, recurse)`` yields, their summed
    ``ds_numel``, duplicates counted as the original walk counts them)``, listed again when
    the module's own or external parameters change."""
    own = module._parameters
    external = getattr(module, "_external_params", {})
    stamp = (tuple(id(p) for p in own.values()), tuple(id(p) for p in external.values()))
    hit = listed.get((module, recurse))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params

    params = list(iter_params(module, recurse=recurse))
    value = (frozenset(p.ds_id for p in params), sum(p.ds_numel for p in params))
    listed[(module, recurse)] = (stamp, value)
    return value


@contextlib.contextmanager
def faster_bookkeeping() -> Iterator[None]:
    """ZeRO-3's ``__params_to_release`` and DeepSpeed's NVTX ranges as the module docstring
    says, for the duration of a trace (put back after)."""
    import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator
    import deepspeed.utils.nvtx as nvtx
    from deepspeed.utils import z3_leaf_module

    cls = coordinator.PartitionedParameterCoordinator
    name = "_PartitionedParameterCoordinator__params_to_release"
    original = cls.__dict__[name]
    listed: dict[tuple[Any, bool], Any] = {}

    @functools.cache
    def params_to_release(self: Any, submodule: Any, step_id: int) -> set[int]:
        if not self.is_complete_trace():
            raise RuntimeError("expected trace to be complete")
        recurse = z3_leaf_module(submodule)
        params = list(coordinator.iter_params(submodule, recurse=recurse))
        release = {p.ds_id for p in params if not p.ds_persist}
        fetched = self._PartitionedParameterCoordinator__most_recent_step_id_param_fetched_for
        for param in params:
            if fetched[param] > step_id:
                release.discard(param.ds_id)
        limit = self._PartitionedParameterCoordinator__max_reuse_dist_in_numel
        order = self._PartitionedParameterCoordinator__submodule_order
        traversed = 0
        for index in range(step_id, len(order)):
            if traversed >= limit or not release:
                break
            ids, numel = _module_params(order[index], recurse, listed)
            release.difference_update(ids)
            traversed += numel
        return release

    enabled = nvtx.enable_nvtx
    setattr(cls, name, params_to_release)
    nvtx.enable_nvtx = False
    try:
        yield
    finally:
        setattr(cls, name, original)
        nvtx.enable_nvtx = enabled
