"""Serving cases end to end on CPU: a tiny llama through the real launcher and worker."""

from __future__ import annotations

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
def records(tmp_path_factory):
    from vramcalc_harness.launcher import run_cases

    root = tmp_path_factory.mktemp("serve")
    cases = cases_from_yaml_data(
        {"cases": [{**SMALL, "mode": "unmerged"}, {**SMALL, "mode": "multi"}]}
    )
    output = root / "serve.jsonl"
    run_cases(cases, output, device="cpu", scratch_dir=root / "scratch", progress=False)
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


def test_dora_adapters_are_built_with_peft_dora(tmp_path, records):
    from vramcalc_harness.launcher import run_cases

    cases = cases_from_yaml_data(
        {"cases": [{**SMALL, "mode": "unmerged", "dora": True, "steps": 1, "new_tokens": 4}]}
    )
    output = tmp_path / "dora.jsonl"
    run_cases(cases, output, device="cpu", scratch_dir=tmp_path / "scratch", progress=False)
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
