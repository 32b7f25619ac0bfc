"""Simulations of a report's records in several processes: the same bytes as one process."""

from __future__ import annotations

import json

import pytest

import vramcalc.parallel as parallel
from tests.conftest import TINY_LLAMA
from vramcalc.accuracy import build_report
from vramcalc.estimate import forget_prepared
from vramcalc.parallel import recipe_groups, trace_cost, warm_caches
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


def test_the_costliest_recipes_are_handed_out_first(tmp_path, monkeypatch):
    """A ZeRO trace runs every decoder layer (twice the work under ZeRO-3) and every
    micro-batch; the others at most 5 layers: a 7-layer model's recipes, costliest first,
    after the profiles of those whose ops are not profiled yet (alone, costliest first)."""
    model = tmp_path / "seven"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_LLAMA | {"num_hidden_layers": 7}))
    single = _record(model, method="lora")
    fsdp = _record(model, method="lora", num_gpus=2, strategy="fsdp", grad_accum=2)
    zero2 = _record(model, method="lora", num_gpus=2, strategy="zero2")
    zero3 = _record(model, method="lora", num_gpus=2, strategy="zero3", grad_accum=2)
    assert [trace_cost(r) for r in (single, fsdp, zero2, zero3)] == [5, 10, 7, 28]
    assert trace_cost({"model": "no/such-model"}) == 0
    handed: list[list[str]] = []

    class Pool:  # the order the tasks are handed to the processes in
        def __init__(self, processes, mp_context, initializer):  # noqa: ANN001
            assert initializer is parallel.tune  # the collector's thresholds in each process
            handed.append([str(processes)])

        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc):  # noqa: ANN002, ANN204
            return False

        def map(self, fn, groups, models):  # noqa: ANN001, ANN201
            handed.append([(g[0]["case_id"], m) for g, m in zip(groups, models, strict=True)])
            return []

    monkeypatch.setattr(parallel, "ProcessPoolExecutor", Pool)
    unprofiled = [single["case_id"], zero2["case_id"]]
    monkeypatch.setattr(parallel, "profile_pending", lambda r: r["case_id"] in unprofiled)
    monkeypatch.setattr(parallel, "simulation_pending", lambda r, model: r is not fsdp)
    assert warm_caches([single, fsdp, zero2, zero3], "simulate", workers=3) == 3
    assert handed == [
        ["3"],
        [
            (zero2["case_id"], None),
            (single["case_id"], None),
            (zero3["case_id"], "simulate"),
            (zero2["case_id"], "simulate"),
            (single["case_id"], "simulate"),
        ],
    ]
    handed.clear()  # only profiles (a speed report): no simulation
    assert warm_caches([single, fsdp, zero2, zero3], "simulate", memory=False, workers=2) == 2
    assert handed == [["2"], [(zero2["case_id"], None), (single["case_id"], None)]]


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
