"""``vramcalc check``'s text: one line per config, and the Markdown summary for a pull request."""

from __future__ import annotations

from vramcalc.checking import CheckResult
from vramcalc.render.tables import gib, margin, table


def _verdict(fits: bool, blocked: str | None) -> str:
    if blocked:
        return "CANNOT RUN"
    return "fits" if fits else "DOES NOT FIT"


def render_check(result: CheckResult) -> str:
    """One line per config: verdict, device total against the budget, margin (and the change
    against the baseline, when one was given); then the overall verdict."""
    changes = {c.path: c for c in result.changes}
    lines = []
    for p in result.plans:
        line = (
            f"{_verdict(p.fits, p.verdict.blocker):12}  {p.path}: "
            f"{gib(p.memory.device_total_bytes)} of {gib(p.verdict.budget_bytes)} on "
            f"{result.gpu.name}, margin {margin(p.verdict.margin_bytes)}"
        )
        if p.verdict.blocker:
            line += f" ({p.verdict.blocker})"
        change = changes.get(p.path)
        if change is not None:
            line += f"; {_change_text(change)}"
        if p.memory.allocator_model != "simulated":
            line += " [approximate]"
        lines.append(line)
    failing = sum(1 for p in result.plans if not p.fits)
    lines.append(
        f"{len(result.plans) - failing} of {len(result.plans)} configs fit {result.gpu.name} "
        f"with {result.headroom:.0%} headroom (budget: its memory less the headroom)"
    )
    return "\n".join(lines)


def _change_text(change) -> str:  # type: ignore[no-untyped-def]
    if change.change_bytes is None:
        return "new (not in the baseline)"
    sign = "+" if change.change_bytes >= 0 else "-"
    text = f"{sign}{gib(abs(change.change_bytes))} against the baseline"
    if change.change_fraction is not None:
        text += f" ({change.change_fraction:+.1%})"
    return text


def render_check_markdown(result: CheckResult) -> str:
    """The summary for a pull-request comment (or ``$GITHUB_STEP_SUMMARY``)."""
    changes = {c.path: c for c in result.changes}
    status = "✅ every config fits" if result.fits else "❌ a config does not fit"
    rows = []
    for p in result.plans:
        change = changes.get(p.path)
        rows.append(
            [
                _verdict(p.fits, p.verdict.blocker),
                f"`{p.path}`",
                gib(p.memory.device_total_bytes),
                gib(p.verdict.budget_bytes),
                margin(p.verdict.margin_bytes),
                _change_text(change) if change is not None else "",
            ]
        )
    heading = f"### vramcalc check: {status} on {result.gpu.name} ({result.headroom:.0%} headroom)"
    body = table(
        rows,
        ["verdict", "config", "device total", "budget", "margin", "vs baseline"],
        numeric=[False, False, True, True, True, False],
        markdown=True,
    )
    return f"{heading}\n\n{body}\n"
