"""``vramcalc sweep`` and ``vramcalc fit``: parse, call ``vramcalc.api.sweep`` /
``vramcalc.api.fit``, render (``vramcalc.render.capacity``, ``vramcalc.render.export``).

The sweep's options are ``plan``'s own (``cli.plan_options``), each made to
take several values; every value is checked by the plan option's own type, so
a typo fails with the same message as in ``plan``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from vramcalc import api
from vramcalc.cli.options import (
    allocator_model_option,
    echo,
    echo_result,
    given_options,
    gpu_option,
    gpus_option,
    headroom_option,
    hide_status_line,
    json_option,
    plan_and_source,
    plan_options,
    quiet_option,
    run_length_options,
)
from vramcalc.progress import reporting
from vramcalc.render import export
from vramcalc.render.capacity import render_fit, render_sweep
from vramcalc.render.files import render_file_plan


def _plan_params() -> list[click.Option]:
    holder = plan_options(lambda **_: None)
    params = reversed(holder.__click_params__)
    return [p for p in params if isinstance(p, click.Option) and p.name != "from_file"]


PLAN_PARAMS = _plan_params()


def plan_defaults() -> dict[str, Any]:
    """What ``vramcalc plan`` uses for an option that is not given."""
    ctx = click.Context(click.Command("plan"))
    out = {}
    for param in PLAN_PARAMS:
        value = param.get_default(ctx)
        out[param.name] = (
            value if value is None or isinstance(value, (bool, int, float, str)) else None
        )
    return out


def sweep_options(func):
    """``plan``'s options, each taking comma-separated values and repeatable."""
    defaults = plan_defaults()
    for param in reversed(PLAN_PARAMS):
        help_text = param.help or ""
        if isinstance(param.type, click.Choice):
            help_text += f" One or more of: {', '.join(map(str, param.type.choices))}."
        default = defaults[param.name]
        shown = f"  [default: {str(default).lower() if param.is_flag else default}]"
        shown = shown if default is not None and param.show_default else ""
        if param.name == "targets":
            help_text += " Repeat the option to sweep several target sets."
            extra: dict[str, Any] = {"metavar": "MODULES"}
        elif param.is_flag:
            help_text += " Sweep both: true,false."
            extra = {"is_flag": False, "flag_value": "true", "metavar": "[BOOL,...]"}
        else:
            help_text += " Comma-separate or repeat to sweep."
            extra = {"metavar": "VALUE[,VALUE...]"}
        if param.secondary_opts:  # --no-x: one more value, false
            no_help = f"Same as {param.opts[0]} false."
            func = click.option(
                *param.secondary_opts, f"no_{param.name}", is_flag=True, help=no_help
            )(func)
        func = click.option(
            *param.opts, param.name, multiple=True, help=help_text + shown, **extra
        )(func)
    return func


def sweep_axes(options: dict[str, Any], ctx: click.Context) -> dict[str, list[Any]]:
    """Typed, de-duplicated values per plan option given on the command line (pops them)."""
    axes = {}
    for param in PLAN_PARAMS:
        raw = list(options.pop(param.name, ()) or ())
        if options.pop(f"no_{param.name}", False):
            raw.append("false")
        pieces = (
            raw if param.name == "targets" else [p for r in raw for p in r.split(",") if p.strip()]
        )
        param_type = click.BOOL if param.is_flag else param.type
        if pieces:
            axes[param.name] = list(
                dict.fromkeys(param_type.convert(p.strip(), param, ctx) for p in pieces)
            )
    return axes


def _progress(quiet: bool):
    """A tqdm bar on stderr around the sweep's plans (none when quiet or not a terminal), with
    the step under way (tracing a recipe, replaying a run) beside it in place of the status
    line."""

    disable = quiet or not sys.stderr.isatty()

    def wrap(items):
        bar = tqdm(items, file=sys.stderr, disable=disable, unit="plan", desc="sweep")
        if disable:
            yield from bar
            return
        hide_status_line()
        with reporting(lambda message: bar.set_postfix_str(message[:70], refresh=True)):
            yield from bar

    return wrap


