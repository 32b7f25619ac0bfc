"""Serving cases end to end on CPU: a tiny llama through the real launcher and worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vramcalc_harness.caselist import cases_from_yaml_data
from vramcalc_harness.errors import CaseError
from vramcalc_harness.record import PROVENANCE_FIELDS, read_records
from vramcalc_harness.serve_case import ServeCase, serve_record_fields

TINY_LLAMA = str(Path(__file__).parent / "cases" / "tiny-llama")
SMALL = {
    "kind": "serve",
    "model": TINY_LLAMA,
    "adapters": 2,
    "rank": 4,
    "targets": "q_proj,v_proj",
    "batch": 2,
    "context": 32,
    "new_tokens": 8,
    "steps": 2,
    "warmup_steps": 1,
    "dtype": "fp32",
    "split": "calibration",
}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One scratch directory, so the random-init checkpoint is made once for every run."""
    return tmp_path_factory.mktemp("serve-scratch")


@pytest.fixture(scope="module")
def records(tmp_path_factory, scratch):
    from vramcalc_harness.launcher import run_cases

    root = tmp_path_factory.mktemp("serve")
    cases = cases_from_yaml_data(
        {"cases": [{**SMALL, "mode": "unmerged"}, {**SMALL, "mode": "multi"}]}
    )
    output = root / "serve.jsonl"
    run_cases(cases, output, device="cpu", scratch_dir=scratch, progress=False)
    return cases, read_records(output)


def test_serve_case_reads_validates_and_round_trips():
    case = ServeCase.from_dict({**SMALL, "mode": "merged"})
    assert (case.plan.prompt_tokens, case.plan.new_tokens, case.plan.context) == (24, 8, 32)
    assert case.measured_batch == 1  # two merged copies, each decodes half the batch
    assert ServeCase.from_dict(case.to_dict()) == case
    assert case.case_id != ServeCase.from_dict({**SMALL, "mode": "multi"}).case_id
    with pytest.raises(CaseError) as err:
        cases_from_yaml_data(
            [
                {**SMALL, "mode": "mixed", "batch": 0, "seq_len": 9},
                {**SMALL, "adapters": 0, "mode": "multi"},
            ]
        )
    problems = "\n".join(err.value.problems)
    assert "unknown field 'seq_len' for kind serve" in problems
    assert "--mode 'mixed'" in problems and "--batch must be a positive integer" in problems
    assert "mode multi needs adapters >= 1" in problems


def test_records_are_serve_records_with_every_field(records):
    cases, (unmerged, multi) = records
    for case, record in zip(cases, (unmerged, multi), strict=True):
        assert record["status"] == "ok", record["error"]
        assert list(record) == list(serve_record_fields())
        assert record["kind"] == "serve" and record["case_id"] == case.case_id
        assert (record["batch"], record["context"], record["adapters"]) == (2, 32, 2)
        assert len(record["generate_seconds_measured"]) == 2
        # tokens/s from the medians of the timed rounds; decode is what generate took beyond
        # its prefill (none when a busy CPU made the 8-token generate no longer than a prefill)
        prefill_s, generate_s = record["prefill_seconds"], record["generate_seconds"]
        assert record["prefill_tokens_per_second"] == pytest.approx(2 * 24 / prefill_s)
        decode = record["decode_tokens_per_second"]
        if generate_s > prefill_s:
            assert decode == pytest.approx(7 * 2 / (generate_s - prefill_s))
        else:
            assert decode is None
        assert record["lora_targets_used"] == ["q_proj", "v_proj"]
        assert record["peak_allocated_bytes"] is None  # no GPU memory figures on CPU
        assert record["torch_version"] and all(k in record for k in PROVENANCE_FIELDS)
    assert unmerged["adapter_names_used"] is None
    assert multi["adapter_names_used"] == ["adapter-1", "adapter-2"]


def test_report_and_speed_fit_skip_serve_records(records):
    from vramcalc.accuracy import build_report
    from vramcalc.measurements import SERVE_RECORD_REASON
    from vramcalc.speed.throughput_fit import cases_from_records, excluded_reason

    _, serve_records = records
    assert excluded_reason(serve_records[0]) == SERVE_RECORD_REASON
    fit_cases, skipped = cases_from_records(serve_records, None)
    assert fit_cases == [] and len(skipped) == 2
    report = build_report(serve_records)
    assert [r.estimate_error for r in report.rows] == [SERVE_RECORD_REASON] * 2
    assert report.ok_rows == []


