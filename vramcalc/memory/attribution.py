"""The allocated bytes at the peak, by component: the simulated run's bytes, in the rules' names.

The rules (``estimate.estimate_from_inventory``) say what each component holds at the
moment they find the peak; the simulated run (``memory/slack.py``) finds the peak allocated
bytes themselves and, from what each allocation holds (``memory/provenance.py``), what is
alive then by category. ``attribute`` gives the breakdown a report shows, summing to the
simulated peak exactly, with no row "beyond the rules":

- with the simulation's categories, each component takes the bytes of its category
  (``CATEGORY_COMPONENTS``); where one category holds several components, the rules split
  it (the adapters of the parameters, AdaLoRA's rank-allocator state of the optimizer's);
- without them (a run not observed category by category), the components the rules count
  exactly from parameter counts (weights, adapters, optimizer states, gradients, cuBLAS
  workspace) keep their bytes and the difference to the simulated peak is spread over those
  the rules approximate (activations, logits, temporaries, gathered weights, communication
  buffers) in proportion to their bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vramcalc.memory.provenance import (
    ACTIVATIONS,
    ADAPTERS,
    GRADIENTS,
    LOAD_BUFFER,
    LOGITS,
    OPTIMIZER_STATES,
    TEMPORARIES,
    UNKNOWN,
    WEIGHTS,
    WORKSPACES,
)

#: the allocated components, in the estimate's order
ALLOCATED = (
    "weights",
    "adapters",
    "gradients",
    "optimizer_states",
    "rank_allocator",
    "activations",
    "logits",
    "transient",
    "gathered_weights",
    "comm_buffers",
    "cublas_workspace",
)
#: simulation category -> the component(s) it holds; the first takes what the others leave
CATEGORY_COMPONENTS: dict[str, tuple[str, ...]] = {
    WEIGHTS: ("weights", "adapters"),
    ADAPTERS: ("weights", "adapters"),
    OPTIMIZER_STATES: ("optimizer_states", "rank_allocator"),
    GRADIENTS: ("gradients",),
    ACTIVATIONS: ("activations",),
    LOGITS: ("logits",),
    TEMPORARIES: ("transient",),
    LOAD_BUFFER: ("transient",),
    UNKNOWN: ("transient",),
    WORKSPACES: ("cublas_workspace",),
}
#: what the rules approximate (the rest they count from parameters and shapes exactly)
APPROXIMATED = ("activations", "logits", "transient", "gathered_weights", "comm_buffers")
#: components no single-GPU simulation has a category for
RULES_ONLY = ("gathered_weights", "comm_buffers")


def attribute(
    rules: Mapping[str, int], peak_allocated_bytes: int, categories: Mapping[str, int]
) -> dict[str, int]:
    """``rules`` (allocated bytes per component of ``ALLOCATED``, at the rules' peak) made to
    sum to ``peak_allocated_bytes``: the simulation's ``categories`` in the rules' names, or,
    without categories, the difference spread over what the rules approximate."""
    if categories and not any(rules.get(name, 0) for name in RULES_ONLY):
        return _from_categories(rules, categories)
    return _spread(rules, peak_allocated_bytes)


def _from_categories(rules: Mapping[str, int], categories: Mapping[str, int]) -> dict[str, int]:
    groups: dict[tuple[str, ...], int] = {}
    for category, nbytes in categories.items():
        group = CATEGORY_COMPONENTS.get(category, ("transient",))
        groups[group] = groups.get(group, 0) + nbytes
    out = dict.fromkeys(ALLOCATED, 0)
    for (first, *rest), nbytes in groups.items():
        left = nbytes
        for name in rest:  # split by the rules, the first component takes the remainder
            out[name] += min(max(rules.get(name, 0), 0), left)
            left -= min(max(rules.get(name, 0), 0), left)
        out[first] += left
    return out


def _spread(rules: Mapping[str, int], peak_allocated_bytes: int) -> dict[str, int]:
    out = {name: int(rules.get(name, 0)) for name in ALLOCATED}
    difference = peak_allocated_bytes - sum(out.values())
    approximated = sum(out[name] for name in APPROXIMATED)
    if difference == 0:
        return out
    if approximated > 0 and approximated + difference >= 0:
        out.update(_scaled(out, APPROXIMATED, approximated + difference))
    elif approximated == 0 and difference > 0:
        out["transient"] += difference
    else:  # the rules' approximated parts cannot absorb it: scale every component
        out.update(_scaled(out, ALLOCATED, max(peak_allocated_bytes, 0)))
    return out


def _scaled(values: Mapping[str, int], names: Sequence[str], total: int) -> dict[str, int]:
    """``values`` of ``names`` scaled to sum to ``total`` exactly (largest remainders get the
    leftover bytes); all equal shares when they are all 0."""
    weights = [max(values[name], 0) for name in names]
    whole = sum(weights) or len(names)
    weights = weights if sum(weights) else [1] * len(names)
    shares = [total * w // whole for w in weights]
    order = sorted(range(len(names)), key=lambda i: -(total * weights[i] % whole))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return dict(zip(names, shares, strict=True))
