"""Simulations of a report's records in several processes: the same bytes as one process."""

from __future__ import annotations

import pytest

from vramcalc.accuracy import build_report
from vramcalc.estimate import forget_prepared
from vramcalc.parallel import recipe_groups, warm_caches
from vramcalc.training_plan import TrainingPlan


def _record(path, **fields):  # noqa: ANN001, ANN202
    plan = TrainingPlan(str(path), seq_len=64, batch_size=2, **fields)
    return plan.to_dict() | {"split": "validation", "status": "ok", "case_id": repr(fields)}


def test_records_are_grouped_by_recipe(tiny_llama_dir):
    records = [
        _record(tiny_llama_dir, method="lora"),
        _record(tiny_llama_dir, method="lora", grad_accum=2),
        _record(tiny_llama_dir, method="full"),
        {"kind": "serve", "model": "x"},
    ]
    groups = recipe_groups(records)
    assert [len(g) for g in groups] == [2, 1]
    assert groups[0] == records[:2]


@pytest.mark.slow
def test_a_report_warmed_in_two_processes_has_the_bytes_of_one(
    tiny_llama_dir, monkeypatch, tmp_path
):
    records = [
        _record(tiny_llama_dir, method="lora"),
        _record(tiny_llama_dir, method="full"),
        _record(tiny_llama_dir, method="lora", allocator="expandable"),
    ]
    monkeypatch.setenv("VRAMCALC_CACHE_DIR", str(tmp_path / "serial"))
    serial = build_report(records, allocator_model="simulate", workers=1)
    forget_prepared()
    monkeypatch.setenv("VRAMCALC_CACHE_DIR", str(tmp_path / "parallel"))
    assert warm_caches(records, "simulate", workers=2) == 2
    assert warm_caches(records, "simulate", workers=2) == 0  # all cached: no process starts
    parallel = build_report(records, allocator_model="simulate", workers=1)
    assert [r.estimate for r in parallel.rows] == [r.estimate for r in serial.rows]
    assert all(r.estimate["allocator_model"] == "simulated" for r in parallel.rows)
