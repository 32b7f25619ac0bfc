"""The link a catalog row gives a multi-GPU plan, and one collective's time on it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vramcalc.speed.links import (
    ALL_GATHER,
    ALL_REDUCE,
    REDUCE_SCATTER,
    Link,
    LinkConstants,
    NoLinkError,
    collective_seconds,
    link_for,
)

# -- time ------------------------------------------------------------------------------------------
PCIE = Link("test", 100.0, "pcie", 1, "")
NVLINK = Link("test", 100.0, "nvlink", 1, "")


def test_a_large_collective_moves_its_ring_share_at_the_bus_bandwidth():
    """1 GB all-gather on 2 GPUs: half of it through 100 GB/s (Simple, 8.4 + 5.7 us); an
    all-reduce moves twice that over twice the ring steps."""
    assert collective_seconds(ALL_GATHER, 10**9, 2, PCIE) == pytest.approx(14.1e-6 + 0.005)
    assert collective_seconds(REDUCE_SCATTER, 10**9, 4, PCIE) == pytest.approx(
        (8.4 + 3 * 5.7) * 1e-6 + 0.0075
    )
    assert collective_seconds(ALL_REDUCE, 10**9, 4, PCIE) == pytest.approx(
        (8.4 + 6 * 5.7) * 1e-6 + 0.015
    )


def test_a_small_collective_is_latency_in_the_fastest_protocol():
    """1 kB: LL (6.6 + 1.0 us per PCIe step, half the bandwidth) beats Simple; over NVLink
    LL128 is allowed, and LL (0.6 us a step) still wins."""
    assert collective_seconds(ALL_GATHER, 1000, 2, PCIE) == pytest.approx(7.6e-6 + 500 / 50e9)
    assert collective_seconds(ALL_GATHER, 1000, 2, NVLINK) == pytest.approx(7.2e-6 + 500 / 50e9)
    assert collective_seconds(ALL_GATHER, 1000, 1, PCIE) == 0.0


def test_network_steps_pay_network_latency():
    two_nodes = Link("test", 100.0, "nvlink", 2, "")
    # 16 GPUs, one ring step crosses nodes (all-gather: nodes - 1), Simple: 14 us for it
    assert collective_seconds(ALL_GATHER, 10**9, 16, two_nodes) == pytest.approx(
        (8.4 + 14 * 3.4 + 14.0) * 1e-6 + 10**9 * 15 / 16 / 100e9
    )


# -- the link of a catalog row -----------------------------------------------------------------------
CONSTANTS = LinkConstants(0.8, 0.5, 50.0, 8, {})


def test_links_from_datasheet_rates():
    nvswitch = link_for("nvswitch", 900.0, 128.0, 8, CONSTANTS)
    assert (nvswitch.bus_gbps, nvswitch.hardware, nvswitch.nodes) == (360.0, "nvlink", 1)
    assert link_for("pcie", None, 64.0, 4, CONSTANTS).bus_gbps == 16.0
    mesh = link_for("infinity-fabric", 896.0, 128.0, 4, CONSTANTS)  # 3 of 7 links
    assert mesh.bus_gbps == pytest.approx(448 * 3 / 7 * 0.8)
    assert link_for("infinity-fabric", 896.0, 128.0, 8, CONSTANTS).bus_gbps == pytest.approx(
        448 * 0.8
    )


def test_beyond_a_node_the_network_caps_the_bus_bandwidth():
    slow = replace(CONSTANTS, network_gbps_per_gpu=10.0)
    link = link_for("nvswitch", 900.0, 128.0, 16, slow)
    assert (link.bus_gbps, link.nodes) == (80.0, 2)  # 8 NICs of 10 GB/s per node
    assert link_for("nvswitch", 900.0, 128.0, 16, CONSTANTS).bus_gbps == 360.0  # 400 > 360
    with pytest.raises(NoLinkError):
        link_for("", None, None, 2, CONSTANTS)


def test_a_link_names_the_priors_its_bus_bandwidth_rests_on():
    sources = {
        "communication_fabric_efficiency": "prior: ... github.com/NVIDIA/nccl-tests issue #212: '450GB/s'",
        "communication_pcie_efficiency": "prior: ... github.com/NVIDIA/nccl issue #1639: 8 x RTX 5090",
        "communication_gpus_per_node": "ASSUMPTION: HGX boards carry 8; more",
        "communication_network_gbps_per_gpu": "ASSUMPTION for plans beyond one node: github.com/NVIDIA/nccl-tests issue #267",
    }
    constants = replace(CONSTANTS, sources=sources)
    assert link_for("nvswitch", 900.0, 128.0, 8, constants).bus_bandwidth_source == (
        "communication_fabric_efficiency 0.8 (prior: github.com/NVIDIA/nccl-tests issue #212)"
    )
    assert link_for("pcie", None, 64.0, 2, constants).priors == (
        ("communication_pcie_efficiency 0.5", "prior: github.com/NVIDIA/nccl issue #1639"),
    )
    assert link_for("nvswitch", 900.0, 128.0, 16, constants).priors[1:] == (
        ("communication_gpus_per_node 8", "ASSUMPTION: HGX boards carry 8"),
        (
            "communication_network_gbps_per_gpu 50",
            "ASSUMPTION for plans beyond one node: github.com/NVIDIA/nccl-tests issue #267",
        ),
    )
