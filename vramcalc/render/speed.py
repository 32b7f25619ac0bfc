"""The speed report (``reports/throughput.md``) and ``vramcalc speed-fit``'s constants, before and after."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vramcalc.render.output import two_panels, write_csv
from vramcalc.render.tables import table
from vramcalc.speed.speed_report import (
    REPORT_JSON,
    SpeedReport,
)
from vramcalc.speed.throughput import (
    ThroughputCalibration,
)
from vramcalc.speed.throughput_fit import (
    FITTED,
    ThroughputFit,
)

# -- speed report ----------------------------------------------------------------------------
_CONSTANT_UNITS = {
    "compute_efficiency": ("of the dense matmul peak", 1, "{:.3f}"),
    "fp32_efficiency": ("of the fp32 peak, fp32 matmuls", 1, "{:.3f}"),
    "attention_efficiency": ("of the dense peak, FlashAttention (prior)", 1, "{:.3f}"),
    "bandwidth_efficiency": ("of the memory bandwidth", 1, "{:.3f}"),
    "kernel_seconds": ("us of GPU time a kernel", 1e6, "{:.2f}"),
    "python_call_seconds": ("us of host time a Python-level torch call", 1e6, "{:.2f}"),
    "dispatch_seconds": ("us of host time a dispatched op", 1e6, "{:.2f}"),
    "bnb_tensor_seconds": ("us of host time a bitsandbytes optimizer tensor", 1e6, "{:.1f}"),
    "step_overhead_seconds": ("ms of host time a step", 1e3, "{:.2f}"),
}


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value) + 0.0:+.1f} %"


def _abs_pct(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.1f} %"


def _case_cells(row: dict[str, Any]) -> list[str]:
    return [
        str(row["case_id"])[:8],
        str(row["split"]),
        str(row.get("model") or "").split("/")[-1],
        f"{row.get('method')} {row.get('quant')}",
        f"{row.get('seq_len')}x{row.get('batch_size')}",
        "on" if row.get("gradient_checkpointing") else "off",
        f"{row['measured_tokens_per_second']:,.0f}",
        f"{row['predicted_tokens_per_second']:,.0f}",
        _pct(row["tokens_per_second_error"]),
        str(row["bound"]),
        str(row.get("steps") or "–"),
        _abs_pct(row.get("iqr_over_median")),
    ]


_CASE_HEADS = [
    "case",
    "split",
    "model",
    "method",
    "seq x batch",
    "ckpt",
    "measured tok/s",
    "predicted tok/s",
    "error",
    "bound",
    "steps",
    "IQR/median",
]


_CASE_NUMERIC = [False] * 6 + [True] * 3 + [False, True, True]


def render_speed_report(data: dict[str, Any]) -> str:
    """``reports/throughput.md`` from ``speed_report.SpeedReport.to_json()``."""
    lines = ["# vramcalc speed report (tokens/s)", ""]
    lines.append(
        "Error = predicted / measured tokens/s - 1: positive means the planner promises more "
        "speed than the GPU gave. Measured on: " + (", ".join(data["measured_on"]) or "none") + "."
    )
    lines += ["", "## Accuracy by split", ""]
    cells = [
        [
            split,
            str(s.get("n", 0)),
            _abs_pct(s.get("median_abs_error")),
            _abs_pct(s.get("p90_abs_error")),
            _pct(s.get("max_overprediction")),
            _pct(-s["max_underprediction"] if "max_underprediction" in s else None),
        ]
        for split, s in data["splits"].items()
    ]
    heads = ["split", "n", "median abs", "p90 abs", "max over", "max under"]
    lines += [table(cells, heads, [False] + [True] * 5, markdown=True), ""]
    targets = data["targets"]
    lines.append(
        f"Targets on the validation split: median <= {100 * targets['median_abs_error']:.0f} %, "
        f"p90 <= {100 * targets['p90_abs_error']:.0f} %, no case over-predicted by more than "
        f"{100 * targets['max_overprediction']:.0f} %."
    )
    lines += [f"- {line}" for line in data["distance_to_targets"]]
    lines += ["", "## Constants (data/calibration.json)", ""]
    cells = [
        [name, fmt.format(value * scale), unit]
        for name, value in data["constants"].items()
        for unit, scale, fmt in [_CONSTANT_UNITS[name]]
    ]
    lines += [table(cells, ["constant", "value", "unit"], [False, True, False], markdown=True), ""]
    lines += ["## Worst validation cases", ""]
    worst = [_case_cells(r) for r in data["worst_validation_cases"]]
    lines += [table(worst, _CASE_HEADS, _CASE_NUMERIC, markdown=True), ""]
    lines += ["## Measurement quality", ""]
    spread = data["dispersion"]
    lines.append(
        "Spread of the timed steps of a case, (Q3 - Q1) / median: median "
        f"{_abs_pct(spread['median_iqr_over_median'])}, largest {_abs_pct(spread['max_iqr_over_median'])}."
    )
    repeat = data["repeatability"]
    lines.append(
        f"Plans measured twice (same plan, same GPU, another seed or run): {len(repeat['pairs'])} "
        f"pairs, tokens/s apart by {_abs_pct(repeat['median_abs_difference'])} (median), "
        f"{_abs_pct(repeat['max_abs_difference'])} (largest); target 5 %."
    )
    lines.append("")
    for title, pairs in (
        ("Same plan", repeat["pairs"]),
        ("Same plan under the other allocator setting", repeat["other_allocator_pairs"]),
    ):
        if not pairs:
            continue
        cells = [
            [
                " / ".join(str(c)[:8] for c in p["case_ids"]),
                str(p["model"]).split("/")[-1],
                " / ".join(f"{t:,.0f}" for t in p["tokens_per_second"]),
                _pct(p["difference"]),
            ]
            for p in pairs
        ]
        lines += [f"{title}:", ""]
        heads = ["cases", "model", "tokens/s", "difference"]
        lines += [table(cells, heads, [False, False, True, True], markdown=True), ""]
    if data["excluded"]:
        lines += ["## Not compared", ""]
        lines += [f"- {line}" for line in data["excluded"]]
        lines.append("")
    lines += ["## Cases", ""]
    cases = [_case_cells(r) for r in data["cases"]]
    lines.append(table(cases, _CASE_HEADS, _CASE_NUMERIC, markdown=True))
    return "\n".join(lines) + "\n"


def render_speed_fit(fit: ThroughputFit, prior: ThroughputCalibration | None = None) -> str:
    """``vramcalc speed-fit``: each constant before (``prior``, else the fit's own) and after,
    and how well the fit reproduces the cases it was fitted on."""
    prior = prior or fit.prior or fit.calibration
    new = fit.calibration.values()
    cells = [
        [
            name,
            fmt.format(prior.values()[name] * scale),
            fmt.format(new[name] * scale),
            unit + ("" if name in FITTED else " (kept)"),
        ]
        for name in new
        for unit, scale, fmt in [_CONSTANT_UNITS[name]]
    ]
    lines = [
        f"fitted on {len(fit.cases)} calibration cases measured on "
        f"{fit.calibration.measured_on_text} ({fit.iterations} iterations); median |error| "
        f"{100 * fit.median_abs_error:.1f} % on them",
        table(cells, ["constant", "before", "after", "unit"], [False, True, True, False]),
    ]
    if fit.skipped:
        lines += ["not used:", *[f"  {line}" for line in fit.skipped]]
    return "\n".join(lines)


def write_speed_report(report: SpeedReport, out_dir: Path) -> list[Path]:
    """``throughput.json`` (every figure; the gate's baseline), ``.md``, ``.csv`` and, with
    matplotlib, ``.png`` (measured against predicted tokens/s)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = report.to_json()
    json_path = out_dir / REPORT_JSON
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    md_path = out_dir / "throughput.md"
    md_path.write_text(render_speed_report(data))
    csv_path = write_csv(out_dir / "throughput.csv", report.rows, ["case_id"])
    written = [json_path, md_path, csv_path]
    if report.rows:
        written.append(_plot(report, out_dir / "throughput.png"))
    return written


def _plot(report: SpeedReport, path: Path) -> Path:
    with two_panels(path, (12, 5), dpi=110) as (left, right):
        _measured_against_predicted(report, left)
        _error_by_step_time(report, right)
    return path


def _measured_against_predicted(report: SpeedReport, left: Any) -> None:
    markers = {"calibration": "o", "validation": "s"}
    for split, marker in markers.items():
        for bound, color in (("compute", "tab:blue"), ("memory", "tab:green"), ("host", "tab:red")):
            rows = [r for r in report.rows if r["split"] == split and r["bound"] == bound]
            if rows:
                left.scatter(
                    [r["measured_tokens_per_second"] for r in rows],
                    [r["predicted_tokens_per_second"] for r in rows],
                    marker=marker,
                    color=color,
                    alpha=0.75,
                    label=f"{split}, {bound}-bound",
                )
    values = [r["measured_tokens_per_second"] for r in report.rows]
    lo, hi = min(values) * 0.7, max(values) * 1.4
    for factor, style in ((1.0, "k-"), (1.15, "k:"), (1 / 1.15, "k:"), (1.4, "r--")):
        left.plot([lo, hi], [lo * factor, hi * factor], style, linewidth=0.8)
    left.set(
        xscale="log",
        yscale="log",
        xlabel="measured tokens/s (H200)",
        ylabel="predicted tokens/s",
        title="tokens/s: y = x, +-15 % dotted, +40 % dashed",
    )
    left.legend(fontsize=7)


def _error_by_step_time(report: SpeedReport, right: Any) -> None:
    markers = {"calibration": "o", "validation": "s"}
    for split, marker in markers.items():
        rows = [r for r in report.rows if r["split"] == split]
        right.scatter(
            [r["measured_step_seconds"] for r in rows],
            [100 * r["tokens_per_second_error"] for r in rows],
            marker=marker,
            alpha=0.75,
            label=split,
        )
    right.axhline(0, color="k", linewidth=0.8)
    right.axhline(40, color="r", linestyle="--", linewidth=0.8)
    right.set(
        xscale="log",
        xlabel="measured step time (s)",
        ylabel="error (%), + = speed over-predicted",
        title="error by step time",
    )
    right.legend(fontsize=8)
