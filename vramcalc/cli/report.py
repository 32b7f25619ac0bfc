"""``vramcalc report``: estimates vs committed GPU measurements, with the regression gate."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.option(
    "--measurements",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of harness JSONL files (default: data/measurements/).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("reports"),
    show_default=True,
    help="Where accuracy.md / .csv / .json / .png are written. The accuracy.json already there "
    "is the baseline the regression gate compares with.",
)
@click.option(
    "--allocator-model",
    type=click.Choice(["simulate", "cached", "approximate"]),
    default="simulate",
    show_default=True,
    help="How each estimate gets the caching allocator's slack: simulate the run (the "
    "estimator's default; seconds per plan the first time, then cached), cached simulations "
    "only, or the calibrated fallback fraction.",
)
@click.option(
    "--no-gate", is_flag=True, help="Write the report but exit 0 even if a figure regressed."
)
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
def report(
    measurements: Path | None,
    out_dir: Path,
    allocator_model: str,
    no_gate: bool,
    no_progress: bool,
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
    from tqdm import tqdm

    from vramcalc.measurements import MEASUREMENTS_DIR, load_measurements
    from vramcalc.render.report import write_report
    from vramcalc.report import (
        build_report,
        check_regressions,
        check_targets,
        committed_figures,
        summary_figures,
        target_distances,
    )

    baseline = committed_figures(out_dir)
    records, sources = load_measurements(measurements or MEASUREMENTS_DIR)
    with tqdm(
        total=len(records),
        unit="case",
        desc="estimate",
        disable=no_progress,
        file=sys.stderr,
    ) as bar:
        result = build_report(records, sources, allocator_model, progress=bar.update)
    figures = summary_figures(result)
    regressions = check_regressions(figures, baseline) if baseline is not None else []
    problems = check_targets(result)
    write_report(result, problems, out_dir)
    click.echo(
        f"{len(records)} measurements from {len(sources)} files; wrote {out_dir}/accuracy.md"
    )
    for line in target_distances(figures):
        click.echo(f"  {line}")
    if baseline is None:
        click.echo(
            f"gate: no committed {out_dir}/accuracy.json to compare with; this run is the baseline"
        )
    elif regressions:
        click.echo("gate: FAIL, worse than the committed report:")
        for line in regressions:
            click.echo(f"  {line}")
    else:
        click.echo("gate: PASS (no figure worse than the committed report)")
    if regressions and not no_gate:
        raise SystemExit(1)
