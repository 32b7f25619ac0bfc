"""``vramcalc report``: estimates vs committed GPU measurements, with the regression gate."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from tqdm import tqdm

from vramcalc import api
from vramcalc.cli.options import echo, measurements_option, no_gate_option, out_option
from vramcalc.measurements import Gate
from vramcalc.render.accuracy import write_report


@click.command()
@measurements_option
@out_option("accuracy.md / .csv / .json / .png")
@click.option(
    "--allocator-model",
    type=click.Choice(["simulate", "approximate"]),
    default="simulate",
    show_default=True,
    help="How each estimate gets the caching allocator's slack: simulate the run (the "
    "estimator's default: one trace per recipe, a replay per plan, both cached), or the "
    "calibrated fallback fraction (every row marks which).",
)
@no_gate_option
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option(
    "--no-timeline",
    is_flag=True,
    help="Skip the predicted-vs-measured timeline picture of a committed allocator trace "
    "(drawn only for the committed measurements; needs matplotlib).",
)
def report(
    measurements: Path | None,
    out_dir: Path,
    allocator_model: str,
    no_gate: bool,
    no_progress: bool,
    no_timeline: bool,
) -> None:
    """Join every GPU measurement with its estimate and gate on regressions.

    Errors are (estimate - measured) / measured for device_total_bytes (what
    nvidia-smi shows), peak_reserved_bytes and peak_allocated_bytes, summarized
    per split (calibration / validation) and allocator mode. The gate fails
    (exit 1) when a figure is worse than in the accuracy.json already in --out
    (the committed report) by more than 0.05 percentage points, or a figure or
    case is missing. It also prints how far each validation figure stands from
    the targets: device total and reserved median <= 2 %, p90 <= 4 %, max <= 8 %,
    never under by more than 3 %; allocated median <= 0.5 %, max <= 5 %; every
    OOM case estimated not to fit; tokens/s median <= 15 %.
    """
    with tqdm(unit="case", desc="estimate", disable=no_progress, file=sys.stderr) as bar:
        result = api.report(
            measurements,
            baseline=out_dir,
            allocator_model=allocator_model,
            progress=bar.update,
        )
    timeline = None
    if measurements is None and not no_timeline:  # a committed trace, simulated again
        echo("drawing the predicted vs measured timeline of a committed trace", err=True)
        timeline = api.report_timeline(out_dir)
    write_report(result.report, list(result.gate.target_problems), out_dir, result.inputs, timeline)
    rows = result.report.rows
    echo(
        f"{len(rows)} measurements from {len(result.report.sources)} files; "
        f"wrote {out_dir}/accuracy.md"
    )
    echo_gate(result.gate, f"{out_dir}/accuracy.json", no_gate)


def echo_gate(gate: Gate, baseline: str, no_gate: bool) -> None:
    """The distances to the targets and the gate's verdict; exit 1 when it failed."""
    for line in gate.distances:
        echo(f"  {line}")
    if gate.regressions is None:
        echo(f"gate: no committed {baseline} to compare with; this run is the baseline")
    elif gate.regressions:
        echo("gate: FAIL, worse than the committed report:")
        for line in gate.regressions:
            echo(f"  {line}")
    else:
        echo("gate: PASS (no figure worse than the committed report)")
    if gate.failed and not no_gate:
        raise SystemExit(1)
