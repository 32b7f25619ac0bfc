"""``vramcalc advise``: parse, call ``vramcalc.advise.advise``, render. Registered by ``cli.py``."""

from __future__ import annotations

import json

import click

from vramcalc.cli.options import plan_and_source, plan_options


@click.command()
@plan_options
@click.option(
    "--gpu", required=True, help="The GPU the plan should fit (name or alias, see 'vramcalc gpus')."
)
@click.option(
    "--headroom",
    default="5%",
    show_default=True,
    help="Memory to leave free: 5% or 0.05. A plan fits when its device total <= GPU memory x (1 - headroom).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.pass_context
def advise(ctx: click.Context, gpu: str, headroom: str, as_json: bool, **options) -> None:
    """List the changes that make a plan fit a GPU, ranked by what they cost.

    Each change (gradient checkpointing, a smaller micro-batch with more accumulation, the
    expandable-segments allocator, more GPUs with FSDP, an 8-bit optimizer, QLoRA, fewer
    target modules or a lower rank, a shorter sequence) is shown with the memory and tokens/s
    after it; then the cheapest combination that fits. Takes the plan options or --from FILE.

    \b
    Example:
      vramcalc advise --model meta-llama/Llama-3.1-70B --method full --gpu H200
    """
    from vramcalc.advise import advise as advise_plan
    from vramcalc.catalog import find_gpu
    from vramcalc.fit import parse_headroom
    from vramcalc.render.advise import render_advice
    from vramcalc.render.files import render_file_plan

    plan, source = plan_and_source(ctx, options)
    card, margin = find_gpu(gpu), parse_headroom(headroom)
    if source and not as_json:
        click.echo(render_file_plan(source) + "\n")
    advice = advise_plan(plan, card, margin)
    if as_json:
        data = advice.to_dict()
        data["from_file"] = source.to_dict() if source else None
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(render_advice(advice))
