"""The result record: every field, shared names with the plan, JSON lines that survive crashes."""

from __future__ import annotations

import json

import pytest

from vramcalc.training_plan import TrainingPlan
from vramcalc_harness.record import (
    RECORD_FIELDS,
    append_record,
    collect_provenance,
    make_record,
    read_records,
)
from vramcalc_harness.scenario import PLAN_FIELDS, Case


def test_record_has_every_field_in_order_with_plan_fields_first():
    case = Case(TrainingPlan(model="m", method="qlora", rank=16), split="validation", seed=3)
    record = make_record(
        case, "cpu", "ok", {"step_seconds": 0.5, "not_a_field": 1}, {"hostname": "h"}
    )
    assert list(record) == list(RECORD_FIELDS)
    assert list(record)[: len(PLAN_FIELDS)] == list(TrainingPlan(model="m").to_dict())
    assert record["quant"] == "nf4" and record["alpha"] == 16.0
    assert (record["case_id"], record["split"], record["seed"]) == (case.case_id, "validation", 3)
    assert record["step_seconds"] == 0.5 and record["hostname"] == "h"
    assert record["measured_at"] is not None and "not_a_field" not in record
    with pytest.raises(ValueError, match="status must be one of"):
        make_record(case, "cpu", "crashed")


def test_simulated_cases_say_so():
    record = make_record(Case(TrainingPlan(model="m"), simulate="oom"), "cpu", "oom")
    assert record["simulate"] == "oom"


def test_cpu_provenance_has_versions_and_no_gpu_facts():
    prov = collect_provenance("cpu")
    assert (
        prov["gpu_name"] is None and prov["driver_version"] is None and prov["cuda_version"] is None
    )
    assert prov["torch_version"] and prov["transformers_version"] and prov["peft_version"]
    assert prov["accelerate_version"] and prov["python_version"] and prov["hostname"]
    assert prov["vramcalc_commit"] is None or len(prov["vramcalc_commit"]) == 40


def test_append_survives_a_line_cut_short_by_a_crash(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    append_record(path, {"case_id": "a", "status": "ok"})
    with path.open("a") as handle:
        handle.write('{"case_id": "b", "sta')  # killed mid-write
    append_record(path, {"case_id": "c", "status": "oom"})
    assert [r["case_id"] for r in read_records(path)] == ["a", "c"]
    assert path.read_text().endswith('"oom"}\n')
    assert json.loads(path.read_text().splitlines()[-1])["case_id"] == "c"
    assert read_records(tmp_path / "missing.jsonl") == []


def test_commit_can_be_given_where_the_tree_has_no_git(monkeypatch, tmp_path):
    from vramcalc_harness.record import git_commit

    assert git_commit(tmp_path) is None  # not a git checkout
    monkeypatch.setenv("VRAMCALC_COMMIT", "abc123")
    assert git_commit(tmp_path) == "abc123"
