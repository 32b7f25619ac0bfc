"""The accuracy report's files: ``accuracy.md`` (tables), ``.csv``, ``.json`` (the gate's figures) and ``.png``."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from vramcalc.accuracy import (
    FIGURES_FILE,
    METRICS,
    REGRESSION_TOLERANCE,
    STATS,
    Report,
    ReportRow,
    report_table,
    summarize,
    summary_figures,
    throughput_summary,
)
from vramcalc.memory import GIB
from vramcalc.render.output import two_panels, write_csv
from vramcalc.render.tables import table


def _fmt_pct(value: float) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{100 * value + 0.0:.2f} %"  # + 0.0: no "-0.00 %"
    )


def _abs_error_desc(metric: str, row: ReportRow) -> float:
    """Sort key: the largest |error| of ``metric`` first."""
    return -abs(row.errors.get(metric, 0.0))


def render_markdown(report: Report, problems: list[str], timeline: str | None = None) -> str:
    """``reports/accuracy.md`` (tables through ``render.table``, GitHub Markdown); ``timeline``:
    the file name of the predicted-vs-measured timeline picture beside it, if one was drawn."""
    lines = ["# vramcalc accuracy report", ""]
    lines.append(
        f"Measurements: {len(report.rows)} records from {', '.join(report.sources) or 'no files'}."
    )
    lines.append("Error = (estimate − measured) / measured; positive means over-estimate.")
    if any(r.record.get("simulated_world_size") for r in report.rows):
        lines.append(
            "multi-gpu rows are rank 0 of a simulated world (torch's fake process group): it "
            "has no NCCL communicator, so their device total is compared with the estimate's "
            "without NCCL's buffers (`memory/nccl.py`'s rule, not measured yet)."
        )
    lines.append("")
    if not report.rows:
        lines += [
            "No GPU measurements are committed yet (`data/measurements/` is empty), so nothing is compared.",
            "",
        ]
    ok = report.ok_rows
    heads = ["metric", "n", "median abs", "p90 abs", "max abs", "worst under-estimate"]
    for split in sorted({r.split for r in ok}):
        for allocator in sorted({r.allocator for r in ok if r.split == split}):
            group = [r for r in ok if r.split == split and r.allocator == allocator]
            lines += [f"## {split} · {allocator} allocator ({len(group)} cases)", ""]
            cells = []
            for method in sorted({str(r.record.get("method")) for r in group}):
                rows = [r for r in group if str(r.record.get("method")) == method]
                for metric in METRICS:
                    s = summarize(rows, metric)
                    cells.append(
                        [f"{method} · {metric}", str(s["n"]), *(_fmt_pct(s[k]) for k in STATS)]
                    )
            for metric in METRICS:
                s = summarize(group, metric)
                cells.append([f"all · {metric}", str(s["n"]), *(_fmt_pct(s[k]) for k in STATS)])
            lines += [table(cells, heads, [False] + [True] * 5, markdown=True), ""]
    for metric in ("device_total_bytes", "peak_reserved_bytes"):
        worst = sorted(ok, key=functools.partial(_abs_error_desc, metric))[:5]
        if worst:
            lines += [f"## Worst cases ({metric})", ""]
            for r in worst:
                rec = r.record
                lines.append(
                    f"- {rec.get('case_id')} ({rec.get('split')}, {r.allocator} allocator): "
                    f"{rec.get('model')} {rec.get('method')} {rec.get('quant')} "
                    f"s{rec.get('seq_len')} b{rec.get('batch_size')} "
                    f"ckpt={rec.get('gradient_checkpointing')} {rec.get('optimizer')}: "
                    f"{100 * r.errors[metric]:+.2f} %"
                )
            lines.append("")
    if report.throughput:
        lines += ["## Throughput (tokens/s)", ""]
        lines.append(f"Efficiencies: {report.throughput[0]['efficiency_measured_on']}.")
        cells = []
        for split in sorted({r["split"] for r in report.throughput}):
            s = throughput_summary(report, split)
            cells.append([split, str(s["n"]), _fmt_pct(s["median_abs_error"])])
        heads = ["split", "n", "median abs error"]
        lines += ["", table(cells, heads, [False, True, True], markdown=True), ""]
    lines += ["## Gate", ""]
    lines += [f"- FAIL: {p}" for p in problems] or ["- all targets met on the validation split"]
    lines += ["", "## Cases", ""]
    cases = report_table(report)
    if cases:
        cols = [
            "case_id",
            "split",
            "allocator",
            "model",
            "method",
            "seq_len",
            "batch_size",
            "status",
            "measured_device_total_bytes",
            "estimated_device_total_bytes",
            "error_pct_device_total_bytes",
            "measured_peak_reserved_bytes",
            "estimated_peak_reserved_bytes",
            "error_pct_peak_reserved_bytes",
            "measured_peak_allocated_bytes",
            "estimated_peak_allocated_bytes",
            "error_pct_peak_allocated_bytes",
        ]
        cells = [["" if flat.get(c) is None else str(flat.get(c)) for c in cols] for flat in cases]
        lines.append(table(cells, cols, markdown=True))
    if timeline:
        lines += [
            "",
            "## Predicted vs measured memory timeline",
            "",
            "One committed allocator trace (`data/measurements/*_traces/`) against the simulated "
            "run of the same plan: allocated and reserved bytes over loading and three optimizer "
            "steps (`vramcalc compare`, `plan --snapshot`).",
            "",
            f"![predicted vs measured memory timeline]({timeline})",
        ]
    return "\n".join(lines) + "\n"


def write_report(
    report: Report,
    problems: list[str],
    out_dir: Path,
    inputs: dict | None = None,
    timeline: Path | None = None,
) -> list[Path]:
    """Write accuracy.md, accuracy.csv, accuracy.json (the gate's figures and, given, the
    ``inputs`` it was computed from: ``freshness.report_inputs``) and accuracy.png;
    accuracy.md shows ``timeline`` (a picture in ``out_dir``) when given."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    figures = out_dir / FIGURES_FILE
    summary = {
        "comment": "Summary figures of accuracy.md. The regression gate (tests/test_accuracy.py, "
        "vramcalc report) fails when a recomputed figure is worse than one of these by more "
        f"than {REGRESSION_TOLERANCE} (errors are fractions), or a case count drops.",
        "sources": list(report.sources),
        "figures": summary_figures(report),
        "target_problems": problems,
    }
    if inputs is not None:
        summary["inputs"] = inputs
    figures.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    written.append(figures)
    md = out_dir / "accuracy.md"
    md.write_text(render_markdown(report, problems, timeline.name if timeline else None))
    written.append(md)
    csv_path = out_dir / "accuracy.csv"
    written.append(write_csv(csv_path, report_table(report), ["case_id", "split", "status"]))
    if report.ok_rows:
        written.append(_plot(report, out_dir / "accuracy.png"))
    return written


def _plot(report: Report, path: Path) -> Path:
    with two_panels(path, (11, 4.5), dpi=120) as (left, right):
        for split, marker in (("calibration", "o"), ("validation", "s")):
            rows = [r for r in report.ok_rows if r.split == split]
            xs = [r.record["device_total_bytes"] / GIB for r in rows]
            ys = [r.estimate["device_total_bytes"] / GIB for r in rows if r.estimate]
            left.scatter(xs, ys, marker=marker, label=split, alpha=0.8)
        values = [r.record["device_total_bytes"] / GIB for r in report.ok_rows]
        lo, hi = min(values) * 0.8, max(values) * 1.25
        left.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="y = x")
        left.set(
            xscale="log",
            yscale="log",
            xlabel="measured device total (GiB)",
            ylabel="estimated (GiB)",
        )
        left.legend()
        errors = [
            100 * r.errors["device_total_bytes"]
            for r in report.ok_rows
            if "device_total_bytes" in r.errors
        ]
        right.hist(errors, bins=20)
        right.set(xlabel="error (%)", ylabel="cases", title="device_total_bytes error")
    return path
