"""``vramcalc check``: a config that fits (exit 0), one that does not (1), a broken one (2);
globs, the Markdown summary (and $GITHUB_STEP_SUMMARY), a baseline written with --json."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

import vramcalc
from vramcalc.cli import cli
from vramcalc.estimate import prepare


@pytest.fixture
def configs(tmp_path, tiny_llama_dir):
    def axolotl(name: str, seq: int, batch: int) -> str:
        path = tmp_path / name
        path.write_text(
            yaml.safe_dump(
                {
                    "base_model": str(tiny_llama_dir),
                    "adapter": "lora",
                    "lora_r": 8,
                    "sequence_len": seq,
                    "micro_batch_size": batch,
                    "gradient_checkpointing": False,
                }
            )
        )
        return str(path)

    small = axolotl("small.yml", 128, 1)
    big = axolotl("big.yml", 512, 32768)  # far beyond an L4
    broken = tmp_path / "broken.yml"
    broken.write_text("base_model: [unclosed\n")
    return small, big, str(broken)


def _total(path: str) -> int:
    plan = vramcalc.read_config(path).plan
    return prepare(plan.model, plan).estimate(plan).device_total_bytes


def _run(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, ["check", *args], env=env)


def test_a_config_that_fits_exits_0_with_one_line(configs):
    small, _, _ = configs
    result = _run("--from", small, "--gpu", "L4")
    assert result.exit_code == 0, result.output
    first, last = result.output.splitlines()
    assert first.startswith(f"fits          {small}: ")
    assert "of 21.37 GiB on L4, margin" in first
    assert last == "1 of 1 configs fit L4 with 5% headroom (budget: its memory less the headroom)"


def test_one_config_that_does_not_fit_exits_1(configs, tmp_path):
    small, big, _ = configs
    summary = tmp_path / "step-summary.md"
    markdown = tmp_path / "comment.md"
    result = _run(
        "--from",
        str(tmp_path / "*.yml").replace("*.yml", "[sb][mi]*.yml"),  # a glob: small + big
        "--gpu",
        "L4",
        "--markdown",
        str(markdown),
        env={"GITHUB_STEP_SUMMARY": str(summary)},
    )
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"DOES NOT FIT  {big}: ")
    assert lines[1].startswith(f"fits          {small}: ")
    assert lines[-1].startswith("1 of 2 configs fit L4")
    text = markdown.read_text()
    assert text.startswith("### vramcalc check: ❌ a config does not fit on L4 (5% headroom)")
    assert f"`{big}`" in text and f"`{small}`" in text
    assert summary.read_text() == text  # the same summary in the job's step summary


def test_a_broken_config_is_an_input_error_exit_2(configs):
    small, _, broken = configs
    result = _run("--from", small, "--from", broken, "--gpu", "L4")
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: --from '{broken}': not valid YAML or JSON")
    missing = _run("--from", "no/such/*.yml", "--gpu", "L4")
    assert (missing.exit_code, missing.output) == (2, "Error: --from no/such/*.yml: no such file\n")
    unknown = _run("--from", small, "--gpu", "A100-41GB")
    assert unknown.exit_code == 2 and "A100-40GB" in unknown.output  # a close match


def test_flags_override_every_file_and_a_baseline_shows_the_change(configs, tmp_path):
    small, _, _ = configs
    base = _run("--from", small, "--gpu", "L4", "--json")
    assert base.exit_code == 0
    data = json.loads(base.output)
    assert data["format"] == "vramcalc-check/1" and data["fits"] is True
    assert data["plans"][0]["device_total_bytes"] == _total(small)
    baseline = tmp_path / "baseline.json"
    baseline.write_text(base.output)
    longer = _run("--from", small, "--gpu", "L4", "--seq-len", "256", "--baseline", str(baseline))
    assert longer.exit_code == 0, longer.output
    plan = vramcalc.read_config(small, seq_len=256).plan
    after = prepare(plan.model, plan).estimate(plan).device_total_bytes
    change = after - _total(small)
    assert change > 0
    assert f"; +{change / 2**30:,.2f} GiB against the baseline (+" in longer.output
    bad = _run("--from", small, "--gpu", "L4", "--baseline", small)
    assert bad.exit_code == 2 and "not a readable JSON file" in bad.output


def test_the_api_gives_what_the_command_prints(configs):
    small, big, _ = configs
    result = vramcalc.check([small, big], "L4")
    assert not result.fits
    assert [p.fits for p in result.plans] == [True, False]
    assert result.plans[0].memory.device_total_bytes == _total(small)
