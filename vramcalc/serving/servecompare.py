"""Serving estimates against serving measurements (``kind: serve`` records): one row per ok
record, both allocator models, the relative error of each memory metric; with ``--speed``,
the predicted prefill and decode tokens/s on the record's GPU against the measured ones.

``python -m vramcalc.serving.servecompare data/measurements/h100_serve2_*.jsonl`` prints
the Markdown table (``reports/serve_memory.md``; ``--speed``: ``reports/serve_speed.md``)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vramcalc.catalog import find_gpu
from vramcalc.serve_plan import ServePlan, context_split, uniform_adapters
from vramcalc.serving.serve import prepare_serving
from vramcalc.serving.serve_planner import serve_memory
from vramcalc.serving.serve_speed import estimate_serve_speed
from vramcalc.speed.throughput import load_throughput_calibration

METRICS = ("peak_allocated_bytes", "peak_reserved_bytes", "device_total_bytes")
SPEED_METRICS = ("prefill_tokens_per_second", "decode_tokens_per_second")
ALLOCATOR_MODELS = ("approximate", "simulate")


def serve_plan_of(record: dict[str, Any]) -> ServePlan:
    """The ``ServePlan`` a serving record measured (its fields as the harness's case
    list gives them)."""
    targets = record.get("targets")
    adapters = uniform_adapters(
        record.get("adapters", 1),
        record.get("rank", 8),
        record.get("alpha"),
        tuple(targets) if isinstance(targets, list) else targets,
    )
    if record.get("dora"):
        adapters = tuple(replace(a, dora=True) for a in adapters)
    prompt, new = context_split(
        record.get("context"), record.get("prompt_tokens"), record.get("new_tokens")
    )
    fields = ("quant", "double_quant", "dtype", "attn", "mode", "batch", "cache", "logits")
    return ServePlan(
        model=record["model"],
        adapters=adapters,
        prompt_tokens=prompt,
        new_tokens=new,
        **{k: record[k] for k in fields if record.get(k) is not None},
    )


@dataclass(frozen=True)
class ServeRow:
    """One measured serving case and its estimates (by allocator model)."""

    record: dict[str, Any]
    estimates: dict[str, dict[str, Any]]  # allocator model -> ServeMemory.to_dict()

    def error(self, model: str, metric: str) -> float:
        measured = self.record[metric]
        return (self.estimates[model][metric] - measured) / measured


def compare_serve_records(
    records: list[dict[str, Any]], allocator_models: tuple[str, ...] = ALLOCATOR_MODELS
) -> list[ServeRow]:
    """Every ok serving record estimated with each of ``allocator_models``."""
    rows = []
    for record in records:
        if record.get("kind") != "serve" or record.get("status") != "ok":
            continue
        plan = _measured_plan(record)
        model = prepare_serving(plan)
        estimates = {m: serve_memory(model, plan, None, m).to_dict() for m in allocator_models}
        rows.append(ServeRow(record, estimates))
    return rows


def _measured_plan(record: dict[str, Any]) -> ServePlan:
    """The plan a record measured: one merged copy where the harness ran one of several."""
    plan = serve_plan_of(record)
    if record.get("measured_model_copies", 1) < plan.model_copies:
        plan = plan.one_copy()  # the record is one merged copy of the plan's (serve_limits)
    return plan


def compare_serve_speed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every ok serving record with a measured speed: its prefill and decode tokens/s, and
    ``estimate_serve_speed``'s on the record's GPU (``gpu_name``, from the catalog), with
    the relative error of each (``<metric>_error``)."""
    cal = load_throughput_calibration()
    rows = []
    for record in records:
        if record.get("kind") != "serve" or record.get("status") != "ok":
            continue
        if not all(record.get(m) for m in SPEED_METRICS):
            continue
        plan = _measured_plan(record)
        speed = estimate_serve_speed(
            prepare_serving(plan), plan, find_gpu(str(record.get("gpu_name") or "")), cal
        ).to_dict()
        row = {"record": record, "estimate": speed}
        for metric in SPEED_METRICS:
            row[f"{metric}_error"] = (speed[metric] - record[metric]) / record[metric]
        rows.append(row)
    return rows


