"""The accuracy report and its gate, on synthetic records and on the committed data."""

import json

import pytest
from click.testing import CliRunner

from vramcalc.accuracy import (
    as_measured,
    build_report,
    check_regressions,
    check_targets,
    committed_figures,
    summarize,
)
from vramcalc.cli import cli
from vramcalc.estimate import estimate
from vramcalc.measurements import MEASUREMENTS_DIR
from vramcalc.training_plan import TrainingPlan

REPORTS_DIR = MEASUREMENTS_DIR.parent.parent / "reports"


def record(tiny_dir, split, scale, status="ok", **plan):
    """A measurement-shaped record whose measured bytes are the estimate / scale."""
    p = TrainingPlan(str(tiny_dir), **plan)
    est = estimate(p)
    rec = p.to_dict() | {
        "split": split,
        "status": status,
        "case_id": f"{split}-{scale}-{status}",
        "gpu_memory_bytes": 80 * 2**30,
    }
    if status == "ok":
        rec["device_total_bytes"] = round(est.device_total_bytes / scale)
        rec["peak_reserved_bytes"] = round(est.peak_reserved_bytes / scale)
        rec["peak_allocated_bytes"] = round(est.peak_allocated_bytes / scale)
    return rec


def test_errors_are_signed_relative(tiny_llama_dir):
    report = build_report([record(tiny_llama_dir, "validation", 1.02)])
    (row,) = report.rows
    assert row.errors["device_total_bytes"] == pytest.approx(0.02, rel=1e-6)


def test_gate_passes_on_accurate_and_fails_on_underestimate(tiny_llama_dir):
    good = build_report([record(tiny_llama_dir, "validation", s) for s in (1.0, 1.004, 0.996)])
    assert check_targets(good) == []
    # allocated has the tighter target (median 0.5 %): 1 % off breaks it, not the others
    near = build_report([record(tiny_llama_dir, "validation", s) for s in (1.0, 1.01, 0.99)])
    assert [p.split(":")[0] for p in check_targets(near)] == ["peak_allocated_bytes"]
    bad = build_report([record(tiny_llama_dir, "validation", s) for s in (1.0, 0.9, 0.9)])
    problems = check_targets(bad)
    assert any("worst_underestimate" in p for p in problems)
    assert any("median_abs_error" in p for p in problems)


def test_calibration_cases_do_not_count_for_the_gate(tiny_llama_dir):
    report = build_report(
        [record(tiny_llama_dir, "calibration", 0.5), record(tiny_llama_dir, "validation", 1.0)]
    )
    assert check_targets(report) == []
    assert summarize(report.ok_rows, "device_total_bytes")["n"] == 2


def test_oom_case_estimated_to_fit_fails_the_gate(tiny_llama_dir):
    report = build_report(
        [
            record(tiny_llama_dir, "validation", 1.0),
            record(tiny_llama_dir, "validation", 1.0, status="oom"),
        ]
    )
    assert any("OOM case" in p for p in check_targets(report))


def test_empty_dataset_is_reported_not_passed():
    assert check_targets(build_report([])) == [
        "no validation measurements: the accuracy gate has nothing to check"
    ]


