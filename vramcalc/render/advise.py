"""Text for ``vramcalc advise``: the plan on the GPU, each change with its memory and speed
after it, and the cheapest combination that fits."""

from __future__ import annotations

from vramcalc.advice import Advice, Option
from vramcalc.render.tables import gib, table

# marks a multi-GPU speed: communication modeled, no multi-GPU measurement yet ("*" marks an
# approximate memory figure)
UNMEASURED = "~"


def _speed(option: Option) -> str:
    return f"{option.tokens_per_second:,.0f}" if option.tokens_per_second else "-"


def _speed_line(option: Option) -> str:
    """tokens/s over all GPUs, per GPU and MFU for several GPUs; ``~`` unmeasured."""
    if not option.tokens_per_second:
        return "- tokens/s"
    mfu = f"MFU {100 * option.mfu:.0f} %" if option.mfu is not None else ""
    if option.plan.num_gpus == 1:
        return f"{_speed(option)} tokens/s, {mfu}"
    return (
        f"{_speed(option)} tokens/s on {option.plan.num_gpus} GPUs{UNMEASURED} "
        f"({option.tokens_per_second_per_gpu:,.0f} per GPU, {mfu})"
    )


def _cells(option: Option) -> list[str]:
    """tokens/s per GPU, over all GPUs (``~``: a multi-GPU estimate, unmeasured), MFU."""
    if not option.tokens_per_second or option.tokens_per_second_per_gpu is None:
        return ["-", "-", "-"]
    star = UNMEASURED if option.plan.num_gpus > 1 else ""
    mfu = f"{100 * option.mfu:.0f} %" if option.mfu is not None else "-"
    return [f"{option.tokens_per_second_per_gpu:,.0f}", _speed(option) + star, mfu]


def render_advice(advice: Advice) -> str:
    base = advice.baseline
    verdict = "fits" if base.fits else "does not fit"
    lines = [
        f"{base.plan.model} on {advice.gpu.name} ({gib(advice.gpu.memory_bytes)}, "
        f"{advice.headroom:.0%} headroom: budget {gib(advice.budget_bytes)}): the plan needs "
        f"{gib(base.device_total_bytes)} and {verdict}; {_speed_line(base)}",
        "",
    ]
    if not advice.changes:
        lines.append("no change of the list saves memory on this plan.")
        return "\n".join(lines)
    rows = [
        [
            str(i),
            c.flags,
            c.description,
            c.cost,
            gib(c.option.device_total_bytes)
            + ("*" if c.option.allocator_model != "simulated" else ""),
            "yes" if c.option.fits else "no",
            *_cells(c.option),
            f"{c.speed_change:+.0%}" if c.speed_change is not None else "-",
        ]
        for i, c in enumerate(advice.changes, 1)
    ]
    headers = ["#", "change", "what it does", "costs", "memory after", "fits"]
    headers += ["tokens/s/GPU", "tokens/s all", "MFU", "speed"]
    numeric = [True, False, False, False, True, False, True, True, True, True]
    approximate = base.allocator_model != "simulated" or any(
        c.option.allocator_model != "simulated" for c in advice.changes
    )
    lines.append("changes, cheapest first (each alone; memory: each run simulated):")
    lines.append(table(rows, headers, numeric))
    if approximate:
        lines.append(
            "  * approximate: a calibrated fraction for the allocator's slack, not a simulated "
            "run (--allocator-model approximate)"
        )
    options = [base, *(c.option for c in advice.changes), *(c.option for c in advice.combinations)]
    if any(o.plan.num_gpus > 1 and o.tokens_per_second for o in options):
        lines.append(
            f"  {UNMEASURED} several GPUs: each GPU's step plus what the collectives between them "
            "leave exposed (communication modeled, not measured); speed: tokens/s over all GPUs"
        )
    if base.fits:
        lines += ["", "the plan fits with the headroom asked; the changes above only add room."]
    elif not advice.combinations:
        lines += ["", "nothing of the list makes it fit."]
    else:
        rows = [
            [
                str(i),
                " ".join(c.flags for c in combo.changes),
                combo.cost,
                gib(combo.option.device_total_bytes),
                *_cells(combo.option),
            ]
            for i, combo in enumerate(advice.combinations, 1)
        ]
        lines += [
            "",
            "combinations that fit, cheapest first (ranked by their dearest change):",
            table(
                rows,
                ["#", "changes", "costs", "memory", "tokens/s/GPU", "tokens/s all", "MFU"],
                [True, False, False, True, True, True, True],
            ),
        ]
    return "\n".join(lines)
