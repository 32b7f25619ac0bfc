"""``vramcalc speed-report`` and ``vramcalc speed-fit``: tokens/s against the measurements."""

from __future__ import annotations

from pathlib import Path

import click

from vramcalc import api
from vramcalc.calibration import write_throughput_entries
from vramcalc.cli.options import echo, measurements_option, no_gate_option, out_option
from vramcalc.cli.report import echo_gate
from vramcalc.render.speed import render_speed_fit, write_speed_report


@click.command("speed-report")
@measurements_option
@out_option("throughput.json / .md / .csv / .png")
@no_gate_option
def speed_report(measurements: Path | None, out_dir: Path, no_gate: bool) -> None:
    """Predicted against measured tokens/s for every usable GPU measurement.

    Writes the figures per split (median and p90 |error|, largest over- and
    under-prediction), the five worst validation cases, the spread of each case's
    timed steps and the plans measured twice. The gate fails (exit 1) when a split
    figure is worse than in the throughput.json already in --out by more than 0.5
    points; it prints how far the validation figures stand from the targets
    (median <= 15 %, p90 <= 30 %, no over-prediction beyond 40 %).
    """
    result = api.speed_report(measurements, baseline=out_dir)
    write_speed_report(result.report, out_dir)
    echo(f"{len(result.report.rows)} cases compared; wrote {out_dir}/throughput.md")
    echo_gate(result.gate, f"{out_dir}/throughput.json", no_gate)


@click.command("speed-fit")
@measurements_option
@click.option(
    "--write", is_flag=True, help="Write the fitted constants into data/calibration.json."
)
def speed_fit(measurements: Path | None, write: bool) -> None:
    """Fit the speed constants on the calibration split of the GPU measurements.

    Prints each constant before and after; with --write stores them (value, source
    and the measurement files and case ids they come from) in the throughput_*
    entries of data/calibration.json, leaving every other entry as it is.
    """
    fit = api.speed_fit(measurements)
    echo(render_speed_fit(fit))
    if write:
        path = write_throughput_entries(fit.calibration.to_json())
        echo(f"wrote the throughput_* entries of {path}")
