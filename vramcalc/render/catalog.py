"""``vramcalc models`` and ``vramcalc gpus``: the catalogs as tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vramcalc.catalog import CatalogModel, Gpu
from vramcalc.render.tables import (
    gib,
    table,
)
from vramcalc.speed.links import Link


# -- catalogs --------------------------------------------------------------------------------
def render_models(entries: Sequence[CatalogModel]) -> str:
    """``vramcalc models``: every bundled model with its exact parameter count."""
    rows = [[e.name, f"{e.params:,}" if e.params else "-", ", ".join(e.aliases)] for e in entries]
    text = table(rows, ["model", "parameters", "aliases"], [False, True, False])
    if any(not e.params for e in entries):
        text += "\nparameters '-': no published count for that model"
    return text


#: GPUs of one node the ``gpus`` table prices the link for (one HGX / DGX board)
LINK_GPUS = 8


def render_gpus(
    gpus: Sequence[Gpu], links: Mapping[str, Link | None] | None = None, link_gpus: int = LINK_GPUS
) -> str:
    """``vramcalc gpus``: by memory, with bf16 and fp16 peaks apart, each card's link to the
    others and the NCCL bus bandwidth ``links`` gives ``link_gpus`` of them, and why any cell
    is '-'."""
    links = links or {}
    rows, no_bf16, unpublished, unpriced = [], [], [], []
    for g in sorted(gpus, key=lambda g: (g.memory_bytes, g.name)):
        if not g.has_bf16:
            no_bf16.append(g.name)
        elif g.bf16_dense_tflops is None:
            unpublished.append(g.name)
        if g.price_per_hour_usd is None:
            unpriced.append(g.name)
        link = links.get(g.name)
        rows.append(
            [
                g.name,
                gib(g.memory_bytes),
                "none" if not g.has_bf16 else _number(g.bf16_dense_tflops),
                _number(g.fp16_dense_tflops),
                _number(g.fp32_tflops),
                _number(g.memory_bandwidth_gbps),
                _link(g),
                "-" if link is None else f"{link.bus_gbps:,.0f}",
                "-" if g.price_per_hour_usd is None else f"{g.price_per_hour_usd:.2f}",
                ", ".join(g.aliases),
            ]
        )
    heads = ["GPU", "memory", "bf16 TFLOP/s", "fp16 TFLOP/s", "fp32", "GB/s", "link GB/s"]
    heads += ["bus GB/s", "$/hour", "aliases"]
    numeric = [False, True, True, True, True, True, False, True, True, False]
    lines = [table(rows, heads, numeric)]
    if no_bf16:
        lines.append(
            f"bf16 'none': {', '.join(no_bf16)} have no bf16 tensor cores; bf16 plans do not "
            "run there (plan them with --dtype fp16)"
        )
    if unpublished:
        lines.append(
            f"TFLOP/s '-': {', '.join(unpublished)}: the vendor publishes no dense tensor "
            "TFLOP/s, so speed is not predicted (memory fit is)"
        )
    if unpriced:
        lines.append(f"$/hour '-': no price in data/gpus.csv for {', '.join(unpriced)}")
    lines.append("memory: what nvidia-smi reports as total; TFLOP/s: dense tensor-core peaks")
    lines.append(
        "link GB/s: how the cards of one machine talk (multi-GPU speed), bidirectional GB/s per "
        "GPU as datasheets state it (data/gpus.csv, interconnect_source)"
    )
    priors = sorted({f"{k} ({cite})" for link in links.values() if link for k, cite in link.priors})
    if priors:
        lines.append(
            f"bus GB/s: NCCL bus bandwidth the speed model assumes for {link_gpus} of them in one "
            "machine (one direction x a prior efficiency, not measured): " + "; ".join(priors)
        )
    return "\n".join(lines)


_LINK_NAMES = {"nvswitch": "NVSwitch", "nvlink": "NVLink", "infinity-fabric": "Infinity Fabric"}


def _link(g: Gpu) -> str:
    """``NVSwitch 900`` / ``PCIe 64``: the fabric a multi-GPU plan of this card uses."""
    if g.interconnect in _LINK_NAMES and g.link_bidir_gbps:
        return f"{_LINK_NAMES[g.interconnect]} {g.link_bidir_gbps:g}"
    if g.pcie_bidir_gbps:
        return f"PCIe {g.pcie_bidir_gbps:g}"
    return "-"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"
