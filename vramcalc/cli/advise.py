"""``vramcalc advise``: parse, call ``vramcalc.api.advise``, render."""

from __future__ import annotations

import json

import click

from vramcalc import api
from vramcalc.cli.options import (
    allocator_model_option,
    echo,
    gpu_option,
    headroom_option,
    json_option,
    plan_and_source,
    plan_options,
    quiet_option,
)
from vramcalc.render.advise import render_advice
from vramcalc.render.files import render_file_plan


@click.command()
@plan_options
@gpu_option("The GPU the plan should fit (name or alias, see 'vramcalc gpus').")
@headroom_option
@allocator_model_option
@quiet_option
@json_option("Print one JSON object instead of the table.")
@click.pass_context
def advise(
    ctx: click.Context,
    gpu: str,
    headroom: str,
    allocator_model: str | None,
    as_json: bool,
    **options,
) -> None:
    """List the changes that make a plan fit a GPU, ranked by what they cost.

    Each change (gradient checkpointing, a smaller micro-batch with more accumulation, the
    expandable-segments allocator, more GPUs with FSDP, an 8-bit optimizer, QLoRA, fewer
    target modules or a lower rank, a shorter sequence) is shown with the memory and tokens/s
    after it; then the cheapest combination that fits. Takes the plan options or --from FILE.

    \b
    Example:
      vramcalc advise --model meta-llama/Llama-3.1-70B --method full --gpu H200
    """
    advice = api.advise(
        plan_and_source(ctx, options), gpu, headroom=headroom, allocator_model=allocator_model
    )
    if as_json:
        echo(json.dumps(advice.to_dict(), indent=2))
        return
    if advice.source:
        echo(render_file_plan(advice.source) + "\n")
    echo(render_advice(advice))
