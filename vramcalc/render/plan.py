"""The ``vramcalc plan`` report: memory by component, the GPUs it fits with their speed, the run's cost."""

from __future__ import annotations

from collections.abc import Sequence

from vramcalc.budget import DEFAULT_HEADROOM
from vramcalc.estimate import MemoryEstimate
from vramcalc.planner import GpuFit, Hint, PlanResult
from vramcalc.render.files import render_file_plan
from vramcalc.render.tables import (
    COMPONENT_LABELS,
    format_duration,
    gib,
    headroom_note,
    key_values,
    margin,
    plan_heading,
    table,
)
from vramcalc.speed.cost import CostTable
from vramcalc.speed.links import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER
from vramcalc.speed.throughput import (
    MULTI_GPU_CASES,
    ThroughputEstimate,
    compute_dtype,
    transfer_note,
)


def render_plan_result(result: PlanResult, all_gpus: bool = False, verbose: bool = False) -> str:
    """The ``vramcalc plan`` report: memory, the GPUs it fits with their speed, run cost.

    Without ``all_gpus`` only the fitting GPUs are listed (smallest memory first) with a
    count of the others; ``verbose`` adds each rule, price source and efficiency source.
    """
    parts = [render_file_plan(result.source)] if result.source else []
    parts.append(render_memory(result.memory, verbose))
    if result.fits:
        parts.append(render_gpu_fits(result.fits, all_gpus, verbose, result.headroom))
    parts += [render_hint(hint) for hint in result.hints]
    if result.cost is not None:
        parts.append(render_cost(result.cost, verbose))
    return "\n\n".join(parts)


def render_hint(hint: Hint) -> str:
    return (
        f"hint: activations are {100 * hint.activations_share:.0f} % of the total; "
        f"{hint.option} brings the device total from {gib(hint.device_total_bytes)} to "
        f"{gib(hint.device_total_bytes_with_option)} (one more forward per step)"
    )


#: rows the memory table always shows: what lives only for a moment of the step, so that a
#: reader sees them at 0 rather than wonders where they went (``MOMENT_NOTE`` says why)
MOMENTARY = ("logits", "transient")
MOMENT_NOTE = (
    "components: what is alive at that moment; logits + loss (the head's output, the loss, "
    "their gradients) live from the head to the loss's backward, step temporaries (a layer's "
    "intermediate results, dequantized weights, the optimizer's scratch) inside one pass"
)


def render_memory(estimate: MemoryEstimate, verbose: bool = False) -> str:
    """The memory part of the ``vramcalc plan`` report."""
    plan, total = estimate.plan, estimate.device_total_bytes
    rows = [
        [COMPONENT_LABELS.get(name, name), gib(nbytes), f"{100 * nbytes / total:.1f} %"]
        for name, nbytes in estimate.components.items()
        if nbytes or name in MOMENTARY
    ]
    per_gpu = (
        f", per GPU; {gib(estimate.total_device_bytes_all_gpus)} on {plan.num_gpus} GPUs"
        if plan.num_gpus > 1
        else ""
    )
    totals = [
        ["peak allocated", gib(estimate.peak_allocated_bytes), "torch max_memory_allocated"],
        ["peak reserved", gib(estimate.peak_reserved_bytes), "torch max_memory_reserved"],
        ["device total", gib(total), "nvidia-smi; what the GPU must hold" + per_gpu],
    ]
    lines = [
        plan_heading(estimate.model_name, plan)
        + f", seq {plan.seq_len} x batch {plan.batch_size}, gradient checkpointing "
        + ("on" if plan.gradient_checkpointing else "off"),
        f"parameters: {estimate.total_params:,} total, {estimate.trainable_params:,} trainable "
        f"({100 * estimate.trainable_params / max(estimate.total_params, 1):.3f} %)",
        "",
        table(rows, ["component", "memory", "share"], [False, True, True]),
        "",
        table(totals, ["total", "memory", "compare with"], [False, True, False]),
        f"peak falls at: {peak_moment(estimate)}",
        MOMENT_NOTE,
        "",
        "assumptions:",
        *[f"  - {a}" for a in estimate.assumptions],
    ]
    if verbose:
        lines += ["", render_rules_comparison(estimate)]
        lines += ["", "rules and sources:", *[f"  {k}: {v}" for k, v in estimate.rules.items()]]
    return "\n".join(lines)


def peak_moment(estimate: MemoryEstimate) -> str:
    """Where the peak falls: in the simulated run, else where the rules put it."""
    if estimate.simulated_peak_phase:
        return f"{estimate.simulated_peak_phase} of the simulated run (loading, 3 steps)"
    return f"{estimate.peak_phase.replace('_', ' ')} (by the rules)"


