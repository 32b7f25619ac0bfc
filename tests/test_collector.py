"""The collector's thresholds of a planning process (vramcalc/collector.py) change no trace."""

from __future__ import annotations

import gc

import pytest

from tests.conftest import TINY_LLAMA
from vramcalc.collector import THRESHOLDS, tune
from vramcalc.training_plan import TrainingPlan


def test_tune_sets_the_thresholds_of_the_process(monkeypatch):
    monkeypatch.setattr(gc, "set_threshold", lambda *t: seen.append(t))
    seen: list[tuple[int, ...]] = []
    tune()
    assert seen == [THRESHOLDS] and THRESHOLDS[0] > gc.get_threshold()[0] // 100


def _trace(kind: str):  # noqa: ANN202
    if kind == "step":
        from vramcalc.trace.steptrace import trace_at

        plan = TrainingPlan("tiny", method="qlora", seq_len=16, batch_size=2)
        return trace_at(TINY_LLAMA, plan, 2, None)
    pytest.importorskip("deepspeed")
    from vramcalc.trace.worldtrace import trace_world

    plan = TrainingPlan(
        "tiny", method="lora", seq_len=16, batch_size=2, num_gpus=2, strategy="zero3"
    )
    return trace_world(TINY_LLAMA, plan)


@pytest.mark.parametrize("kind", ["step", "world"])
def test_a_trace_is_the_same_under_the_default_thresholds(kind):
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)  # CPython's defaults
        default = _trace(kind)
        gc.set_threshold(*THRESHOLDS)
        tuned = _trace(kind)
    finally:
        gc.set_threshold(*before)
    assert default == tuned
