"""Timeline plots: a simulated run's allocated and reserved bytes, and predicted vs measured.

Pure drawing (matplotlib, Agg) of what ``memory/timeline.py`` and ``memory/snapshot.py``
compute; ``vramcalc/timeline.py`` is the entry point that builds them.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from vramcalc.memory.snapshot import SnapshotSeries
from vramcalc.memory.timeline import (
    BACKWARD,
    FORWARD,
    LOAD,
    OPTIMIZER,
    PeakComposition,
    Timeline,
)

GIB = 2**30
PHASE_COLOURS = {LOAD: "#d9d9d9", FORWARD: "#d8ecd3", BACKWARD: "#f6d5d5", OPTIMIZER: "#e2d9f0"}
ALLOCATED_COLOUR, RESERVED_COLOUR = "#1f77b4", "#ff7f0e"


PHASE_NAMES = {LOAD: "loading", FORWARD: "forward", BACKWARD: "backward", OPTIMIZER: "optimizer"}


def _gib(nbytes: float) -> str:
    """Bytes in GiB, or MiB / KiB / B below one of each."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def composition_lines(peak: PeakComposition, top: int = 7) -> list[str]:
    """What is alive at a peak, one line per category (largest first, at most ``top``, none
    under 0.1 % of the total): categories held per decoder layer say how many layers and
    the largest one."""
    lines = []
    shown = [(c, b) for c, b in peak.by_category[:top] if b * 1000 >= peak.allocated_bytes]
    for category, nbytes in shown:
        layers = [(layer, b) for c, layer, b in peak.by_layer if c == category and layer >= 0]
        text = f"{category}: {_gib(nbytes)}"
        if layers:
            layer, largest = max(layers, key=lambda row: (row[1], -row[0]))
            text += (f" ({len(layers)} layer{'s' if len(layers) > 1 else ''}, up to "
                     f"{_gib(largest)} in layer {layer})")  # fmt: skip
        lines.append(text)
    rest = peak.allocated_bytes - sum(nbytes for _, nbytes in shown)
    if rest:
        lines.append(f"other: {_gib(rest)}")
    return lines


def _figure(width: float = 13.0, height: float = 6.5):  # type: ignore[no-untyped-def]
    matplotlib.use("Agg")  # no display: files only
    return plt.subplots(figsize=(width, height), dpi=110)


def render_timeline(timeline: Timeline, path: str | Path) -> Path:
    """Draw ``timeline`` to a PNG (or any format matplotlib writes by suffix)."""

    fig, ax = _figure()
    xs = range(len(timeline.allocated_bytes))
    allocated = [b / GIB for b in timeline.allocated_bytes]
    reserved = [b / GIB for b in timeline.reserved_bytes]
    top = max(reserved, default=1.0) * 1.12 or 1.0
    kinds_seen = []
    for phase in timeline.phases:
        colour = PHASE_COLOURS.get(phase.kind)
        if colour is not None:
            ax.axvspan(phase.start, phase.stop, color=colour, lw=0, zorder=0)
            if phase.kind not in kinds_seen:
                kinds_seen.append(phase.kind)
    steps = sorted({p.step for p in timeline.phases if p.step >= 0})
    for step in steps:
        start = min(p.start for p in timeline.phases if p.step == step)
        ax.axvline(start, color="#555555", lw=0.8, ls="--", zorder=1)
        ax.text(start, top * 0.985, f" step {step + 1}", va="top", ha="left", fontsize=9)
    ax.fill_between(xs, allocated, reserved, step="post", color=RESERVED_COLOUR, alpha=0.15,
                    lw=0, label="allocator slack (reserved - allocated)")  # fmt: skip
    ax.plot(xs, reserved, drawstyle="steps-post", color=RESERVED_COLOUR, lw=1.4, label="reserved")
    ax.plot(xs, allocated, drawstyle="steps-post", color=ALLOCATED_COLOUR, lw=1.0,
            label="allocated")  # fmt: skip
    peak_x, peak_y = timeline.peak_allocated_index, timeline.peak_allocated_bytes / GIB
    ax.plot([peak_x], [peak_y], "o", color=ALLOCATED_COLOUR, ms=6, zorder=5)
    box = [f"peak allocated {_gib(timeline.peak_allocated_bytes)} ({timeline.peak.phase}):",
           *(f"  {line}" for line in composition_lines(timeline.peak))]  # fmt: skip
    box.append(f"peak reserved {_gib(timeline.peak_reserved_bytes)}, slack "
               f"{_gib(timeline.peak_reserved_bytes - timeline.peak_allocated_bytes)}")  # fmt: skip
    right = peak_x > len(allocated) * 0.55
    ax.annotate("\n".join(box), xy=(peak_x, peak_y),
                xytext=(0.02 if right else 0.98, 0.80), textcoords="axes fraction",
                ha="left" if right else "right", va="top", fontsize=8.5, family="monospace",
                bbox={"boxstyle": "round", "fc": "white", "ec": "#999999", "alpha": 0.92},
                arrowprops={"arrowstyle": "->", "color": "#333333", "lw": 0.8}, zorder=6)  # fmt: skip
    ax.plot([timeline.peak_reserved_index], [timeline.peak_reserved_bytes / GIB], "v",
            color=RESERVED_COLOUR, ms=6, zorder=5)  # fmt: skip
    ax.set_xlim(0, max(len(allocated), 1))
    ax.set_ylim(0, top)
    ax.set_xlabel("allocator event (loading, then each step's allocations and frees, in order)")
    ax.set_ylabel("GiB")
    ax.set_title(timeline.title or "predicted memory timeline", fontsize=11)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color=PHASE_COLOURS[k], label=PHASE_NAMES[k]) for k in kinds_seen]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.1), ncol=7,
              fontsize=8.5, frameon=False)  # fmt: skip
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:  # type: ignore[no-untyped-def]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _signed(difference: int, reference: int) -> str:
    share = f" ({difference / reference:+.2%})" if reference else ""
    return ("+" if difference >= 0 else "-") + _gib(abs(difference)) + share