def render_rules_comparison(estimate: MemoryEstimate) -> str:
    """``plan --verbose``: the allocated components as the per-component rules count them at
    their peak phase, beside the breakdown shown (the simulated run's, where simulated)."""
    rules, shown = estimate.rules_components, estimate.components
    where = estimate.peak_phase.replace("_", " ")
    if estimate.peak_allocated_bytes == sum(rules.values()) and not estimate.simulated_peak_phase:
        return f"components: the per-component rules at their peak ({where}); no simulation"
    names = [n for n in rules if rules[n] or shown.get(n) or n in MOMENTARY]
    rows = [
        [
            COMPONENT_LABELS.get(name, name),
            gib(rules[name]),
            gib(shown.get(name, 0)),
            margin(shown.get(name, 0) - rules[name]),
        ]
        for name in names
    ]
    rules_total = sum(rules.values())
    rows.append(
        [
            "peak allocated",
            gib(rules_total),
            gib(estimate.peak_allocated_bytes),
            margin(estimate.peak_allocated_bytes - rules_total),
        ]
    )
    if estimate.simulated_peak_phase:
        heads = ["component", f"rules ({where})", "simulated", "difference"]
        note = (
            f"the per-component rules at their peak ({where}) against the simulated run at "
            f"its peak ({estimate.simulated_peak_phase}), whose bytes the report shows"
        )
    else:
        heads = ["component", f"rules ({where})", "shown", "difference"]
        note = (
            "the per-component rules against the breakdown shown: the simulated peak, its "
            "difference to the rules spread over what they approximate (activations, logits, "
            "temporaries, gathered weights, communication buffers)"
        )
    return "\n".join(
        ["rules against the simulation:", table(rows, heads, [False, True, True, True]), note]
    )


def _fits_cell(fit: GpuFit) -> str:
    return "no bf16" if fit.blocker else ("yes" if fit.fits else "no")


def render_gpu_fits(
    fits: Sequence[GpuFit],
    all_gpus: bool = False,
    verbose: bool = False,
    headroom: float = DEFAULT_HEADROOM,
) -> str:
    """GPUs by memory, smallest first: the fitting ones (every one with ``all_gpus``)."""
    ordered = sorted(fits, key=lambda f: (f.gpu.memory_bytes, f.gpu.name))
    shown = ordered if all_gpus else [f for f in ordered if f.fits]
    num_gpus = max((f.throughput.plan.num_gpus for f in fits if f.throughput), default=1)
    rows, notes = [], []
    for fit in shown:
        speed = fit.throughput
        rows.append(
            [
                fit.gpu.name,
                gib(fit.gpu.memory_bytes),
                _fits_cell(fit),
                margin(fit.headroom_bytes),
                *tokens_cells(speed, num_gpus),
                f"{speed.step_seconds:.2f}" if speed else "-",
                f"{100 * speed.mfu:.0f} %" if speed else "-",
                speed_basis(speed),
            ]
        )
        if fit.blocker:
            notes.append(f"  {fit.gpu.name}: {fit.blocker}")
        elif speed is None:
            notes.append(f"  {fit.gpu.name}: speed '-': {fit.throughput_error}")
    lines = []
    if rows:
        heads = ["GPU", "memory", "fits", "margin", *tokens_heads(num_gpus), "step s", "MFU"]
        numeric = [False, True, False, True] + [True] * (len(heads) - 4)
        lines.append(table(rows, [*heads, "bound"], [*numeric, False]))
        lines.append(headroom_note(headroom))
    hidden = [f for f in ordered if f not in shown]
    if not any(f.fits for f in ordered):
        largest = ordered[-1]
        lines.append(
            f"fits no GPU of the {'list' if all_gpus else 'catalog'}: the largest, "
            f"{largest.gpu.name} ({gib(largest.gpu.memory_bytes)}), is "
            f"{margin(-largest.headroom_bytes)} short of its budget"
            if largest.headroom_bytes < 0
            else f"fits no GPU of the {'list' if all_gpus else 'catalog'} (see the notes)"
        )
    too_small = [f for f in hidden if f.headroom_bytes < 0]
    blocked = [f.gpu.name for f in hidden if f.blocker and f.headroom_bytes >= 0]
    if too_small:
        lines.append(
            f"{len(too_small)} more GPU{'s' if len(too_small) > 1 else ''} of the catalog "
            "do not fit (--all-gpus lists every GPU)"
        )
    if blocked:
        lines.append(
            f"{', '.join(blocked)} would hold it but {'have' if len(blocked) > 1 else 'has'} "
            "no bf16 tensor cores for the recipe's Trainer(bf16=True); --dtype fp16 plans "
            "fp16 autocast for them"
        )
    lines += notes
    speeds = [f.throughput for f in shown if f.throughput]
    lines += speed_note(speeds)
    lines += communication_table(speeds)
    if speeds and verbose:
        lines += ["", render_throughput(speeds[0])]
    return "\n".join(lines)


