"""``vramcalc compare``: a predicted run's memory timeline against a measured one."""

from __future__ import annotations

from pathlib import Path

import click

from vramcalc import api
from vramcalc.cli.options import echo


@click.command()
@click.argument("predicted", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("measured", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The picture to write (.png, .svg or .pdf).",
)
@click.option("--title", default="", help="The picture's title (default: the runs').")
def compare(predicted: Path, measured: Path, output: Path, title: str) -> None:
    """Overlay a predicted and a measured memory timeline: in-use and reserved bytes.

    Each input is a PyTorch memory snapshot (.pickle: 'vramcalc plan --snapshot', or
    torch.cuda.memory._dump_snapshot() of a real run) or a harness allocator trace
    (.json.gz); they are aligned on loading and each optimizer step where both carry the
    markers.

    \b
    Example:
      vramcalc plan --model meta-llama/Llama-3.2-1B --method qlora --snapshot predicted.pickle
      vramcalc compare predicted.pickle my_run.pickle -o compare.png
    """

    echo(f"wrote {api.compare(predicted, measured, output, title=title)}")
