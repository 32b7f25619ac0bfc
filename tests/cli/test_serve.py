"""``vramcalc serve`` through click: output, JSON keys documented, exit codes, errors."""

from __future__ import annotations

import json
import os
import re

import pytest
from click.testing import CliRunner

from tests.test_readme import README, _keys, _section
from vramcalc.cli import cli
from vramcalc.cli.serve import NOTHING_FITS


def _run(*args: str):
    return CliRunner().invoke(cli, ["serve", *args])


def test_help():
    result = _run("--help")
    assert result.exit_code == 0
    assert "Estimate the GPU memory and speed of serving" in result.output


def test_text_report(tiny_llama_dir):
    result = _run(
        "--model", str(tiny_llama_dir), "--adapters", "3", "--mode", "multi", "--gpu", "H200"
    )
    assert result.exit_code == 0, result.output
    assert "3 adapters multi" in result.output
    assert "KV cache" in result.output and "decode tok/s" in result.output


def test_json_keys_are_documented(tiny_llama_dir, tmp_path):
    args = ["--model", str(tiny_llama_dir), "--gpu", "H200,T4", "--json", "--context", "600"]
    result = _run(*args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["warnings"]  # beyond the 512-token context
    keys = _keys({k: v for k, v in data.items()})
    fitted = json.loads(
        _run("--model", str(tiny_llama_dir), "--gpu", "H200", "--fit", "batch", "--json").stdout
    )
    keys |= _keys(fitted)
    documented = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", _section("### `--json` schema")))
    assert sorted(keys - documented) == []


def test_fit_batch_answers_and_reports_that_plan(tiny_llama_dir):
    result = _run("--model", str(tiny_llama_dir), "--gpu", "T4", "--fit", "batch", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["fit"]["value"] == data["serve_plan"]["batch"] > 1
    assert data["device_total_bytes"] <= data["fit"]["budget_bytes"]


def test_fit_needs_one_gpu(tiny_llama_dir):
    result = _run("--model", str(tiny_llama_dir), "--fit", "batch")
    assert result.exit_code == 1
    assert result.output.strip().endswith("Error: --fit batch needs exactly one --gpu.")


def test_nothing_fits_exits_3():
    result = _run(
        "--model", "meta-llama/Llama-2-70b", "--quant", "nf4", "--gpu", "T4", "--fit", "context"
    )
    assert result.exit_code == NOTHING_FITS
    assert "fit: no context" in result.output


def test_unknown_mode_lists_the_valid_ones(tiny_llama_dir):
    result = _run("--model", str(tiny_llama_dir), "--mode", "merge")
    assert result.exit_code == 2
    assert "'merge' is not one of 'merged', 'unmerged', 'multi'. Did you mean" in result.output


def test_bad_adapter_dir_is_one_error_line(tiny_llama_dir, tmp_path):
    result = _run("--model", str(tiny_llama_dir), "--adapter-dir", str(tmp_path))
    assert result.exit_code == 1
    assert result.output.startswith("Error: --adapter-dir ")
    assert "no adapter_config.json" in result.output


def test_adapter_dir_supplies_the_model(tiny_llama_dir, tmp_path):
    (tmp_path / "task").mkdir()
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"],
              "base_model_name_or_path": str(tiny_llama_dir)}  # fmt: skip
    (tmp_path / "task" / "adapter_config.json").write_text(json.dumps(config))
    result = _run("--adapter-dir", str(tmp_path), "--gpu", "H200", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["serve_plan"]["adapters"][0]["rank"] == 4
    assert data["adapter_params"] == [2 * (4 * 64 + 64 * 4)]


def test_adapters_and_adapter_dir_exclude_each_other(tiny_llama_dir, tmp_path):
    result = _run("--model", str(tiny_llama_dir), "--adapters", "2", "--adapter-dir", str(tmp_path))
    assert result.exit_code == 1
    assert result.output == "Error: --adapters and --adapter-dir exclude each other.\n"


def test_bad_targets_name_the_modules(tiny_llama_dir):
    result = _run("--model", str(tiny_llama_dir), "--targets", "qkv_proj")
    assert result.exit_code == 1
    assert "--targets qkv_proj: the model has no linear module of that name" in result.output


def _readme_serve_lines() -> tuple[str, list[str]]:
    block = _section("### Serving with adapters (`vramcalc serve`)")
    lines = [line for line in block.splitlines() if line.startswith("vramcalc serve --model")]
    return " ".join(block.split()), lines


def _simulated(line: str) -> dict:
    """A README serving example's answer as a user gets it: the simulated run."""
    result = _run(*line.split()[2:], "--allocator-model", "simulate", "--json")
    assert result.exit_code == 0, (line, result.output)
    return json.loads(result.stdout)


@pytest.mark.slow
def test_readme_serve_examples_say_what_they_answer():
    """The first and third examples (about a CPU-minute: each traces a 13B serving run and
    replays its 28.7 M allocator events, most of the small pool's left out where they repeat);
    the ``--fit batch`` one is the next test."""
    prose, lines = _readme_serve_lines()
    first, merged = _simulated(lines[0]), _simulated(lines[2])
    assert not first["gpus"][0]["fits"]
    assert f"{first['device_total_bytes'] / 2**30:.1f} GiB in all" in prose
    overhead = first["gpus"][0]["speed"]["adapter_overhead_fraction"]
    assert f"+{100 * overhead:.0f} % with" in prose
    assert merged["gpus"][0]["speed"]["adapter_overhead_fraction"] == 0


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("VRAMCALC_SLOW_TESTS"),
    reason="the README's --fit batch example simulates several 13B serving runs (about 10 "
    "CPU-minutes): VRAMCALC_SLOW_TESTS=1 runs it",
)
def test_readme_serve_fit_example_says_what_it_answers():
    prose, lines = _readme_serve_lines()
    fitted = _simulated(lines[1])
    assert f"says {fitted['fit']['value']} requests fit" in prose
    assert f"({fitted['fit']['device_total_bytes'] / 2**30:.1f} GiB)" in prose


def test_the_readme_names_the_serve_command():
    assert "vramcalc serve" in README