def test_dora_serve_case_reads_round_trips_and_refuses_mixed_batches():
    case = ServeCase.from_dict({**SMALL, "mode": "unmerged", "dora": True})
    assert all(a.dora for a in case.plan.adapters)
    assert case.to_dict()["dora"] is True and ServeCase.from_dict(case.to_dict()) == case
    plain = ServeCase.from_dict({**SMALL, "mode": "unmerged"})
    assert plain.to_dict()["dora"] is False and plain.case_id != case.case_id
    with pytest.raises(CaseError) as err:
        cases_from_yaml_data(
            [{**SMALL, "mode": "multi", "dora": True}, {**SMALL, "mode": "merged", "dora": "yes"}]
        )
    problems = "\n".join(err.value.problems)
    assert "dora with mode multi" in problems and "dora must be true or false" in problems


def test_dora_adapters_are_built_with_peft_dora(tmp_path, scratch, records):
    from vramcalc_harness.launcher import run_cases

    cases = cases_from_yaml_data(
        {"cases": [{**SMALL, "mode": "unmerged", "dora": True, "steps": 1, "new_tokens": 4}]}
    )
    output = tmp_path / "dora.jsonl"
    run_cases(cases, output, device="cpu", scratch_dir=scratch, progress=False)
    (record,) = read_records(output)
    assert record["status"] == "ok", record["error"]
    assert record["dora"] is True and record["lora_targets_used"] == ["q_proj", "v_proj"]
    # DoRA adds one magnitude vector per targeted layer (out_features) to each of the 2 adapters:
    # tiny-llama, 2 layers, q_proj 64 and v_proj 2 kv heads x 16 = 32 outputs
    _, (unmerged, _) = records
    assert record["total_params"] - unmerged["total_params"] == 2 * 2 * (64 + 32)


def test_a_case_with_targets_in_any_order_keeps_its_id_through_the_worker_round_trip():
    """The launcher sends case.to_dict() to the worker, which must rebuild the same case."""
    from vramcalc_harness.worker import case_from_dict

    for targets in ("q_proj,k_proj,v_proj,o_proj", ["v_proj", "q_proj"], "all-linear"):
        case = ServeCase.from_dict({**SMALL, "mode": "unmerged", "targets": targets})
        again = case_from_dict(case.to_dict())
        assert again == case and again.case_id == case.case_id


# -- record_trace: the caching allocator's own trace of a serving case ------------------------------
REPO = Path(__file__).resolve().parents[2]


def test_record_trace_reads_and_enters_the_case_key_only_when_true():
    from vramcalc_harness.caselist import case_from_dict, cases_from_csv_rows

    plain = ServeCase.from_dict({**SMALL, "mode": "unmerged"})
    traced = ServeCase.from_dict({**SMALL, "mode": "unmerged", "record_trace": True})
    assert (plain.record_trace, traced.record_trace) == (False, True)
    assert ServeCase.from_dict({**SMALL, "mode": "unmerged", "record_trace": False}) == plain
    assert "record_trace" not in plain.canonical_key()
    assert '"record_trace":true' in traced.canonical_key() and traced.case_id != plain.case_id
    again = case_from_dict(traced.to_dict())  # what the worker rebuilds from its spec
    assert again == traced and again.case_id == traced.case_id
    row = {k: str(v) for k, v in SMALL.items()}  # CSV cells are text
    (from_csv,) = cases_from_csv_rows([{**row, "mode": "unmerged", "record_trace": "true"}])
    assert from_csv == traced
    with pytest.raises(CaseError) as err:
        cases_from_yaml_data(
            [
                {**SMALL, "mode": "unmerged", "record_traces": True},
                {**SMALL, "mode": "merged", "record_trace": "yes"},
            ]
        )
    assert err.value.problems == [
        "input cases[0]: unknown field 'record_traces' for kind serve. Did you mean "
        "'record_trace'?",
        "input cases[1]: record_trace must be true or false, got 'yes'.",
    ]


def test_measured_serve_case_ids_are_unchanged():
    """Untraced cases keep their ids: the committed list against the ids its records carry."""
    from vramcalc_harness.caselist import load_cases

    cases = load_cases(REPO / "vramcalc_harness" / "cases" / "h100_serve2.yaml")
    records = read_records(REPO / "data" / "measurements" / "h100_serve2_2026-12-06.jsonl")
    assert cases[0].case_id == "5c7b8c792fdde8de" == records[0]["case_id"]
    by_plan = {json.dumps(c.plan_fields(), sort_keys=True): c for c in cases}
    for record in records:  # each record's case found by its plan, not by its id
        case = by_plan[json.dumps({k: record[k] for k in cases[0].plan_fields()}, sort_keys=True)]
        assert not case.record_trace and record["case_id"] == case.case_id
    assert {r["case_id"] for r in records} == {c.case_id for c in cases}


