"""Every command of the click group, found from the group itself: it has help, the README
documents it, and it prints the same bytes as its call of the Python API (the CLI is a
client of ``vramcalc.api``). A command added to the group without a case here fails."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import vramcalc
from tests.speed.test_speed_report import _measurements
from tests.test_accuracy import record
from tests.test_readme import README
from vramcalc.cli import cli
from vramcalc.render.accuracy import write_report
from vramcalc.render.capacity import render_sweep
from vramcalc.render.speed import render_speed_fit, write_speed_report

COMMANDS = sorted(cli.list_commands(click.Context(cli)))


def _json(result) -> str:
    return json.dumps(result.to_dict(), indent=2) + "\n"


def _files(folder: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names}


# command -> (model dir, tmp dir) -> (CLI arguments, the same answer through the API)
Case = Callable[[Path, Path], tuple[list[str], Callable[[], object], Callable[[object], object]]]


def _plan(model: Path, tmp: Path):
    args = ["plan", "-m", str(model), "--method", "qlora", "--gpu", "H200,T4", "--steps", "10"]
    return (
        [*args, "--json"],
        lambda: _json(vramcalc.plan(str(model), method="qlora", gpus=["H200,T4"], steps=10)),
        lambda out: out.stdout,
    )


def _models(model: Path, tmp: Path):
    return (
        ["models", "--json"],
        lambda: json.dumps([m.to_dict() for m in vramcalc.models()], indent=2) + "\n",
        lambda out: out.stdout,
    )


def _gpus(model: Path, tmp: Path):
    return (
        ["gpus", "--json"],
        lambda: json.dumps([g.to_dict() for g in vramcalc.gpus()], indent=2) + "\n",
        lambda out: out.stdout,
    )


def _sweep(model: Path, tmp: Path):
    axes = {"model": str(model), "method": ["lora", "qlora"], "rank": [8, 16]}
    return (
        ["sweep", "-m", str(model), "--method", "lora,qlora", "--rank", "8,16", "--gpu", "L4"],
        lambda: render_sweep(vramcalc.sweep(axes, gpus=["L4"])) + "\n",
        lambda out: out.stdout,
    )


def _fit(model: Path, tmp: Path):
    return (
        ["fit", "-m", str(model), "--method", "qlora", "--gpu", "L4", "--seq-len", "512", "--json"],
        lambda: _json(vramcalc.fit(str(model), "L4", method="qlora", seq_len=512)),
        lambda out: out.stdout,
    )


def _advise(model: Path, tmp: Path):
    return (
        ["advise", "-m", str(model), "--gpu", "L4", "--batch-size", "8", "--json"],
        lambda: _json(vramcalc.advise(str(model), "L4", batch_size=8)),
        lambda out: out.stdout,
    )


def _serve(model: Path, tmp: Path):
    return (
        ["serve", "-m", str(model), "--adapters", "2", "--gpu", "L4", "--json"],
        lambda: _json(vramcalc.serve(str(model), adapters=2, gpus=["L4"])),
        lambda out: out.stdout,
    )


def _check(model: Path, tmp: Path):
    config = tmp / "train.yml"
    config.write_text(
        f"base_model: {model}\nadapter: qlora\nload_in_4bit: true\nsequence_len: 256\n"
    )
    return (
        ["check", "--from", str(config), "--gpu", "L4", "--json"],
        lambda: _json(vramcalc.check(str(config), "L4")),
        lambda out: out.stdout,
    )


def _compare(model: Path, tmp: Path):
    from vramcalc.timeline import write_snapshot

    plan = vramcalc.TrainingPlan(str(model), method="lora", seq_len=64)
    predicted, measured = (
        write_snapshot(plan, tmp / "p.pickle"),
        Path("data/measurements/h200_round2_traces/07145b4d3b9f0836.json.gz"),
    )

    def through_the_api() -> bytes:
        return vramcalc.compare(predicted, measured, tmp / "api.png").read_bytes()

    args = ["compare", str(predicted), str(measured), "-o", str(tmp / "cli.png")]
    return args, through_the_api, lambda out: (tmp / "cli.png").read_bytes()


ACCURACY_FILES = ("accuracy.md", "accuracy.csv", "accuracy.json")


def _report(model: Path, tmp: Path):
    data = tmp / "data"
    data.mkdir()
    records = [record(model, "validation", s) for s in (1.0, 1.01)]
    (data / "h200.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cli_out, api_out = tmp / "cli", tmp / "api"

    def through_the_api() -> dict[str, bytes]:
        result = vramcalc.report(data, baseline=api_out)
        write_report(result.report, list(result.gate.target_problems), api_out)
        return _files(api_out, ACCURACY_FILES)

    args = ["report", "--measurements", str(data), "--out", str(cli_out), "--no-progress"]
    return args, through_the_api, lambda out: _files(cli_out, ACCURACY_FILES)


SPEED_FILES = ("throughput.md", "throughput.csv", "throughput.json")


def _speed_report(model: Path, tmp: Path):
    data, cli_out, api_out = tmp / "data", tmp / "cli", tmp / "api"
    _measurements(data, model, 1.0)

    def through_the_api() -> dict[str, bytes]:
        write_speed_report(vramcalc.speed_report(data, baseline=api_out).report, api_out)
        return _files(api_out, SPEED_FILES)

    args = ["speed-report", "--measurements", str(data), "--out", str(cli_out)]
    return args, through_the_api, lambda out: _files(cli_out, SPEED_FILES)


def _speed_fit(model: Path, tmp: Path):
    data = tmp / "data"
    _measurements(data, model, 1.0)
    return (
        ["speed-fit", "--measurements", str(data)],
        lambda: render_speed_fit(vramcalc.speed_fit(data)) + "\n",
        lambda out: out.stdout,
    )


def _measure(model: Path, tmp: Path):
    from vramcalc_harness.caselist import load_cases
    from vramcalc_harness.cli import describe
    from vramcalc_harness.launcher import plan_run, resolve_device

    cases = tmp / "cases.yaml"
    cases.write_text(
        f"defaults: {{split: validation, steps: 1, model: {model}}}\n"
        "cases:\n  - {method: lora}\n  - {method: qlora}\n"
    )
    output = tmp / "out.jsonl"

    def through_the_api() -> str:
        device = resolve_device("cpu")
        planned = plan_run(load_cases(cases), output, device, False)
        lines = [("done  " if p.done else "todo  ") + describe(p.case) for p in planned]
        lines.append(f"{len(planned)} cases: {len(planned)} to run, 0 done on {device} -> {output}")
        return "\n".join(lines) + "\n"

    args = ["measure", str(cases), "-o", str(output), "--device", "cpu", "--dry-run"]
    return args, through_the_api, lambda out: out.stdout


CASES: dict[str, Case] = {
    "plan": _plan,
    "models": _models,
    "gpus": _gpus,
    "sweep": _sweep,
    "fit": _fit,
    "advise": _advise,
    "check": _check,
    "compare": _compare,
    "serve": _serve,
    "report": _report,
    "speed-report": _speed_report,
    "speed-fit": _speed_fit,
    "measure": _measure,
}


def test_every_command_has_a_case():
    assert sorted(CASES) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_and_is_in_the_readme(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: cli {command} [OPTIONS]")
    described = cli.get_command(click.Context(cli), command)
    assert described is not None and len(described.get_short_help_str()) > 20
    assert f"vramcalc {command} " in README, f"'vramcalc {command}' is not shown in the README"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_prints_what_its_api_call_returns(command, tiny_llama_dir, tmp_path):
    args, through_the_api, printed = CASES[command](tiny_llama_dir, tmp_path)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert printed(result) == through_the_api()