def tokens_heads(num_gpus: int) -> list[str]:
    """tokens/s column heads: per GPU, and for all GPUs of a multi-GPU plan."""
    return ["tokens/s"] if num_gpus == 1 else ["tokens/s/GPU", f"tokens/s x{num_gpus}"]


def tokens_cells(e: ThroughputEstimate | None, num_gpus: int) -> list[str]:
    if e is None:
        return ["-"] * len(tokens_heads(num_gpus))
    cells = [f"{e.tokens_per_second:,.0f}"]
    return cells if num_gpus == 1 else [*cells, f"{e.tokens_per_second_all_gpus:,.0f}"]


def speed_basis(e: ThroughputEstimate | None) -> str:
    """What bounds the step, and ``*`` where no measurement backs the GPU (``speed_note``)."""
    if e is None:
        return "-"
    return e.bound + ("" if e.measured else "*")


def speed_note(estimates: Sequence[ThroughputEstimate]) -> list[str]:
    """The lines under a speed table: where the constants were measured; ``*`` rows."""
    if not estimates:
        return []
    lines = [f"speed: {transfer_note(estimates[0].calibration)}"]
    first = estimates[0]
    if first.multi_gpu:
        lines.append(
            f"  * {first.plan.num_gpus} GPUs: each GPU's step plus the collectives between them "
            "(over each GPU's link in data/gpus.csv) that its compute cannot hide; no "
            f"multi-GPU speed is measured yet ({MULTI_GPU_CASES} will measure it)"
        )
        return lines
    unmeasured = [e.gpu.name for e in estimates if not e.measured]
    if unmeasured and first.calibration.fitted:
        lines.append(
            "  * no measurement backs " + ", ".join(unmeasured) + ": speed derived from "
            f"{first.calibration.measured_on_text} (plan --verbose says how)"
        )
    return lines


def communication_table(estimates: Sequence[ThroughputEstimate]) -> list[str]:
    """A multi-GPU plan's collectives on each GPU's link: their seconds per step, what the
    compute leaves exposed and its share of the step, with the link, where its bus bandwidth
    comes from and the rule that counted the bytes."""
    priced = [(e, e.communication) for e in estimates if e.communication is not None]
    if not priced:
        return []
    rows = [
        [
            e.gpu.name,
            c.link.name,
            f"{c.link.bus_gbps:,.0f}",
            f"{c.total_seconds:.3f}",
            f"{c.exposed_seconds:.3f}",
            f"{100 * c.exposed_share(e.step_seconds):.1f} %",
        ]
        for e, c in priced
    ]
    derivations: dict[str, list[str]] = {}
    for e, c in priced:
        derivations.setdefault(c.link.derivation, []).append(e.gpu.name)
    priors = sorted({f"{k} ({cite})" for _, c in priced for k, cite in c.link.priors})
    first, comm = priced[0]
    heads = ["GPU", "link", "bus GB/s", "collectives s", "exposed s", "of step"]
    return [
        "",
        f"communication per optimizer step, {first.plan.num_gpus} GPUs (modeled, not measured):",
        table(rows, heads, [False, False, True, True, True, True]),
        f"  collectives: {comm.volume.rule}; seconds: NCCL's ring at the bus bandwidth after "
        "NCCL's latency; exposed: what one micro-batch's forward and backward cannot hide",
        "  bus GB/s: "
        + "; ".join(f"{', '.join(names)}: {how}" for how, names in derivations.items()),
        "  priors (data/calibration.json): " + "; ".join(priors),
    ]


