"""The speed report: measurement quality (dispersion, plans measured twice), the split
figures, the regression gate and its distance to the targets, the files and the command."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from vramcalc.cli import cli
from vramcalc.measurements import percentile
from vramcalc.speed.speed_report import (
    TARGETS,
    dispersion,
    distances,
    regressions,
    repeat_pairs,
    summary,
)
from vramcalc.training_plan import TrainingPlan


def test_dispersion_of_the_timed_steps():
    record = {"step_seconds_measured": [1.0, 2.0, 3.0, 4.0, 10.0]}
    # median 3; quartiles 2 and 4 (linear interpolation); range 9
    assert dispersion(record) == {
        "steps": 5,
        "timed_seconds": 20.0,
        "iqr_over_median": pytest.approx(2 / 3),
        "range_over_median": pytest.approx(3.0),
    }
    assert dispersion({})["steps"] == 0 and dispersion({})["iqr_over_median"] is None
    assert percentile([3.0, 1.0, 2.0], 0.9) == pytest.approx(2.8)


def _record(case_id, tps, **fields):
    plan = TrainingPlan("m", **{"seq_len": 512, "batch_size": 2, **fields})
    return plan.to_dict() | {
        "case_id": case_id,
        "status": "ok",
        "step_seconds": 1024 / tps,
        "tokens_per_second": tps,
        "gpu_name": "NVIDIA H200",
        "seed": 0,
        "source_file": f"{case_id}.jsonl",
    }


def test_plans_measured_twice():
    records = [
        _record("a", 1000.0),
        _record("b", 1100.0) | {"seed": 1},  # the same plan again: a repeat
        _record("c", 900.0, allocator="expandable"),  # the plan under the other allocator
        _record("d", 500.0, seq_len=1024),  # another plan
        _record("e", 800.0) | {"record_trace": True},  # not usable
    ]
    (pair,) = repeat_pairs(records)
    assert pair["case_ids"] == ["a", "b"] and pair["seeds"] == [0, 1]
    assert pair["difference"] == pytest.approx(0.1)
    (other,) = repeat_pairs(records, ignore=("allocator",))
    assert other["case_ids"] == ["a", "c"] and other["allocator"] == ["default", "expandable"]
    assert other["difference"] == pytest.approx(-0.1)


def test_split_figures_gate_and_distances():
    rows = [
        {"split": "validation", "tokens_per_second_error": e} for e in (0.1, -0.2, 0.05, 0.45)
    ] + [{"split": "calibration", "tokens_per_second_error": 0.0}]
    figures = summary(rows, "validation")
    assert figures == {
        "n": 4,
        "median_abs_error": pytest.approx(0.15),
        "p90_abs_error": pytest.approx(0.375),
        "max_overprediction": 0.45,
        "max_underprediction": 0.2,
    }
    assert summary(rows, "nothing") == {"n": 0}
    assert distances(figures) == [
        "median_abs_error 15.0 % (target 15 %): 0.0 points inside",
        "p90_abs_error 37.5 % (target 30 %): 7.5 points OUTSIDE",
        "max_overprediction 45.0 % (target 40 %): 5.0 points OUTSIDE",
    ]
    committed = {"validation": dict(figures, median_abs_error=0.144, n=4)}
    assert regressions({"validation": figures}, committed) == [
        "validation median_abs_error: 15.00 % > committed 14.40 % (+0.5 points allowed)"
    ]
    assert regressions({"validation": figures}, {"validation": figures}) == []
    fewer = {"validation": dict(figures, n=3)}
    assert regressions(fewer, {"validation": figures}) == [
        "validation: 3 cases, the committed report had 4"
    ]
    assert TARGETS == {"median_abs_error": 0.15, "p90_abs_error": 0.30, "max_overprediction": 0.40}


def _measurements(folder, tiny_llama_dir, scale):
    """Records of the tiny model measured as predicted x ``scale`` in step time."""
    from vramcalc.speed.throughput_fit import compare_records

    records = []
    for i, (seq, batch, split) in enumerate(
        [(64, 1, "calibration"), (512, 8, "calibration"), (256, 4, "validation")]
    ):
        plan = TrainingPlan(str(tiny_llama_dir), method="lora", seq_len=seq, batch_size=batch)
        base = plan.to_dict() | {
            "case_id": f"c{i}",
            "split": split,
            "status": "ok",
            "gpu_name": "NVIDIA H200",
            "step_seconds": 1.0,
            "tokens_per_second": seq * batch,
        }
        (row,) = compare_records([base])
        step = row["predicted_step_seconds"] * scale
        steps = [step * 0.98, step, step * 1.03]
        records.append(
            base
            | {
                "step_seconds": step,
                "tokens_per_second": seq * batch / step,
                "step_seconds_measured": steps,
            }
        )
    folder.mkdir(exist_ok=True)
    (folder / "h200.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_speed_report_command_writes_files_and_gates(tmp_path, tiny_llama_dir):
    data, out = tmp_path / "data", tmp_path / "reports"
    _measurements(data, tiny_llama_dir, 1.0)
    args = ["speed-report", "--measurements", str(data), "--out", str(out)]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "3 cases compared" in first.output and "this run is the baseline" in first.output
    assert "median_abs_error 0.0 % (target 15 %): 15.0 points inside" in first.output
    for name in ("throughput.json", "throughput.md", "throughput.csv", "throughput.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "throughput.json").read_text())
    assert report["splits"]["validation"]["n"] == 1
    # steps 0.98, 1 and 1.03 x the median: quartiles 0.99 and 1.015
    assert report["dispersion"]["median_iqr_over_median"] == pytest.approx(0.025)
    assert "| validation  |   1 |" in (out / "throughput.md").read_text()
    assert (
        CliRunner()
        .invoke(cli, args)
        .output.endswith("gate: PASS (no figure worse than the committed report)\n")
    )
    _measurements(data, tiny_llama_dir, 1.25)  # the GPU got slower than predicted: worse figures
    worse = CliRunner().invoke(cli, args)
    assert worse.exit_code == 1 and "gate: FAIL, worse than the committed report:" in worse.output
    assert "validation median_abs_error: 25.00 % > committed 0.00 %" in worse.output
    assert CliRunner().invoke(cli, [*args, "--no-gate"]).exit_code == 0


def test_speed_fit_command_prints_and_writes(tmp_path, tiny_llama_dir, monkeypatch):
    from vramcalc import calibration

    data = tmp_path / "data"
    _measurements(data, tiny_llama_dir, 1.0)
    path = tmp_path / "calibration.json"
    path.write_text(calibration.CALIBRATION_JSON.read_text())
    others = {k for k in json.loads(path.read_text()) if not k.startswith("throughput_")}
    monkeypatch.setattr(calibration, "CALIBRATION_JSON", path)
    result = CliRunner().invoke(cli, ["speed-fit", "--measurements", str(data)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("fitted on 2 calibration cases measured on H200")
    assert "attention_efficiency" in result.output and "(kept)" in result.output
    written = CliRunner().invoke(
        cli, ["speed-fit", "--measurements", str(data), "--write"], catch_exceptions=False
    )
    assert written.output.rstrip().endswith(f"wrote the throughput_* entries of {path}")
    raw = json.loads(path.read_text())
    assert raw["throughput_fitted_on"]["value"]["cases"] == ["h200.jsonl:c0", "h200.jsonl:c1"]
    assert others and others <= set(raw)  # the memory entries stay
