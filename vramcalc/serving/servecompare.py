"""Serving estimates against serving measurements (``kind: serve`` records): one row per ok
record, both allocator models, the relative error of each memory metric.

``python -m vramcalc.serving.servecompare data/measurements/h100_serve2_*.jsonl`` prints
the Markdown table (``reports/serve_memory.md``)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vramcalc.serve_plan import ServePlan, context_split, uniform_adapters
from vramcalc.serving.serve import prepare_serving
from vramcalc.serving.serve_planner import serve_memory

METRICS = ("peak_allocated_bytes", "peak_reserved_bytes", "device_total_bytes")
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
        plan = serve_plan_of(record)
        if record.get("measured_model_copies", 1) < plan.model_copies:
            plan = plan.one_copy()  # the record is one merged copy of the plan's (serve_limits)
        model = prepare_serving(plan)
        estimates = {m: serve_memory(model, plan, None, m).to_dict() for m in allocator_models}
        rows.append(ServeRow(record, estimates))
    return rows


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
    paths = parser.parse_args(argv).files
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    records = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line]
    rows = compare_serve_records(records)
    print(markdown(rows, [Path(p).name for p in paths]), end="")


if __name__ == "__main__":
    main(sys.argv[1:])
