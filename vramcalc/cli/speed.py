"""``vramcalc speed-report`` and ``vramcalc speed-fit``: tokens/s against the measurements."""

from __future__ import annotations

from pathlib import Path

import click

_MEASUREMENTS = click.option(
    "--measurements",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of harness JSONL files (default: data/measurements/).",
)


@click.command("speed-report")
@_MEASUREMENTS
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("reports"),
    show_default=True,
    help="Where throughput.json / .md / .csv / .png are written. The throughput.json already "
    "there is the baseline the regression gate compares with.",
)
@click.option(
    "--no-gate", is_flag=True, help="Write the report but exit 0 even if a figure regressed."
)
def speed_report(measurements: Path | None, out_dir: Path, no_gate: bool) -> None:
    """Predicted against measured tokens/s for every usable GPU measurement.

    Writes the figures per split (median and p90 |error|, largest over- and
    under-prediction), the five worst validation cases, the spread of each case's
    timed steps and the plans measured twice. The gate fails (exit 1) when a split
    figure is worse than in the throughput.json already in --out by more than 0.5
    points; it prints how far the validation figures stand from the targets
    (median <= 15 %, p90 <= 30 %, no over-prediction beyond 40 %).
    """
    from vramcalc.measurements import MEASUREMENTS_DIR, load_measurements
    from vramcalc.render.speed import write_speed_report
    from vramcalc.speed.speed_report import committed_splits, distances, regressions
    from vramcalc.speed.speed_report import (
        speed_report as build,
    )

    baseline = committed_splits(out_dir)
    records, _ = load_measurements(measurements or MEASUREMENTS_DIR)
    result = build(records)
    write_speed_report(result, out_dir)
    click.echo(f"{len(result.rows)} cases compared; wrote {out_dir}/throughput.md")
    for line in distances(result.splits.get("validation", {})):
        click.echo(f"  {line}")
    problems = regressions(result.splits, baseline) if baseline is not None else []
    if baseline is None:
        click.echo(f"gate: no committed {out_dir}/throughput.json; this run is the baseline")
    elif problems:
        click.echo("gate: FAIL, worse than the committed report:")
        for line in problems:
            click.echo(f"  {line}")
    else:
        click.echo("gate: PASS (no figure worse than the committed report)")
    if problems and not no_gate:
        raise SystemExit(1)


@click.command("speed-fit")
@_MEASUREMENTS
@click.option(
    "--write", is_flag=True, help="Write the fitted constants into data/calibration.json."
)
def speed_fit(measurements: Path | None, write: bool) -> None:
    """Fit the speed constants on the calibration split of the GPU measurements.

    Prints each constant before and after; with --write stores them (value, source
    and the measurement files and case ids they come from) in the throughput_*
    entries of data/calibration.json, leaving every other entry as it is.
    """
    from vramcalc.calibration import write_throughput_entries
    from vramcalc.measurements import MEASUREMENTS_DIR, load_measurements
    from vramcalc.render.speed import render_speed_fit
    from vramcalc.speed.throughput import load_throughput_calibration
    from vramcalc.speed.throughput_fit import fit_throughput

    records, _ = load_measurements(measurements or MEASUREMENTS_DIR)
    prior = load_throughput_calibration()
    fit = fit_throughput(records, prior=prior)
    click.echo(render_speed_fit(fit, prior))
    if write:
        path = write_throughput_entries(fit.calibration.to_json())
        click.echo(f"wrote the throughput_* entries of {path}")