@click.command()
@sweep_options
@click.option(
    "--speed",
    is_flag=True,
    help="Add tokens/s, step seconds, MFU, what bounds the step and whether a measurement backs the GPU, per GPU.",
)
@run_length_options(
    "Tokens in the training set: adds optimizer steps and, per GPU the plan fits, wall hours, "
    "GPU-hours and USD (with --epochs)."
)
@click.option(
    "--from",
    "from_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Take the plan from a training config (axolotl, LLaMA-Factory, TRL, Trainer); the options given sweep around it.",
)
@click.option(
    "--cases",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CSV with one plan per row; columns are plan option names (model,method,rank,seq_len,... dashes or underscores) and optionally gpu. Blank cells take the command-line values (all of them: crossed) or plan's defaults.",
)
@gpus_option(
    "GPU(s) to get a fits column (repeat or comma-separate). Default: every GPU of the catalog."
)
@headroom_option
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write FILE.csv, .xlsx, .json, .jsonl or .md instead of printing a table.",
)
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="No progress bar (it is off anyway when stderr is not a terminal).",
)
@allocator_model_option
@click.pass_context
def sweep(
    ctx: click.Context,
    speed: bool,
    dataset_tokens: int | None,
    epochs: float | None,
    steps: int | None,
    price_per_hour: float | None,
    cases: Path | None,
    from_file: str | None,
    gpus: tuple[str, ...],
    headroom: str,
    output: Path | None,
    quiet: bool,
    allocator_model: str,
    **options,
) -> None:
    """Estimate many plans at once: the cross product of every option's values.

    Each plan option takes comma-separated values (or repeats); --cases takes
    one plan per CSV row instead. One output row per plan: the plan, every
    memory component and total in GiB (and exact bytes in CSV/JSON), trainable
    parameters, and a fits column per GPU (--speed: tokens/s per GPU;
    --dataset-tokens or --steps: the run's hours and dollars on each GPU it
    fits). A plan that is invalid gets the reason in the 'error' column; the
    sweep goes on (exit status 0).

    \b
    Example:
      vramcalc sweep --model meta-llama/Llama-2-7b-hf,mistralai/Mistral-7B-v0.1 \\
        --method lora,qlora --rank 8,16,64 --seq-len 512,2048,4096 \\
        --batch-size 1,4,8 --gpu A100-40GB,H100-80GB,RTX-4090 -o plans.xlsx
    """
    if output:
        export.check_output(output)  # fail before the work, not after
    result = api.sweep(
        sweep_axes(options, ctx),
        cases=cases,
        from_file=from_file,
        gpus=gpus,
        headroom=headroom,
        speed=speed,
        dataset_tokens=dataset_tokens,
        epochs=epochs,
        steps=steps,
        price_per_hour=price_per_hour,
        allocator_model=allocator_model,
        progress=_progress(quiet),
    )
    if result.source:
        echo(render_file_plan(result.source), err=True)
    if result.approximated:
        echo(
            f"Note: {result.approximated} of {len(result.rows)} plans use the approximate "
            "allocator slack (their allocator_model column says which).",
            err=True,
        )
    for warning, count in result.warnings.items():
        echo(f"Warning: {warning} ({count} of {len(result.rows)} plans)", err=True)
    if output:
        export.write_sweep(result, output)
        echo(f"{len(result.rows)} plans written to {output}", err=True)
    else:
        echo(render_sweep(result))
    if result.errors:
        echo(
            f"{result.errors} of {len(result.rows)} plans are invalid; see the error column.",
            err=True,
        )


@click.command()
@plan_options
@gpu_option("The GPU to fill (name or alias, see 'vramcalc gpus').")
@headroom_option
@click.option(
    "--seq-multiple",
    type=int,
    default=64,
    show_default=True,
    help="With --batch-size: search sequence lengths that are multiples of this.",
)
@allocator_model_option
@quiet_option
@json_option()
@click.pass_context
def fit(
    ctx: click.Context,
    gpu: str,
    headroom: str,
    seq_multiple: int,
    allocator_model: str | None,
    as_json: bool,
    **options,
) -> None:
    """Find the largest batch size that fits a GPU (with --batch-size: the longest sequence).

    Searches the estimator (doubling, then bisection): the answer fits within
    the GPU's memory minus --headroom, the next step (batch + 1, or sequence +
    --seq-multiple) does not; both estimates are shown. Sequence lengths stop at
    the model's context length.

    Exit status: 0 when something fits, 3 when even batch 1 (or one
    --seq-multiple) does not fit, 1 on errors, 2 on usage errors.

    \b
    Example:
      vramcalc fit --model meta-llama/Llama-2-7b-hf --method qlora --gpu RTX-4090 --seq-len 2048
    """
    given = given_options(ctx)
    if "batch_size" in given and "seq_len" in given:
        raise click.UsageError(
            "give --seq-len (fit searches the batch size) or --batch-size (fit searches the sequence length), not both."
        )
    result = api.fit(
        plan_and_source(ctx, options),
        gpu,
        headroom=headroom,
        search="seq_len" if "batch_size" in given else "batch_size",
        seq_multiple=seq_multiple,
        given=given,
        allocator_model=allocator_model,
    )
    if result.source:
        echo(render_file_plan(result.source), err=True)
    echo_result(result, as_json, lambda: render_fit(result))
    if not result.found:
        ctx.exit(3)
