"""``vramcalc report``: estimates vs committed GPU measurements, with the accuracy gate."""

from __future__ import annotations

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
    help="Where accuracy.md / .csv / .png are written.",
)
@click.option(
    "--no-gate", is_flag=True, help="Write the report but exit 0 even if targets are broken."
)
def report(measurements: Path | None, out_dir: Path, no_gate: bool) -> None:
    """Join every GPU measurement with its estimate; fail if accuracy targets break.

    Targets on the validation split, for device_total_bytes and
    peak_allocated_bytes: median |error| <= 3 %, 90th percentile <= 6 %,
    max <= 10 %, no under-estimate beyond 5 %, and every OOM case estimated
    not to fit. Prints one summary line.
    """
    from vramcalc.report import (
        MEASUREMENTS_DIR,
        build_report,
        check_targets,
        load_measurements,
        summarize,
        write_report,
    )

    records, sources = load_measurements(measurements or MEASUREMENTS_DIR)
    result = build_report(records, sources)
    problems = check_targets(result)
    write_report(result, problems, out_dir)
    validation = [r for r in result.ok_rows if r.split == "validation"]
    s = summarize(validation, "device_total_bytes")
    click.echo(
        f"{len(records)} measurements, {len(validation)} validation ok; device_total median |err| "
        + ("n/a" if not validation else f"{100 * s['median_abs_error']:.2f} %")
        + f"; gate: {'PASS' if not problems else 'FAIL (' + '; '.join(problems) + ')'}; wrote {out_dir}/accuracy.md"
    )
    if problems and not no_gate:
        raise SystemExit(1)