def aligned_positions(series: SnapshotSeries) -> tuple[list[float], list[str]] | None:
    """Each entry's position on a common axis: loading spans [0, 1), step k [k, k+1) (from the
    ``loaded`` and ``step_end`` markers), entries after the last step dropped; with the
    segment labels. None without those markers."""
    ends = [i for label, i in series.markers if label == "step_end"]
    loaded = next((i for label, i in series.markers if label == "loaded"), None)
    if loaded is None or not ends:
        return None
    bounds = [0, loaded, *ends]
    xs: list[float] = []
    for k, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        width = max(hi - lo, 1)
        xs.extend(k + (i - lo) / width for i in range(lo, hi))
    labels = ["loading", *(f"step {k}" for k in range(1, len(ends) + 1))]
    return xs, labels


def render_comparison(
    predicted: SnapshotSeries, measured: SnapshotSeries, path: str | Path, title: str = ""
) -> Path:
    """Predicted and measured in-use (requested) and reserved bytes on one axis, aligned on
    loading and each step (or on the run's fraction, without markers)."""
    fig, ax = _figure(13.0, 6.0)
    lines: list[str] = []
    peaks: list[tuple[int, int]] = []
    segments = None
    for series, style, name in ((predicted, "-", "predicted"), (measured, "--", "measured")):
        aligned = aligned_positions(series)
        if aligned is None:
            n = max(len(series.requested_bytes) - 1, 1)
            xs, count = [i / n for i in range(len(series.requested_bytes))], None
        else:
            xs, labels = aligned
            count = len(xs)
            segments = labels if segments is None else segments[: len(labels)]
        requested = [b / GIB for b in series.requested_bytes[:count]]
        reserved = [b / GIB for b in series.reserved_bytes[:count]]
        width = 1.4 if style == "-" else 1.1
        ax.plot(xs, reserved, style, drawstyle="steps-post", color=RESERVED_COLOUR, lw=width,
                label=f"{name} reserved")  # fmt: skip
        ax.plot(xs, requested, style, drawstyle="steps-post", color=ALLOCATED_COLOUR, lw=width,
                label=f"{name} in use (requested)")  # fmt: skip
        peak = (max(series.requested_bytes[:count], default=0),
                max(series.reserved_bytes[:count], default=0))  # fmt: skip
        peaks.append(peak)
        lines.append(f"{name:>20}: in use {_gib(peak[0])}, reserved {_gib(peak[1])}")
    if len(peaks) == 2:
        (req_p, res_p), (req_m, res_m) = peaks
        lines.append(f"{'predicted - measured':>20}: in use {_signed(req_p - req_m, req_m)}, "
                     f"reserved {_signed(res_p - res_m, res_m)}")  # fmt: skip
    if segments is not None:
        ax.set_xticks([k + 0.5 for k in range(len(segments))], segments)
        for k in range(1, len(segments)):
            ax.axvline(k, color="#555555", lw=0.8, ls=":")
        ax.set_xlim(0, len(segments))
    ax.text(0.01, 0.98, "\n".join(lines), transform=ax.transAxes, va="top", ha="left",
            fontsize=9, family="monospace",
            bbox={"boxstyle": "round", "fc": "white", "ec": "#999999", "alpha": 0.92})  # fmt: skip
    highest = max((max(p) for p in peaks), default=0) / GIB
    ax.set_ylim(0, highest * 1.25 or 1.0)  # room for the text above the lines
    ax.set_ylabel("GiB")
    ax.set_xlabel("each phase's allocator actions, in order (phases scaled to equal widths)")
    ax.set_title(title or "predicted vs measured memory timeline", fontsize=11)
    ax.legend(loc="upper right", fontsize=8.5)
    fig.tight_layout()
    return _save(fig, path)


def trace_html(snapshot: dict) -> str:
    """torch's own interactive viewer page (``_memory_viz.trace_plot``) of a snapshot: the
    active memory timeline, coloured by category (it loads MemoryViz.js from a CDN)."""
    from torch.cuda import _memory_viz  # torch: only for the HTML page

    return _memory_viz.trace_plot(snapshot)
