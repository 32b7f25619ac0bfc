"""The helpers every text of ``vramcalc.render`` is made with (the library returns data; the
modules of this package write it).

Tables are drawn by ``tabulate`` through one helper, ``table``: its ``simple`` format for
the terminal and GitHub Markdown (``pipe``: GFM tables with column alignment) for ``.md``
files. Numbers are formatted here
(GiB to two decimals, counts with separators) and right-aligned; a ``-`` in a table always
has a note under it that says why.
"""

from __future__ import annotations

from collections.abc import Sequence

from tabulate import tabulate

from vramcalc.memory import GIB, MIB
from vramcalc.training_plan import TrainingPlan

COMPONENT_LABELS = {
    "weights": "base weights",
    "adapters": "LoRA adapters",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "rank_allocator": "AdaLoRA rank-allocator state",
    "activations": "activations",
    "logits": "logits + loss",
    "transient": "step temporaries",
    "gathered_weights": "gathered (unsharded) weights",
    "comm_buffers": "communication buffers",
    "cublas_workspace": "cuBLAS workspace",
    "allocator_reserve": "allocator reserve (slack)",
    "cuda_context": "CUDA context + kernels",
    "driver_reserved": "driver reserve",
    "nccl": "NCCL communicators",
    "paged_optimizer_states": "paged optimizer states",
}


# -- the one table helper ------------------------------------------------------------------
def table(
    rows: Sequence[Sequence[str]],
    headers: Sequence[str],
    numeric: Sequence[bool] | None = None,
    markdown: bool = False,
) -> str:
    """Rows of preformatted cells as a table: plain text, or GitHub Markdown."""
    align = ["right" if n else "left" for n in numeric] if numeric else None
    if markdown:
        escape = [[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in rows]
        heads = [h.replace("|", "\\|") for h in headers]
        return tabulate(escape, heads, tablefmt="pipe", colalign=align, disable_numparse=True)
    return tabulate(rows, headers, tablefmt="simple", colalign=align, disable_numparse=True)


def key_values(rows: Sequence[Sequence[str]]) -> str:
    """Rows of (name, text) without a header or rules: a block of aligned key-value lines."""
    return tabulate(rows, tablefmt="plain", disable_numparse=True)


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:,.2f} GiB"


def margin(nbytes: float) -> str:
    """Memory left (or short, negative): GiB, or MiB under 0.1 GiB so that a small margin never
    reads ``-0.00 GiB``."""
    if abs(nbytes) < 0.1 * GIB:
        return f"{round(nbytes / MIB):,} MiB"
    return gib(nbytes)


def headroom_note(headroom: float) -> str:
    """The line under a table of GPUs: what 'fits' and 'margin' measure."""
    return (
        f"fits: the device total within each GPU's memory less {headroom:.0%} headroom "
        "(--headroom); margin: what is left of that budget"
    )


def format_duration(seconds: float) -> str:
    """``95 s``, ``12.5 min``, ``3.4 h``, ``2.1 d``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


# -- plan ------------------------------------------------------------------------------------
def plan_heading(model_name: str, plan: TrainingPlan) -> str:
    """``meta-llama/Llama-2-13b-hf — qlora (nf4)``: the first words of every plan report."""
    return f"{model_name} — {plan.method}" + (f" ({plan.quant})" if plan.is_kbit else "")
