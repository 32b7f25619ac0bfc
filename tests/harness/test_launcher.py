"""End to end on CPU through the subprocess launcher: ok, oom, timeout, resume, retry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from vramcalc_harness.caselist import load_cases
from vramcalc_harness.cli import measure
from vramcalc_harness.record import PROVENANCE_FIELDS, RECORD_FIELDS, read_records

TINY_LLAMA = str(Path(__file__).parent / "cases" / "tiny-llama")
GPU_FIELDS = (
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "device_total_bytes",
    "loaded_allocated_bytes",
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The run's folder; its ``scratch`` holds the random-init checkpoint, made once for every
    test of the module (a worker process the fewer for each test that runs cases)."""
    return tmp_path_factory.mktemp("measure")


@pytest.fixture(scope="module")
def run(root):
    """One run of four cases: Trainer ok, loop ok, simulated OOM, a hang past its timeout."""
    small = {"model": TINY_LLAMA, "seq_len": 16, "batch_size": 2, "steps": 2, "warmup_steps": 1}
    cases = {
        "cases": [
            {**small, "method": "lora", "targets": "q_proj,v_proj", "split": "calibration"},
            {
                **small,
                "method": "full",
                "recipe": "loop",
                "gradient_checkpointing": True,
                "grad_accum": 2,
                "optimizer": "adamw_torch",
                "split": "validation",
            },
            {**small, "method": "lora", "simulate": "oom", "split": "calibration"},
            {**small, "method": "lora", "simulate": "hang", "timeout_s": 2, "split": "calibration"},
        ]
    }
    cases_path = root / "cases.yaml"
    cases_path.write_text(yaml.safe_dump(cases))
    output = root / "out" / "cpu.jsonl"
    args = [
        str(cases_path),
        "-o",
        str(output),
        "--device",
        "cpu",
        "--scratch",
        str(root / "scratch"),
        "--no-progress",
    ]
    result = CliRunner().invoke(measure, args)
    return {
        "args": args,
        "result": result,
        "output": output,
        "cases": load_cases(cases_path),
        "root": root,
    }


def test_run_reports_each_status(run):
    result = run["result"]
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        f"ran 4 (ok 2, oom 1, timeout 1), skipped 0 already done, 0 left, on cpu -> {run['output']}"
    )


def test_each_case_is_one_json_line_with_every_field(run):
    records = read_records(run["output"])
    assert [r["case_id"] for r in records] == [c.case_id for c in run["cases"]]
    assert [r["status"] for r in records] == ["ok", "ok", "oom", "timeout"]
    for record, case in zip(records, run["cases"], strict=True):
        assert set(RECORD_FIELDS) <= set(record)
        assert {k: record[k] for k in case.plan.to_dict()} == case.plan.to_dict()
        assert (record["split"], record["recipe"], record["device"]) == (
            case.split,
            case.recipe,
            "cpu",
        )
        assert record["torch_version"] and record["python_version"] and record["hostname"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record["measured_at"])
        assert record["gpu_name"] is None and record["gpu_memory_bytes"] is None
        assert all(record[k] is None for k in GPU_FIELDS)  # not measured on CPU, never faked
        assert set(PROVENANCE_FIELDS) <= set(record)


def test_ok_cases_have_throughput_and_counts(run):
    trainer, loop = read_records(run["output"])[:2]
    for record in (trainer, loop):
        assert record["error"] is None
        assert record["tokens_per_second"] > 0 and record["step_seconds"] > 0
        assert len(record["step_seconds_measured"]) == 2
        assert record["tokens_per_second"] == pytest.approx(
            record["seq_len"] * record["batch_size"] * record["grad_accum"] / record["step_seconds"]
        )
        assert record["compute_dtype_used"] in ("bf16", "fp32")
        assert record["mfu"] is None
        assert record["host_peak_rss_bytes"] > 0
    assert (trainer["trainable_params"], trainer["lora_targets_used"]) == (
        3584,
        ["q_proj", "v_proj"],
    )
    assert loop["trainable_params"] == loop["total_params"] == 106816
    assert loop["optimizer_class"] == "AdamW"


