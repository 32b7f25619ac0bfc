"""``vramcalc check``: parse, call ``vramcalc.api.check``, render; the exit status is the
verdict (0: every config fits, 1: one does not, 2: an input error)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from vramcalc import api
from vramcalc.cli.options import (
    allocator_model_option,
    check_plan_options,
    echo,
    given_options,
    gpu_option,
    headroom_option,
    quiet_option,
)
from vramcalc.errors import VramcalcError
from vramcalc.render.check import render_check, render_check_markdown
from vramcalc.training_plan import PLAN_FIELDS


class InputError(click.ClickException):
    """A broken config, an unknown GPU, a bad flag: exit status 2 (not a verdict)."""

    exit_code = 2


@click.command()
@check_plan_options
@gpu_option("The GPU every config must fit (name or alias, see 'vramcalc gpus').")
@headroom_option
@click.option(
    "--markdown",
    "markdown_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the summary as Markdown (a pull-request comment); with "
    "$GITHUB_STEP_SUMMARY set, it is appended there too.",
)
@click.option(
    "--baseline",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A result written earlier with --json: each config's change in GiB and % against it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (a baseline).")
@allocator_model_option
@quiet_option
@click.pass_context
def check(
    ctx: click.Context,
    from_files: tuple[str, ...],
    gpu: str,
    headroom: str,
    markdown_path: Path | None,
    baseline: Path | None,
    as_json: bool,
    allocator_model: str | None,
    **options,
) -> None:
    """Fail when a training config does not fit a GPU: a gate for your own CI.

    Reads each config (axolotl, LLaMA-Factory, TRL, HF Trainer; several --from, or a
    quoted glob) as 'plan --from' does, plan flags given here on top of every file, and
    judges it on --gpu leaving --headroom free. One line per config: the verdict, device
    total against the budget, the margin. Exit status: 0 every config fits, 1 at least one
    does not, 2 an input error (a broken file, an unknown GPU or flag).

    \b
    Examples:
      vramcalc check --from train.yaml --gpu A100-40GB
      vramcalc check --from 'configs/*.yaml' --gpu RTX-4090 --markdown summary.md
      vramcalc check --from train.yaml --gpu H100 --num-gpus 8 --json > baseline.json
      vramcalc check --from train.yaml --gpu H100 --num-gpus 8 --baseline baseline.json
    """
    given = given_options(ctx)
    flags = {name: options[name] for name in PLAN_FIELDS if name in options and name in given}
    try:
        result = api.check(
            from_files,
            gpu,
            headroom=headroom,
            baseline=baseline,
            allocator_model=allocator_model,
            **flags,
        )
    except VramcalcError as err:
        raise InputError(str(err)) from err
    if as_json:
        echo(json.dumps(result.to_dict(), indent=2))
    else:
        echo(render_check(result))
    summary = render_check_markdown(result)
    if markdown_path is not None:
        markdown_path.write_text(summary, encoding="utf-8")
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as out:
            out.write(summary)
    if not result.fits:
        ctx.exit(1)
