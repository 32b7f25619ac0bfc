"""ZeRO-3's bookkeeping made cheaper (vramcalc/trace/zerofast.py) leaves the trace unchanged.

The original ``__params_to_release`` and the NVTX ranges are DeepSpeed 0.19.8's; the trace
with them (``faster_bookkeeping`` replaced by a no-op) and the trace without must be the same
event for event: allocations, frees, their sizes, streams and host waits.
"""

from __future__ import annotations

import contextlib

import pytest

from tests.conftest import TINY_LLAMA
from vramcalc.training_plan import TrainingPlan

pytest.importorskip("deepspeed")


def plan(method: str) -> TrainingPlan:
    return TrainingPlan(
        model="tiny",
        seq_len=16,
        batch_size=2,
        num_gpus=2,
        strategy="zero3",
        gradient_checkpointing=True,
        method=method,
        targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    )


def test_zero3_trace_is_the_same_with_and_without_the_faster_bookkeeping(monkeypatch):
    """... and without the frozen heap (``fakemodel.frozen_heap``: DeepSpeed's
    ``gc.collect()`` in ``defragment`` and every automatic collection with the whole process
    to walk, as before)."""
    import gc

    from vramcalc.trace import zerotrace
    from vramcalc.trace.worldtrace import trace_world

    fast = trace_world(TINY_LLAMA, plan("full"))
    monkeypatch.setattr(zerotrace, "faster_bookkeeping", contextlib.nullcontext)
    monkeypatch.setattr(gc, "freeze", lambda: None)
    monkeypatch.setattr(gc, "unfreeze", lambda: None)
    original = trace_world(TINY_LLAMA, plan("full"))
    assert fast.events == original.events
    assert fast.streams == original.streams
    assert fast.markers == original.markers
    assert fast.sync_points == original.sync_points


def test_a_release_keeps_what_the_next_modules_use_and_the_answer_is_cached(monkeypatch):
    """Every answer of the faster ``__params_to_release`` during a ZeRO-3 trace equals the
    original's for the same coordinator, module and step, and is one set object per key."""
    import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator

    from vramcalc.trace import zerofast
    from vramcalc.trace.worldtrace import trace_world

    cls = coordinator.PartitionedParameterCoordinator
    name = "_PartitionedParameterCoordinator__params_to_release"
    # DeepSpeed's: instrument_w_nvtx(functools.lru_cache(f)); f itself, not cached
    cached = next(
        c.cell_contents for c in cls.__dict__[name].__closure__ if callable(c.cell_contents)
    )
    original = cached.__wrapped__
    answers: list[tuple[set[int], set[int], bool]] = []
    faster = zerofast.faster_bookkeeping

    @contextlib.contextmanager
    def checked():  # type: ignore[no-untyped-def]
        with faster():
            fast = cls.__dict__[name]

            def both(self, submodule, step_id):  # type: ignore[no-untyped-def]
                got = fast(self, submodule, step_id)
                want = original(self, submodule, step_id)
                answers.append((set(got), want, got is fast(self, submodule, step_id)))
                return got

            setattr(cls, name, both)
            yield

    monkeypatch.setattr("vramcalc.trace.zerotrace.faster_bookkeeping", checked)
    trace_world(TINY_LLAMA, plan("lora"))
    assert len(answers) > 20
    assert all(got == want and same for got, want, same in answers)
    assert any(got for got, _, _ in answers) and any(not got for got, _, _ in answers)