def test_oom_is_a_result_and_the_run_goes_on(run):
    oom, timeout = read_records(run["output"])[2:]
    assert oom["status"] == "oom"
    assert oom["error"].startswith("OutOfMemoryError: CUDA out of memory.")
    assert oom["trainable_params"] == 3584 and oom["tokens_per_second"] is None
    assert timeout["status"] == "timeout"
    assert timeout["error"] == "measuring: no result after 2 s; worker killed."


def test_rerun_skips_cases_already_measured(run):
    before = run["output"].read_text()
    result = CliRunner().invoke(measure, run["args"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        f"ran 0 (nothing new), skipped 4 already done, 0 left, on cpu -> {run['output']}"
    )
    assert run["output"].read_text() == before


def test_retry_errors_reruns_only_failed_cases(run):
    result = CliRunner().invoke(measure, [*run["args"], "--retry-errors"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ran 1 (timeout 1), skipped 3 already done")
    records = read_records(run["output"])
    assert len(records) == 5 and records[-1]["case_id"] == records[3]["case_id"]


def test_worker_logs_are_kept_per_case(run):
    logs = run["root"] / "scratch" / "logs"
    first = run["cases"][0]
    text = (logs / f"{first.case_id}.log").read_text()
    assert f"run case {first.case_id} on cpu" in text


def test_stop_after_s_starts_no_new_case_and_a_rerun_goes_on(tmp_path):
    from vramcalc_harness.launcher import plan_run, run_cases

    cases = load_cases(Path(__file__).parent / "cases" / "grid.yaml")[:3]
    output = tmp_path / "out.jsonl"
    summary = run_cases(
        cases, output, device="cpu", scratch_dir=tmp_path, stop_after_s=0, progress=False
    )
    assert (summary.ran, summary.skipped, summary.left, summary.stopped_early) == (0, 0, 3, True)
    assert not output.exists()
    assert [p.done for p in plan_run(cases, output, "cpu")] == [False, False, False]


def test_a_gpu_record_does_not_count_as_done_on_cpu(tmp_path):
    from vramcalc_harness.launcher import finished_case_ids
    from vramcalc_harness.record import append_record, make_record

    case = load_cases(Path(__file__).parent / "cases" / "grid.yaml")[0]
    output = tmp_path / "out.jsonl"
    append_record(output, make_record(case, "cuda", "ok"))
    append_record(output, make_record(case, "cpu", "error", error="x"))
    assert finished_case_ids(output, "cuda") == {case.case_id}
    assert finished_case_ids(output, "cpu") == {case.case_id}
    assert finished_case_ids(output, "cpu", retry_errors=True) == set()


def test_min_seconds_allocator_and_trace_fields_reach_the_record(root, tmp_path, monkeypatch):
    """Measured steps go on until both ``steps`` and ``min_seconds`` are met; the plan's
    allocator reaches the worker as PYTORCH_CUDA_ALLOC_CONF (an inherited one is dropped)."""
    from vramcalc_harness.launcher import run_cases
    from vramcalc_harness.scenario import Case

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    small = {"model": TINY_LLAMA, "seq_len": 16, "batch_size": 2, "split": "calibration"}
    cases = [
        Case.from_dict({**small, "steps": 2, "warmup_steps": 1, "min_seconds": 0.5}),
        Case.from_dict({**small, "allocator": "expandable", "record_trace": True, "steps": 1}),
    ]
    output = tmp_path / "out.jsonl"
    run_cases(cases, output, device="cpu", scratch_dir=root / "scratch", progress=False)
    timed, traced = read_records(output)
    assert timed["status"] == traced["status"] == "ok"
    assert len(timed["step_seconds_measured"]) >= 2
    assert sum(timed["step_seconds_measured"]) >= 0.5
    assert timed["min_seconds"] == 0.5 and timed["record_trace"] is False
    assert timed["pytorch_cuda_alloc_conf"] is None  # default allocator: variable unset
    assert traced["pytorch_cuda_alloc_conf"] == "expandable_segments:True"
    assert traced["allocator"] == "expandable" and traced["record_trace"] is True
    assert traced["trace_file"] is None  # no allocator trace on CPU, never a fake one
    assert traced["cuda_total_bytes"] is None and traced["driver_reserved_bytes"] is None
