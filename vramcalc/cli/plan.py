"""``vramcalc plan``: parse, call ``vramcalc.api.plan``, render."""

from __future__ import annotations

from pathlib import Path

import click

from vramcalc import api
from vramcalc.cli.options import (
    allocator_model_option,
    echo,
    echo_result,
    given_options,
    gpus_option,
    headroom_option,
    json_option,
    plan_and_source,
    plan_options,
    quiet_option,
    run_length_options,
)
from vramcalc.render.plan import render_plan_result


@click.command()
@click.pass_context
@plan_options
@gpus_option(
    "GPU(s) to check the fit and speed on (repeat or comma-separate). Default: every GPU of "
    "the catalog."
)
@headroom_option
@run_length_options(
    "Tokens in the training set: prices the run (with --epochs) on every GPU that fits."
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
    "--timeline",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the simulated run (loading, 3 steps: allocated and reserved bytes, the "
    "phases, what is alive at the peak) to FILE.png / .svg / .pdf, or .html (torch's viewer).",
)
@click.option(
    "--snapshot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the simulated run as a PyTorch memory snapshot (FILE.pickle): open it in "
    "https://pytorch.org/memory_viz beside one of your real run, or 'vramcalc compare'.",
)
@allocator_model_option
@quiet_option
@json_option("Print one JSON object (schema in docs/json-schema.md) instead of the report.")
def plan(
    ctx: click.Context,
    gpus: tuple[str, ...],
    headroom: str,
    dataset_tokens: int | None,
    epochs: float | None,
    steps: int | None,
    price_per_hour: float | None,
    all_gpus: bool,
    verbose: bool,
    timeline: Path | None,
    snapshot: Path | None,
    allocator_model: str | None,
    as_json: bool,
    **options,
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
    result = api.plan(
        plan_and_source(ctx, options),
        gpus=gpus,
        headroom=headroom,
        dataset_tokens=dataset_tokens,
        epochs=epochs,
        steps=steps,
        price_per_hour=price_per_hour,
        given=given_options(ctx),
        allocator_model=allocator_model,
    )
    echo_result(
        result,
        as_json,
        lambda: render_plan_result(result, all_gpus=all_gpus or bool(gpus), verbose=verbose),
    )
    if timeline is not None or snapshot is not None:
        import vramcalc.timeline as timelines  # matplotlib: only when a picture is asked

        run = timelines.record_plan(result.memory)
        for path, write in (
            (timeline, timelines.write_timeline),
            (snapshot, timelines.write_snapshot),
        ):
            if path is not None:
                echo(f"wrote {write(run, path)}", err=True)