def speed_markdown(rows: list[dict[str, Any]], sources: list[str]) -> str:
    """The speed comparison as Markdown: median and max absolute error of each metric, then
    every record."""
    lines = [
        "# Serving speed: estimates vs measurements",
        "",
        f"Measurements: {len(rows)} ok serving records from {', '.join(sources)}.",
        "Errors are (estimate - measured) / measured. Measured: the harness's medians over its "
        "timed rounds (prefill: batch x prompt tokens over a max_new_tokens=1 generate; decode: "
        "(new tokens - 1) x batch over the rest of a full generate). Estimated: "
        "serving/serve_speed.py on the record's GPU (roofline with the training path's fitted "
        "constants, data/throughput_calibration.json; no constant is fitted to these records).",
        "",
        "| metric | median abs | max abs | median signed |",
        "|---|---:|---:|---:|",
    ]
    for metric in SPEED_METRICS:
        errors = [r[f"{metric}_error"] for r in rows]
        if errors:
            lines.append(
                f"| {metric} | {100 * _median([abs(e) for e in errors]):.1f} % | "
                f"{100 * max(abs(e) for e in errors):.1f} % | {100 * _median(errors):+.1f} % |"
            )
    lines += [
        "",
        "| case | model | quant | mode | cache | batch x prompt+new | prefill tok/s measured | "
        "estimated | decode tok/s measured | estimated |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        r, e = row["record"], row["estimate"]
        lines.append(
            f"| {r['case_id']} | {r['model']} | {r['quant']} | "
            f"{r['mode']}{' dora' if r.get('dora') else ''} x{r['adapters']} | {r['cache']} | "
            f"{r['batch']} x {r['prompt_tokens']}+{r['new_tokens']} | "
            f"{r['prefill_tokens_per_second']:,.0f} | {e['prefill_tokens_per_second']:,.0f} "
            f"({100 * row['prefill_tokens_per_second_error']:+.0f} %) | "
            f"{r['decode_tokens_per_second']:,.0f} | {e['decode_tokens_per_second']:,.0f} "
            f"({100 * row['decode_tokens_per_second_error']:+.0f} %) |"
        )
    return "\n".join(lines) + "\n"


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def markdown(rows: list[ServeRow], sources: list[str]) -> str:
    """The comparison as a Markdown table: the error of each metric, before (approximate)
    and after (simulated)."""
    lines = [
        "# Serving memory: estimates vs measurements",
        "",
        f"Measurements: {len(rows)} ok serving records from {', '.join(sources)}.",
        "Errors are (estimate - measured) / measured; approximate = the rules and the "
        "calibrated slack, simulated = generate traced on fake tensors and replayed through the "
        "caching-allocator model. device_total adds the calibrated CUDA context and driver "
        "reserve to peak reserved; both were measured on the H200 (driver reserve 615 MiB, "
        "context and modules 764 MiB, +66 MiB int8), and the H100 records show a smaller "
        "driver reserve (480 MiB, their driver_reserved_bytes) and context: the simulated "
        "device_total errors are those constants, not the simulation.",
        "",
        "| metric | approximate: median abs / max abs | simulated: median abs / max abs |",
        "|---|---:|---:|",
        *[
            f"| {metric} | "
            + " | ".join(
                f"{100 * _median([abs(r.error(m, metric)) for r in rows]):.2f} % / "
                f"{100 * max(abs(r.error(m, metric)) for r in rows):.2f} %"
                for m in ALLOCATOR_MODELS
            )
            + " |"
            for metric in METRICS
            if rows
        ],
        "",
        "| case | quant | mode | cache | batch x prompt+new | metric | measured | approximate "
        "| simulated |",
        "|---|---|---|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        r = row.record
        for metric in METRICS:
            lines.append(
                f"| {r['case_id']} | {r['quant']} | {r['mode']}{' dora' if r.get('dora') else ''}"
                f" x{r['adapters']} | {r['cache']} | {r['batch']} x {r['prompt_tokens']}+"
                f"{r['new_tokens']} | {metric} | {r[metric]:,} | "
                f"{100 * row.error('approximate', metric):+.2f} % | "
                f"{100 * row.error('simulate', metric):+.2f} % |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m vramcalc.serving.servecompare",
        description="Serving records (JSONL from the harness) against vramcalc serve's "
        "estimates, approximate and simulated, as the Markdown of reports/serve_memory.md.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="harness serving records")
    parser.add_argument(
        "--speed", action="store_true", help="compare prefill and decode tokens/s instead"
    )
    args = parser.parse_args(argv)
    paths = args.files
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    records = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line]
    sources = [Path(p).name for p in paths]
    if args.speed:
        print(speed_markdown(compare_serve_speed(records), sources), end="")
        return
    print(markdown(compare_serve_records(records), sources), end="")


if __name__ == "__main__":
    main(sys.argv[1:])