def test_report_command_writes_files_and_gates_on_regressions(tmp_path, tiny_llama_dir):
    data = tmp_path / "m"
    data.mkdir()
    rows = [record(tiny_llama_dir, "validation", 1.0), record(tiny_llama_dir, "calibration", 1.01)]
    (data / "h100.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "reports"
    args = ["report", "--measurements", str(data), "--out", str(out), "--no-progress"]
    args += ["--allocator-model", "approximate"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "this run is the baseline" in result.output
    assert {p.name for p in out.iterdir()} == {
        "accuracy.md",
        "accuracy.csv",
        "accuracy.json",
        "accuracy.png",
    }
    assert "validation · default allocator" in (out / "accuracy.md").read_text()
    assert (
        "  device_total_bytes median_abs_error (validation split, 1 case, default allocator): "
        "0.00 % (target 2.0 %, met, -2.00 pp)" in result.output
    )  # each figure names the subset it is over
    # the same data again: no figure worse than the committed one
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and "gate: PASS" in result.output
    # the estimate now 20 % under on the validation case: a regression, exit 1
    bad = [record(tiny_llama_dir, "validation", 0.8), rows[1]]
    (data / "h100.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "gate: FAIL, worse than the committed report:" in result.output
    assert "  validation/device_total_bytes/median_abs_error: 20.00 %, committed 0.00 %" in (
        result.output
    )


def test_regressions_name_each_worse_figure_and_lost_cases():
    committed = {
        "validation/device_total_bytes/n": 10,
        "validation/device_total_bytes/p90_abs_error": 0.03,
    }
    assert check_regressions(committed, committed) == []
    better = {
        "validation/device_total_bytes/n": 12,
        "validation/device_total_bytes/p90_abs_error": 0.01,
    }
    assert check_regressions(better, committed) == []
    within = dict(committed, **{"validation/device_total_bytes/p90_abs_error": 0.0304})
    assert check_regressions(within, committed) == []
    worse = {
        "validation/device_total_bytes/n": 9,
        "validation/device_total_bytes/p90_abs_error": 0.031,
    }
    assert check_regressions(worse, committed) == [
        "validation/device_total_bytes/n: 9 cases, the committed report had 10",
        "validation/device_total_bytes/p90_abs_error: 3.10 %, committed 3.00 %",
    ]
    assert check_regressions({}, {"validation/peak_reserved_bytes/max_abs_error": 0.05}) == [
        "validation/peak_reserved_bytes/max_abs_error: in the committed report (0.05), missing now"
    ]


@pytest.fixture(scope="module")
def committed_run():
    """``vramcalc report`` on every committed measurement, from cold (each recipe traced, each
    plan replayed): computed once for the gate and the byte-for-byte check below."""
    from vramcalc import api

    return api.report(MEASUREMENTS_DIR, baseline=REPORTS_DIR, allocator_model="simulate")


@pytest.mark.slow
def test_committed_measurements_do_not_regress_against_the_committed_report(committed_run):
    """The CI gate: every committed GPU measurement against today's estimator (the caching
    allocator simulated for each plan, as ``vramcalc plan`` does) must not be worse than
    ``reports/accuracy.json``; prints the distance to the targets."""
    assert committed_figures(REPORTS_DIR) is not None, (
        "reports/accuracy.json is missing: run `vramcalc report`"
    )
    print(
        "\n".join(
            ["", "distance to the targets (validation split):", *committed_run.gate.distances]
        )
    )
    assert list(committed_run.gate.regressions) == []


@pytest.mark.slow
def test_vramcalc_report_rewrites_the_committed_report_unchanged(committed_run, tmp_path):
    """The full freshness check: the report written now equals the committed one, file by file
    (``tests/test_freshness.py`` checks the cheap signs of a stale report)."""
    from vramcalc.render.accuracy import write_report
    from vramcalc.timeline import REPORT_CASE  # matplotlib

    timeline = REPORTS_DIR / f"timeline_{REPORT_CASE}.png"  # the picture the command draws
    assert timeline.is_file()
    gate = committed_run.gate
    write_report(
        committed_run.report, list(gate.target_problems), tmp_path, committed_run.inputs, timeline
    )
    for name in ("accuracy.json", "accuracy.csv", "accuracy.md"):
        assert (tmp_path / name).read_text() == (REPORTS_DIR / name).read_text(), name


def test_throughput_section_and_gate(tiny_llama_dir, monkeypatch):
    from vramcalc.speed.throughput_fit import compare_records

    rec = record(tiny_llama_dir, "validation", 1.0) | {
        "gpu_name": "H100-80GB",
        "step_seconds": 1.0,
        "tokens_per_second": 2048.0,
    }
    (predicted,) = compare_records([rec])
    # a measurement exactly as predicted passes; one 30 % slower fails the 15 % median target
    good = rec | {
        "step_seconds": predicted["predicted_step_seconds"],
        "tokens_per_second": predicted["predicted_tokens_per_second"],
    }
    report = build_report([good])
    assert report.throughput[0]["tokens_per_second_error"] == pytest.approx(0.0, abs=1e-9)
    assert check_targets(report) == []
    slow = good | {
        "step_seconds": good["step_seconds"] * 1.3,
        "tokens_per_second": good["tokens_per_second"] / 1.3,
    }
    assert any(p.startswith("tokens_per_second") for p in check_targets(build_report([slow])))


def test_a_record_that_trained_another_parameter_count_is_not_compared(tiny_llama_dir):
    """A run whose trainable parameters are not its plan's ran another plan (a DoRA label on
    a plain-LoRA run): it gets a reason instead of errors."""
    rec = record(tiny_llama_dir, "validation", 1.0, method="lora", dora=True)
    lora = estimate(TrainingPlan(str(tiny_llama_dir), method="lora"))
    (row,) = build_report([rec | {"trainable_params": lora.trainable_params}]).rows
    assert row.errors == {}
    assert row.estimate_error.startswith(f"the run trained {lora.trainable_params:,} parameters")
    (same,) = build_report([rec | {"trainable_params": row.estimate["trainable_params"]}]).rows
    assert set(same.errors) == {"device_total_bytes", "peak_reserved_bytes", "peak_allocated_bytes"}


def test_a_simulated_world_is_compared_without_nccl_buffers():
    """Rank 0 on torch's fake process group has no NCCL communicator: its device total is the
    estimate's less the NCCL rule's bytes; a real run's (or one GPU's) is the estimate's."""
    est = {"device_total_bytes": 10_000, "peak_reserved_bytes": 8_000, "components": {"nccl": 600}}
    world = {"simulated_world_size": 2}
    assert as_measured(world, est) == {**est, "device_total_bytes": 9_400}
    assert as_measured({"num_gpus": 2}, est) == est
    assert as_measured(world, {**est, "components": {"nccl": 0}})["device_total_bytes"] == 10_000
