"""``measure``: --help explains the recipe, --dry-run lists cases, errors are one Error: line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from vramcalc_harness.caselist import load_cases
from vramcalc_harness.cli import measure
from vramcalc_harness.record import append_record, make_record

FIXTURES = Path(__file__).parent / "cases"
TINY_LLAMA = str(FIXTURES / "tiny-llama")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cases_file(tmp_path):
    path = tmp_path / "cases.yaml"
    path.write_text(
        "defaults: {steps: 2, warmup_steps: 1}\n"
        "grids:\n"
        f"  - {{model: {TINY_LLAMA}, split: calibration, rank: [8, 16], seq_len: 32}}\n"
        f"  - {{model: {TINY_LLAMA}, split: validation, rank: [32, 64], seq_len: 32}}\n"
    )
    return path


def test_measure_is_a_click_command_with_help_that_explains_the_recipe():
    assert isinstance(measure, click.Command) and measure.name == "measure"
    result = CliRunner().invoke(measure, ["--help"])
    assert result.exit_code == 0
    for text in (
        "Usage: measure [OPTIONS] CASES",
        "from_pretrained",
        "prepare_model_for_kbit_training",
        "HF Trainer",
        'status "oom"',
        "--timeout-s",
        "--only-split [calibration|validation]",
        "--device [auto|cuda|cpu]",
        "--dry-run",
        "within 1 %",
    ):
        assert text in result.output


def test_dry_run_lists_cases_and_what_is_done(cases_file, tmp_path):
    output = tmp_path / "out.jsonl"
    cases = load_cases(cases_file)
    append_record(output, make_record(cases[0], "cpu", "ok"))
    result = CliRunner().invoke(
        measure, [str(cases_file), "-o", str(output), "--device", "cpu", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith(
        f"done  calibration {cases[0].case_id} trainer {TINY_LLAMA} lora/none r8 default"
    )
    assert lines[0].endswith("seq 32 bs 1 ga 1 gc off adamw_torch_fused")
    assert lines[2].startswith(
        f"todo  validation  {cases[2].case_id} trainer {TINY_LLAMA} lora/none r32"
    )
    assert lines[-1] == f"4 cases: 3 to run, 1 done on cpu -> {output}"
    only = CliRunner().invoke(
        measure,
        [
            str(cases_file),
            "-o",
            str(output),
            "--device",
            "cpu",
            "--dry-run",
            "--only-split",
            "validation",
        ],
    )
    assert only.output.splitlines()[-1] == f"2 cases: 2 to run, 0 done on cpu -> {output}"


def test_invalid_case_file_is_one_error_listing_every_problem(tmp_path):
    bad = FIXTURES / "bad.csv"
    result = CliRunner().invoke(measure, [str(bad), "-o", str(tmp_path / "o.jsonl"), "--dry-run"])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: invalid cases in {bad}:\n"
        "  - bad.csv line 2: rank must be an integer, got 'eight'.\n"
        "  - bad.csv line 2: gradient_checkpointing must be true or false, got 'maybe'.\n"
    )


def test_missing_cases_file_and_unknown_model_are_errors(tmp_path):
    result = CliRunner().invoke(
        measure, [str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "o.jsonl")]
    )
    assert result.exit_code == 1
    assert (
        result.output
        == f"Error: invalid cases in {tmp_path / 'nope.yaml'}:\n  - cases file {tmp_path / 'nope.yaml'} does not exist.\n"
    )
    cases = tmp_path / "cases.csv"
    cases.write_text("model,split\nmeta-llama/Llama-9-1B,calibration\n")
    result = CliRunner().invoke(
        measure, [str(cases), "-o", str(tmp_path / "o.jsonl"), "--device", "cpu"]
    )
    assert result.exit_code == 1
    assert result.output.startswith(
        "Error: models that do not resolve: --model 'meta-llama/Llama-9-1B'"
    )
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_device_cuda_without_a_gpu_is_an_error(cases_file, tmp_path):
    result = CliRunner().invoke(
        measure, [str(cases_file), "-o", str(tmp_path / "o.jsonl"), "--device", "cuda"]
    )
    assert result.exit_code == 1
    assert result.output == (
        "Error: --device cuda: no CUDA GPU is visible to torch; use --device cpu or auto.\n"
    )


def test_bad_option_values_are_usage_errors(cases_file, tmp_path):
    result = CliRunner().invoke(
        measure, [str(cases_file), "-o", str(tmp_path / "o"), "--device", "tpu"]
    )
    assert result.exit_code == 2
    assert (
        "Invalid value for '--device': 'tpu' is not one of 'auto', 'cuda', 'cpu'." in result.output
    )
    result = CliRunner().invoke(measure, [str(cases_file)])
    assert result.exit_code == 2 and "Missing option '-o' / '--output'." in result.output


def test_python_dash_m_harness_runs_the_command():
    done = subprocess.run(
        [sys.executable, "-m", "vramcalc_harness", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: python -m vramcalc_harness [OPTIONS] CASES")
