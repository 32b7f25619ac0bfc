"""Simulated-world records against the world trace (the estimator) and the rules (its fallback): ``python -m vramcalc.worldcompare``.

For every ok record of a simulated world (``simulated_world_size``; by default
``data/measurements/h100_world_2026-12-06.jsonl``, ``h100_world2_2026-12-06.jsonl``,
``h100_zero_2026-12-06.jsonl``, ``h100_zerohold_2026-12-06.jsonl``,
``h100_zeroint8_2026-12-06.jsonl``, ``h100_zeroint8trace_2026-12-06.jsonl`` and
``h100_zeroint8hold_2026-12-06.jsonl``): the measured peak allocated, peak reserved and device
total; the rules' estimate (``prepare(...).estimate(plan, "approximate")``:
``memory/distributed.py`` + the calibrated slack, without NCCL's buffers); and the world
trace (``memory/worldsim.py``, what the estimator answers a multi-GPU FSDP1 / DDP / ZeRO
plan with; the rules where it does not simulate, ``world_simulated`` False): its peaks, and
the device total composed as the estimator composes it (peak reserved + CUDA context +
driver reserve) with no NCCL term, since a fake world has no NCCL communicator. Summaries
per split and per group; writes ``reports/world_memory.md`` and ``.csv``. The world
simulations are cached, so a second run takes seconds; the first traces every plan (FSDP
and DDP: 5 layers, unrolled, under a minute each for 7-8B models on 2 CPU cores; ZeRO:
every layer, 4-45 s for 1-8B models).
``--fsdp2`` adds torch's FSDPMemTracker on an FSDP2 stand-in (``memory/fsdp2check.py``)
for the N = 2 FSDP records.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path
from typing import Any

from vramcalc.catalog import resolve_model
from vramcalc.collector import tune
from vramcalc.estimate import prepare
from vramcalc.measurements import MEASUREMENTS_DIR, plan_of
from vramcalc.memory.layers import NO_SDPA
from vramcalc.memory.nccl import nccl_buffer_bytes
from vramcalc.memory.overhead import load_calibration
from vramcalc.memory.worldsim import simulate_world, simulates_world, world_device_total_bytes
from vramcalc.trace.fsdp2check import fsdp2_tracker_peak

DEFAULT_RECORDS = (
    MEASUREMENTS_DIR / "h100_world_2026-12-06.jsonl",
    MEASUREMENTS_DIR / "h100_world2_2026-12-06.jsonl",
    MEASUREMENTS_DIR / "h100_zero_2026-12-06.jsonl",
    MEASUREMENTS_DIR / "h100_zerohold_2026-12-06.jsonl",
    MEASUREMENTS_DIR / "h100_zeroint8_2026-12-06.jsonl",
    MEASUREMENTS_DIR / "h100_zeroint8trace_2026-12-06.jsonl",
    MEASUREMENTS_DIR / "h100_zeroint8hold_2026-12-06.jsonl",
)
METRICS = ("peak_allocated_bytes", "peak_reserved_bytes", "device_total_bytes")
SHORT = {
    "meta-llama/Llama-3.1-8B": "8B",
    "mistralai/Mistral-7B-v0.1": "Mistral-7B",
    "meta-llama/Llama-3.2-1B": "1B",
    "Qwen/Qwen2.5-1.5B": "Qwen-1.5B",
}


def group_of(record: dict[str, Any]) -> str:
    """The issue's groups: model and method under FSDP, offload, grad-op, full FSDP, DDP;
    ZeRO by stage and method (an int8 base named: "ZeRO-3 int8 LoRA")."""
    model = SHORT.get(record["model"], record["model"])
    method = {"lora": "LoRA", "qlora": "QLoRA", "full": "full"}.get(
        record["method"], record["method"]
    )
    if record.get("quant") == "int8":  # QLoRA names its 4-bit base; LoRA on int8 says so
        method = f"int8 {method}"
    if record["strategy"] == "ddp":
        return "DDP"
    if record["strategy"].startswith("zero"):
        stage = record["strategy"].removeprefix("zero")
        return f"ZeRO-{stage} {method}" + (" + CPU offload" if record.get("cpu_offload") else "")
    if record.get("cpu_offload"):
        return "FSDP + CPU offload"
    if record["strategy"] == "fsdp-grad-op":
        return "fsdp-grad-op"
    if record["method"] == "full":
        return "full fine-tuning, FSDP"
    return f"{model} {method}, FSDP"


def compare_record(record: dict[str, Any]) -> dict[str, Any]:
    """One record: measured, rules (today's estimator) and world trace figures."""

    plan = plan_of(record)
    spec = resolve_model(plan.model)
    rules = prepare(plan.model, plan).estimate(plan, "approximate")
    # a simulated world has no NCCL communicator: the rules' device total without it
    ruled = {
        metric: int(getattr(rules, metric))
        - (rules.components["nccl"] if metric == METRICS[2] else 0)
        for metric in METRICS
    }
    simulated = simulates_world(plan)
    world, seconds = dict(ruled), 0.0  # what the estimator answers where it does not simulate
    if simulated:
        simulation = simulate_world(spec.config_dict, plan)
        eager = plan.attn == "eager" or spec.config_dict.get("model_type") in NO_SDPA
        total = world_device_total_bytes(
            simulation, plan, load_calibration(), eager_attention=eager, simulated_world=True
        )
        world = {
            "peak_allocated_bytes": simulation.peak_allocated_bytes[plan.allocator],
            "peak_reserved_bytes": simulation.peak_reserved_bytes[plan.allocator],
            "device_total_bytes": total["device_total"],
        }
        seconds = simulation.trace_seconds
    row: dict[str, Any] = {
        "case_id": record["case_id"],
        "split": record["split"],
        "group": group_of(record),
        "model": plan.model,
        "method": plan.method,
        "strategy": plan.strategy,
        "num_gpus": plan.num_gpus,
        "cpu_offload": plan.cpu_offload,
        "world_simulated": simulated,
        "trace_seconds": round(seconds, 1),
        "nccl_rule_bytes": nccl_buffer_bytes(plan.num_gpus),
    }
    for metric in METRICS:
        measured = int(record[metric])
        row[f"measured_{metric}"] = measured
        row[f"rules_{metric}"] = ruled[metric]
        row[f"world_{metric}"] = int(world[metric])
        row[f"rules_error_{metric}"] = ruled[metric] / measured - 1
        row[f"world_error_{metric}"] = world[metric] / measured - 1
    return row


def summarize(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Median / p90 / max |error| and the worst under-estimate (positive) of ``key``."""
    errors = [r[key] for r in rows]
    if not errors:
        return {"n": 0}
    absolute = sorted(abs(e) for e in errors)
    p90 = absolute[min(len(absolute) - 1, int(round(0.9 * (len(absolute) - 1))))]
    return {
        "n": len(errors),
        "median_abs": statistics.median(absolute),
        "p90_abs": p90,
        "max_abs": absolute[-1],
        "worst_under": max(0.0, -min(errors)),
    }


def _pct(value: float) -> str:
    return f"{100 * value:+.1f} %"


def render_markdown(
    rows: list[dict[str, Any]],
    fsdp2: dict[str, Any] | None = None,
    sources: tuple[str, ...] = tuple(str(p) for p in DEFAULT_RECORDS),
) -> str:
    named = ", ".join(f"`data/measurements/{Path(source).name}`" for source in sources)
    lines = [
        "# Multi-GPU per-GPU memory: the simulated world (the estimator) vs the rules (its fallback)",
        "",
        "Records: rank 0 of an N-GPU world on torch's fake process group, measured on one "
        f"H100 ({named}). Error = (estimate − measured) "
        "/ measured. *rules*: the estimator's fallback (`--allocator-model approximate`: "
        "`memory/distributed.py`, calibrated slack), its device total without NCCL's buffers. "
        "*world*: `memory/worldsim.simulate_world` (what the estimator now answers with) "
        "(rank 0 traced through FSDP1, DDP or DeepSpeed's own ZeRO code on fake tensors, "
        "replayed through the caching allocator model; a row the world does not simulate "
        "would say so); its device total = peak reserved + CUDA context + driver reserve "
        "(calibration), **without NCCL** (a fake world has none; for a real N-GPU run "
        "`memory/nccl.py` adds its buffers by rule, not measured yet).",
        "",
    ]
    for split in ("calibration", "validation"):
        part = [r for r in rows if r["split"] == split]
        lines += [f"## {split} ({len(part)} records)", ""]
        lines += [
            "| metric | rules median / p90 / max / worst under | world median / p90 / max / worst under |",
            "|---|---|---|",
        ]
        for metric in ("device_total_bytes", "peak_reserved_bytes", "peak_allocated_bytes"):
            cells = []
            for who in ("rules", "world"):
                s = summarize(part, f"{who}_error_{metric}")
                cells.append(
                    " / ".join(
                        f"{100 * s[k]:.2f} %"
                        for k in ("median_abs", "p90_abs", "max_abs", "worst_under")
                    )
                    if s["n"]
                    else "–"
                )
            lines.append(f"| {metric} | {cells[0]} | {cells[1]} |")
        lines.append("")
    lines += [
        "## By record",
        "",
        "| split | group | model | N | device total: rules → world | peak reserved: rules → world | peak allocated: rules → world |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["group"], r["model"], r["num_gpus"])):
        mark = "" if r.get("world_simulated", True) else " (rules: not simulated)"
        cells = [
            f"{_pct(r[f'rules_error_{m}'])} → {_pct(r[f'world_error_{m}'])}{mark}"
            for m in ("device_total_bytes", "peak_reserved_bytes", "peak_allocated_bytes")
        ]
        lines.append(
            f"| {r['split'][:3]} | {r['group']} | {SHORT.get(r['model'], r['model'])} | "
            f"{r['num_gpus']} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "## By group (device total, world)",
        "",
        "| group | n | errors |",
        "|---|---|---|",
    ]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for name, part in sorted(groups.items()):
        errors = ", ".join(
            f"{_pct(r['world_error_device_total_bytes'])} ({r['split'][:3]})"
            for r in sorted(part, key=lambda r: r["num_gpus"])
        )
        lines.append(f"| {name} | {len(part)} | {errors} |")
    if fsdp2:
        lines += [
            "",
            "## torch's FSDPMemTracker on an FSDP2 stand-in (N = 2 FSDP records)",
            "",
            "Live-tensor peak of `fully_shard` per decoder layer + root (no loading, no caching "
            "allocator, no cuBLAS workspace); a different wrapper from the measured FSDP1. On "
            "CPU fake tensors the tracker cannot tell host from device, so with CPU offload it "
            "counts the offloaded shards, gradients and optimizer states as well.",
            "",
            "| case | group | measured peak allocated | world (FSDP1 trace) | FSDP2 tracker |",
            "|---|---|---|---|---|",
        ]
        by_id = {r["case_id"]: r for r in rows}
        for case_id, peak in fsdp2.items():
            r = by_id[case_id]
            measured = r["measured_peak_allocated_bytes"]
            lines.append(
                f"| {case_id} | {r['group']} | {measured / 2**30:.2f} GiB | "
                f"{_pct(r['world_error_peak_allocated_bytes'])} | "
                + (f"{_pct(peak / measured - 1)}" if isinstance(peak, int) else str(peak))
                + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="*", default=[str(p) for p in DEFAULT_RECORDS])
    parser.add_argument("--out", default="reports/world_memory")
    parser.add_argument("--fsdp2", action="store_true", help="also run FSDPMemTracker (slow)")
    args = parser.parse_args(argv)
    tune()  # the collector's thresholds of a planning process (collector.py)
    records = [
        json.loads(line)
        for path in args.records
        for line in Path(path).read_text().splitlines()
        if line.strip()
    ]
    records = [r for r in records if r.get("simulated_world_size") and r.get("status") == "ok"]
    rows = []
    for record in records:
        rows.append(compare_record(record))
        print(
            f"{record['case_id']} {rows[-1]['group']}: device total "
            f"{_pct(rows[-1]['world_error_device_total_bytes'])}",
            flush=True,
        )
    fsdp2 = None
    if args.fsdp2:
        fsdp2 = _fsdp2_peaks([r for r in records if r["strategy"] != "ddp" and r["num_gpus"] == 2])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(render_markdown(rows, fsdp2, tuple(args.records)))
    with out.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _fsdp2_peaks(records: list[dict[str, Any]]) -> dict[str, Any]:

    peaks: dict[str, Any] = {}
    for record in records:
        plan = plan_of(record)
        try:
            peaks[record["case_id"]] = fsdp2_tracker_peak(
                resolve_model(plan.model).config_dict, plan
            ).peak_bytes
        except Exception as err:  # noqa: BLE001 - a comparison row, not an estimate
            peaks[record["case_id"]] = f"failed: {type(err).__name__}"
        print(f"fsdp2 {record['case_id']}: {peaks[record['case_id']]}", flush=True)
    return peaks


if __name__ == "__main__":
    main()
