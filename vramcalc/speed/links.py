"""What carries a multi-GPU plan's collectives, and the time one of them takes.

The link (``link_for``) comes from a ``data/gpus.csv`` row: half its bidirectional datasheet
rate (one direction: NVLink or AMD Infinity Fabric for the GPUs joined by a fabric, PCIe
x16 for the others) times a prior efficiency (``data/calibration.json``,
``communication_*``: what NCCL reaches of the line rate), which is NCCL's *bus bandwidth*
(nccl-tests ``doc/PERFORMANCE.md``); beyond one node (``communication_gpus_per_node``) an
assumed network per GPU caps it. A ring collective (``collective_seconds``) of ``S`` bytes
-- the whole gathered, scattered or reduced buffer -- moves ``S (n-1)/n`` per GPU for an
all-gather or reduce-scatter and ``2 S (n-1)/n`` for an all-reduce (PERFORMANCE.md, "Bus
bandwidth") at that bandwidth, after NCCL's own latency (``src/graph/tuning.cc``: a base
latency per protocol plus a hardware latency per ring step, network steps at the network's),
the fastest of the protocols NCCL may choose (LL at half the bandwidth, LL128 at 0.92 and
only over NVLink, Simple). Pure functions, but for ``gpu_link``: a catalog GPU's link with
the priors read from ``data/calibration.json``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vramcalc.calibration import CALIBRATION_JSON, calibration_json
from vramcalc.catalog import Gpu
from vramcalc.errors import CatalogError

ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE = "all_gather", "reduce_scatter", "all_reduce"

# NCCL src/graph/tuning.cc (ncclTunerConstantsDefaults), ring algorithm, microseconds
PROTOCOLS = ("LL", "LL128", "Simple")
NCCL_BASE_LATENCY_US = {"LL": 6.6, "LL128": 14.0, "Simple": 8.4}
NCCL_HW_LATENCY_US = {
    "nvlink": {"LL": 0.6, "LL128": 1.9, "Simple": 3.4},
    "pcie": {"LL": 1.0, "LL128": 2.5, "Simple": 5.7},
    "net": {"LL": 2.7, "LL128": 4.0, "Simple": 14.0},
}
# bandwidth share of each protocol (tuning.cc: ring LL busBw * .5, LL128 * 0.92)
PROTOCOL_BANDWIDTH = {"LL": 0.5, "LL128": 0.92, "Simple": 1.0}


# -- the link ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkConstants:
    """Priors that turn a datasheet link bandwidth into NCCL's bus bandwidth
    (``data/calibration.json``, ``communication_*``, each with its source)."""

    fabric_efficiency: float  # NVLink / Infinity Fabric: of the per-direction line rate
    pcie_efficiency: float  # PCIe: of the per-direction x16 rate
    network_gbps_per_gpu: float  # assumed effective network bandwidth per GPU (GB/s)
    gpus_per_node: int
    sources: Mapping[str, str]

    def prior(self, name: str) -> tuple[str, str]:
        """(``communication_<name> <value>``, its source cited short: ``prior``/``ASSUMPTION``
        and the first GitHub thread it quotes, else the source's first clause)."""
        key = f"communication_{name}"
        value = getattr(self, name)
        source = self.sources.get(key, "")
        thread = re.search(r"github\.com/\S+ issue #\d+", source)
        if thread is None:
            return f"{key} {value:g}", source.split(";")[0].strip() or "source unstated"
        kind = source.split(":", 1)[0].strip()
        return f"{key} {value:g}", f"{kind}: {thread.group(0)}"

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> LinkConstants:
        def value(name: str) -> Any:
            return raw[f"communication_{name}"]["value"]

        return cls(
            float(value("fabric_efficiency")),
            float(value("pcie_efficiency")),
            float(value("network_gbps_per_gpu")),
            int(value("gpus_per_node")),
            {k: str(v["source"]) for k, v in raw.items() if k.startswith("communication_")},
        )


@dataclass(frozen=True)
class Link:
    """What carries the collectives between a plan's GPUs."""

    name: str
    bus_gbps: float  # NCCL bus bandwidth, GB/s per GPU and direction
    hardware: str  # NCCL latency class of the intra-node steps: nvlink or pcie
    nodes: int
    derivation: str
    # the priors of data/calibration.json the bus bandwidth rests on: (key, its cited source)
    priors: tuple[tuple[str, str], ...] = ()

    @property
    def bus_bandwidth_source(self) -> str:
        """``communication_fabric_efficiency 0.82 (prior: github.com/NVIDIA/nccl-tests issue
        #212)``: each prior the bus bandwidth uses and where its value comes from."""
        return "; ".join(f"{key} ({cite})" for key, cite in self.priors) or "-"

    @property
    def protocols(self) -> tuple[str, ...]:
        """LL128 is on by default only where GPUs talk over NVLink (tuning.cc)."""
        return PROTOCOLS if self.hardware == "nvlink" else ("LL", "Simple")


class NoLinkError(ValueError):
    """The catalog says nothing of how a GPU talks to the others."""


def link_for(
    interconnect: str,
    link_bidir_gbps: float | None,
    pcie_bidir_gbps: float | None,
    num_gpus: int,
    constants: LinkConstants,
) -> Link:
    """The link of ``num_gpus`` GPUs with this catalog row's interconnect (``data/gpus.csv``):
    half the bidirectional datasheet rate (one direction) times an efficiency; a mesh (AMD
    Infinity Fabric: one link to each of 7 peers) uses only the links to the plan's peers;
    beyond one node the network per GPU caps the nodes' share (NCCL's rings cross each node
    boundary once per NIC: the bus bandwidth is at most the node's NICs together)."""
    nodes = -(num_gpus // -constants.gpus_per_node)
    if interconnect in ("nvswitch", "nvlink", "infinity-fabric") and link_bidir_gbps:
        per_direction = link_bidir_gbps / 2
        peers = min(num_gpus, constants.gpus_per_node) - 1
        share = min(peers, 7) / 7 if interconnect == "infinity-fabric" else 1.0
        bus = per_direction * share * constants.fabric_efficiency
        name = {
            "nvswitch": "NVLink (NVSwitch)",
            "nvlink": "NVLink",
            "infinity-fabric": "Infinity Fabric",
        }[interconnect]
        how = (
            f"{link_bidir_gbps:g} GB/s bidirectional / 2"
            + (f" x {min(peers, 7)}/7 links" if share < 1 else "")
            + f" x {constants.fabric_efficiency:g}"
        )
        hardware = "nvlink"
        priors = [constants.prior("fabric_efficiency")]
    elif interconnect == "pcie" and pcie_bidir_gbps:
        bus = pcie_bidir_gbps / 2 * constants.pcie_efficiency
        name, hardware = "PCIe", "pcie"
        how = f"{pcie_bidir_gbps:g} GB/s bidirectional / 2 x {constants.pcie_efficiency:g}"
        priors = [constants.prior("pcie_efficiency")]
    else:
        raise NoLinkError(interconnect or "none")
    if nodes > 1:
        network = constants.network_gbps_per_gpu * constants.gpus_per_node
        if network < bus:
            bus = network
            how += f", capped by the network: {constants.gpus_per_node} x {constants.network_gbps_per_gpu:g} GB/s per node"
        name += f" + network ({nodes} nodes)"
        priors += [constants.prior("gpus_per_node"), constants.prior("network_gbps_per_gpu")]
    derivation = f"{how} = {bus:,.0f} GB/s bus bandwidth"
    return Link(name, bus, hardware, nodes, derivation, tuple(priors))


def collective_seconds(kind: str, nbytes: int, num_gpus: int, link: Link) -> float:
    """One ring collective of ``nbytes`` (NCCL's S) over ``num_gpus`` GPUs (module docstring)."""
    if num_gpus <= 1 or nbytes <= 0:
        return 0.0
    steps = (2 if kind == ALL_REDUCE else 1) * (num_gpus - 1)
    network_steps = (2 if kind == ALL_REDUCE else 1) * (link.nodes - 1)
    moved = nbytes * steps / num_gpus
    best = math.inf
    for p in link.protocols:
        latency_us = (
            NCCL_BASE_LATENCY_US[p]
            + (steps - network_steps) * NCCL_HW_LATENCY_US[link.hardware][p]
            + network_steps * NCCL_HW_LATENCY_US["net"][p]
        )
        seconds = latency_us * 1e-6 + moved / (link.bus_gbps * 1e9 * PROTOCOL_BANDWIDTH[p])
        best = min(best, seconds)
    return best


# -- the catalog's GPUs ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_link_constants() -> LinkConstants:
    """The ``communication_*`` priors of ``data/calibration.json``."""
    try:
        return LinkConstants.from_json(calibration_json())
    except (ValueError, KeyError, TypeError) as err:
        raise CatalogError(
            f"calibration file {CALIBRATION_JSON}: communication entries unreadable ({err})"
        ) from err


def gpu_link(gpu: Gpu, num_gpus: int) -> Link:
    """What carries the collectives of ``num_gpus`` GPUs of this kind (``links.link_for`` on
    its ``data/gpus.csv`` row and the ``communication_*`` priors)."""
    try:
        return link_for(
            gpu.interconnect,
            gpu.link_bidir_gbps,
            gpu.pcie_bidir_gbps,
            num_gpus,
            load_link_constants(),
        )
    except NoLinkError as err:
        raise CatalogError(
            f"data/gpus.csv lists no link bandwidth for {gpu.name} ({err}); the speed of "
            f"{num_gpus} of them cannot be predicted."
        ) from err