def test_the_launcher_sends_a_traced_serve_case_its_trace_path(tmp_path, monkeypatch):
    """The worker's spec, without spawning one: a trace path beside the output for the traced
    case only, and the case itself (``record_trace`` included) back from ``to_dict``."""
    from vramcalc_harness import launcher
    from vramcalc_harness.caselist import case_from_dict
    from vramcalc_harness.record import make_record
    from vramcalc_harness.serve_case import serve_kind

    specs: list[tuple[str, dict]] = []

    def spawn_worker(mode, spec, timeout_s, log_path, accelerate_config_file=None, extra_env=None):
        specs.append((mode, spec))
        if mode == "prepare":
            return launcher.WorkerOutcome({"status": "ok"}, False, 0, "", 0.0)
        case = case_from_dict(spec["case"])
        return launcher.WorkerOutcome(
            make_record(serve_kind(case), spec["device"], "ok"), False, 0, "", 0.0
        )

    monkeypatch.setattr(launcher, "spawn_worker", spawn_worker)
    plain = ServeCase.from_dict({**SMALL, "mode": "unmerged"})
    traced = ServeCase.from_dict({**SMALL, "mode": "merged", "record_trace": True})
    output = tmp_path / "serve.jsonl"
    launcher.run_cases(
        [plain, traced], output, device="cpu", scratch_dir=tmp_path / "scratch", progress=False
    )
    runs = [spec for mode, spec in specs if mode == "run"]
    assert [case_from_dict(spec["case"]) for spec in runs] == [plain, traced]
    assert "trace_path" not in runs[0]
    assert runs[1]["trace_path"] == str(tmp_path / "serve_traces" / f"{traced.case_id}.json.gz")
    assert [r["record_trace"] for r in read_records(output)] == [False, True]


def test_case_trace_only_for_a_traced_case_on_cuda(tmp_path):
    from vramcalc_harness.alloc_trace import AllocationTrace, case_trace

    plain = ServeCase.from_dict({**SMALL, "mode": "unmerged"})
    traced = ServeCase.from_dict({**SMALL, "mode": "unmerged", "record_trace": True})
    path = tmp_path / "t.json.gz"
    assert case_trace(traced, "cpu", path) is None  # no trace on CPU, never a fake one
    assert case_trace(plain, "cuda", path) is None
    assert case_trace(traced, "cuda", None) is None
    trace = case_trace(traced, "cuda", path)
    assert isinstance(trace, AllocationTrace)
    assert (trace.path, trace.case_id) == (path, traced.case_id)


class FakeTrace:
    """Stands in for ``AllocationTrace`` (CUDA only): the labels it is given, in order."""

    def __init__(self, path):
        self.path = Path(path)
        self.labels: list[str] = []

    def mark(self, label: str) -> None:
        self.labels.append(label)

    def __enter__(self):
        self.labels.append("enter")
        return self

    def __exit__(self, *exc: object) -> None:
        self.labels.append("exit")


def test_the_serve_worker_wraps_loading_adapters_and_rounds_in_the_trace(tmp_path, monkeypatch):
    """``worker run`` of a traced merged case on CPU, the trace faked: markers where the
    simulated serving trace has them (``vramcalc.serving.servetrace``), the file in the record."""
    from vramcalc_harness import serve_step, worker
    from vramcalc_harness.build import prepare_checkpoint

    case = ServeCase.from_dict(
        {**SMALL, "mode": "merged", "record_trace": True, "new_tokens": 4, "steps": 2}
    )
    traces: list[FakeTrace] = []

    def case_trace(traced_case, device, path):
        assert traced_case == case and device == "cpu"
        traces.append(FakeTrace(path))
        return traces[-1]

    monkeypatch.setattr(serve_step, "case_trace", case_trace)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    checkpoint = prepare_checkpoint(case.plan, tmp_path / "scratch", "cpu")
    spec = {
        "case": case.to_dict(),
        "device": "cpu",
        "scratch_dir": str(tmp_path / "scratch"),
        "checkpoint": str(checkpoint),
        "trace_path": str(tmp_path / "out_traces" / f"{case.case_id}.json.gz"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert worker.main(["run", str(tmp_path / "spec.json"), str(tmp_path / "result.json")]) == 0
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["status"] == "ok", record["error"]
    (trace,) = traces
    assert str(trace.path) == spec["trace_path"]
    # warm-up round 0, timed rounds 1 and 2
    labels = ["enter", "loaded", "adapters", "merge", "inputs", "round0", "round1", "round2"]
    assert trace.labels == labels + ["exit"]
    assert record["record_trace"] is True and record["trace_file"] == f"{case.case_id}.json.gz"
