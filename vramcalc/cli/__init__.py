"""The ``vramcalc`` command line: parse, call the library, render. Nothing else."""

from __future__ import annotations

import json

import click

from vramcalc.cli.options import given_options, plan_and_source, plan_options
from vramcalc.errors import VramcalcError


class _Group(click.Group):
    """Turn every library error into one ``Error: ...`` line (exit 1)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VramcalcError as err:
            raise click.ClickException(str(err)) from err


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vramcalc")
def cli() -> None:
    """How much GPU memory an LLM fine-tuning run needs, before you rent the GPU.

    \b
    Examples:
      vramcalc plan --model meta-llama/Llama-2-13b --method qlora --rank 16
      vramcalc plan --model Qwen/Qwen2.5-7B --method full --gpu H100-80GB --json
      vramcalc models        # the bundled model catalog (works offline)
      vramcalc gpus          # the GPU catalog
    """


@cli.command()
@click.pass_context
@plan_options
@click.option(
    "--gpu",
    "gpus",
    multiple=True,
    help="GPU(s) to check the fit and speed on (repeat or comma-separate). Default: every GPU of the catalog.",
)
@click.option(
    "--dataset-tokens",
    type=int,
    default=None,
    help="Tokens in the training set: prices the run (with --epochs) on every GPU that fits.",
)
@click.option(
    "--epochs", type=float, default=None, help="Passes over --dataset-tokens (default 1)."
)
@click.option(
    "--steps",
    type=int,
    default=None,
    help="Optimizer steps of the run, instead of --dataset-tokens.",
)
@click.option(
    "--price-per-hour",
    type=float,
    default=None,
    help="USD per GPU-hour, overriding the catalog's price for every GPU.",
)
@click.option(
    "--all-gpus",
    is_flag=True,
    help="List every GPU of the catalog, not only those that fit (implied by --gpu).",
)
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="Add each rule, calibration source, price source and speed source.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object (schema in README) instead of the report.",
)
def plan(
    ctx, gpus, dataset_tokens, epochs, steps, price_per_hour, all_gpus, verbose, as_json, **options
) -> None:
    """Estimate the GPU memory, speed and cost of one fine-tuning run.

    Counts every parameter exactly on the meta device (no weights, no GPU, no
    network for catalog models), applies each memory component's rule, and
    prints peak allocated / reserved / device-total memory, which GPUs it fits
    with their predicted tokens/s, and — given --dataset-tokens or --steps —
    the wall time and dollars on each GPU that fits.

    \b
    Example:
      vramcalc plan --model meta-llama/Llama-2-13b --method qlora --rank 16 \\
                    --seq-len 2048 --batch-size 4 --gpu RTX-4090 --dataset-tokens 50000000
      vramcalc plan --from axolotl-qlora.yml --gpu RTX-4090    # flags override the file
    """
    from vramcalc.planner import choose_gpus, plan_result
    from vramcalc.render.files import render_file_plan
    from vramcalc.render.plan import render_plan_result
    from vramcalc.speed.cost import RunLength

    the_plan, source = plan_and_source(ctx, options)
    wants_cost = dataset_tokens is not None or steps is not None or epochs is not None
    run = RunLength(dataset_tokens, epochs, steps) if wants_cost else None
    given = given_options(ctx)
    result = plan_result(the_plan, choose_gpus(list(gpus)), run, price_per_hour, given)
    note = source.checkpointing_note(the_plan) if source else None
    if note:
        result = result.with_assumption(the_plan.checkpointing_note, note)
    for warning in result.warnings:
        click.echo(f"Warning: {warning}", err=True)
    if as_json:
        data = result.to_dict()
        data["from_file"] = source.to_dict() if source else None
        click.echo(json.dumps(data, indent=2))
    else:
        if source:
            click.echo(render_file_plan(source) + "\n")
        click.echo(render_plan_result(result, all_gpus=all_gpus or bool(gpus), verbose=verbose))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models(as_json: bool) -> None:
    """List the bundled model catalog (usable offline), with exact parameter counts."""
    from vramcalc.catalog import model_catalog
    from vramcalc.render.catalog import render_models

    entries = model_catalog()
    if as_json:
        click.echo(
            json.dumps(
                [{"name": e.name, "aliases": list(e.aliases), "params": e.params} for e in entries],
                indent=2,
            )
        )
        return
    click.echo(render_models(entries))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def gpus(as_json: bool) -> None:
    """List the GPU catalog by memory: memory as the card reports it, peak bf16 and fp16
    (dense tensor) and fp32 TFLOP/s, bandwidth, price."""
    from vramcalc.catalog import load_gpus
    from vramcalc.render.catalog import render_gpus

    table = load_gpus()
    if as_json:
        click.echo(json.dumps([g.__dict__ | {"aliases": list(g.aliases)} for g in table], indent=2))
        return
    click.echo(render_gpus(table))


def _register_commands() -> None:
    """Commands that live in their own modules (each a thin click layer too)."""
    import importlib

    for module, names in (
        ("vramcalc.cli.capacity", ("sweep", "fit")),
        ("vramcalc.cli.advise", ("advise",)),
        ("vramcalc.cli.serve", ("serve",)),
        ("vramcalc.cli.report", ("report",)),
        ("vramcalc.cli.speed", ("speed_report", "speed_fit")),
        ("harness.cli", ("measure",)),
    ):
        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real missing dependency inside the module
                raise
            continue
        for name in names:
            cli.add_command(getattr(loaded, name))


_register_commands()


def main() -> None:
    cli(prog_name="vramcalc")


if __name__ == "__main__":  # pragma: no cover
    main()