def render_throughput(estimate: ThroughputEstimate) -> str:
    """How one GPU's step time is made (``plan --verbose``, for the smallest fitting GPU)."""
    e, s, w, c = estimate, estimate.seconds, estimate.work.step, estimate.calibration
    all_gpus = (
        f", {e.tokens_per_second_all_gpus:,.0f} on {e.plan.num_gpus} GPUs"
        if e.plan.num_gpus > 1
        else ""
    )
    waits = ", ".join(f"{k} {v:.3f} s" for k, v in s.items())
    rows = [
        [
            "step time",
            f"{e.step_seconds:.3f} s ({e.plan.grad_accum} micro-batch(es)), bound by {e.bound}: "
            f"waits on {waits}",
        ],
        ["tokens/s", f"{e.tokens_per_second:,.0f} per GPU{all_gpus}"],
        ["MFU", f"{100 * e.mfu:.1f} % (model FLOPs, no recompute; HFU {100 * e.hfu:.1f} %)"],
        [
            "work / step",
            f"{w.matmul_flops:.3e} matmul FLOPs, {w.memory_bytes / 1e9:,.1f} GB moved, "
            f"{w.kernels:,.0f} kernels, {w.total('dispatches'):,.0f} dispatches "
            f"({w.total('python_calls'):,.0f} from Python), {w.syncs:,.0f} syncs",
        ],
        [
            "all GPU / host",
            f"{e.time.gpu_seconds:.3f} s / {e.time.host_seconds:.3f} s (overlapped between syncs)",
        ],
        [
            "constants",
            f"matmul {c.compute_efficiency:.2f} and attention {c.attention_efficiency:.2f} of peak, "
            f"{c.bandwidth_efficiency:.2f} of bandwidth, {1e6 * c.kernel_seconds:.1f} us a kernel; "
            f"host {1e6 * c.python_call_seconds:.1f} us a Python call + "
            f"{1e6 * c.dispatch_seconds:.1f} us a dispatch, {1e3 * c.step_overhead_seconds:.1f} ms "
            f"a step; measured on: {c.measured_on_text}",
        ],
        ["derived", e.derivation],
        *communication_rows(e),
    ]
    head = (
        f"throughput on {e.gpu.name} ({e.peak_tflops:g} {compute_dtype(e.plan)} TFLOP/s, "
        f"{e.gpu.memory_bandwidth_gbps:g} GB/s)"
    )
    body = key_values(rows)
    return head + "\n" + "\n".join("  " + line for line in body.splitlines())


def communication_rows(e: ThroughputEstimate) -> list[list[str]]:
    """How a multi-GPU step's collectives are counted and priced (``plan --verbose``)."""
    c = e.communication
    if c is None:
        return []
    v, gb = c.volume, 1e9
    moved = ", ".join(
        (
            f"{v.bytes_per_step(kind) / gb:,.2f} GB"
            if v.bytes_per_step(kind) >= gb / 100
            else f"{v.bytes_per_step(kind):,} B"
        )
        + f" {kind.replace('_', '-')}"
        for kind in (ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE)
        if v.bytes_per_step(kind)
    )
    count = sum(x.per_step(e.plan.grad_accum) for x in v.collectives)
    return [
        ["link", f"{c.link.name}: {c.link.derivation}"],
        ["collectives", f"{v.rule}; per step {count:,} collectives, {moved}"],
        [
            "communication",
            f"{c.total_seconds:.3f} s per step, {c.exposed_seconds:.3f} s of it exposed "
            f"(forward {c.exposed['forward']:.3f}, backward {c.exposed['backward']:.3f}, after "
            f"backward {c.exposed['step']:.3f}); hidden behind one micro-batch's forward "
            f"{c.phase_seconds['forward']:.3f} s and backward {c.phase_seconds['backward']:.3f} s",
        ],
        ["measured", f"no: no multi-GPU speed measurement yet ({MULTI_GPU_CASES})"],
    ]


def render_cost(cost: CostTable, verbose: bool = False) -> str:
    """The run-cost block: one line per GPU type (sources with ``verbose``, always in JSON)."""
    lines = [f"run: {cost.run.describe(cost.plan)}"]
    if not cost.rows and not cost.skipped:
        return lines[0] + "\nrun cost: no GPU of the list fits"
    rows, notes = [], []
    num_gpus = cost.plan.num_gpus
    for row in sorted(cost.rows, key=lambda r: (r.throughput.gpu.memory_bytes, r.gpu_name)):
        unpriced = row.price_per_hour_usd is None
        rows.append(
            [
                row.gpu_name,
                *tokens_cells(row.throughput, num_gpus),
                f"{row.throughput.step_seconds:.2f}",
                f"{100 * row.throughput.mfu:.0f} %",
                speed_basis(row.throughput),
                format_duration(row.wall_seconds),
                f"{row.gpu_hours:,.2f}",
                "-" if unpriced else f"{row.price_per_hour_usd:.2f}",
                "-" if row.cost_usd is None else f"{row.cost_usd:,.2f}",
            ]
        )
        if unpriced:
            notes.append(f"  {row.gpu_name}: cost '-': {row.price_source}")
    heads = ["GPU", *tokens_heads(num_gpus), "step s", "MFU", "bound", "wall time"]
    heads += ["GPU-hours", "$/GPU-h", "cost $"]
    for name, reason in cost.skipped:
        rows.append([name] + ["-"] * (len(heads) - 1))
        notes.append(f"  {name}: not priced: {reason}")
    numeric = [h not in ("GPU", "bound") for h in heads]
    lines += [table(rows, heads, numeric), *notes]
    speeds = [row.throughput for row in cost.rows]
    if verbose:
        lines += [f"  price {row.gpu_name}: {row.price_source}" for row in cost.rows]
        lines += ["  " + line for line in speed_note(speeds)]
    elif num_gpus > 1 and speeds:
        lines += speed_note(speeds)[1:]  # the multi-GPU line
    return "\n".join(lines)
