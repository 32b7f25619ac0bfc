"""Trackers: GPU figures are None on CPU, the sampler keeps the peak, the instrument check."""

from __future__ import annotations

import time

import pytest
import torch

from vramcalc_harness.errors import HarnessError
from vramcalc_harness.trackers import (
    DeviceMemorySampler,
    InstrumentCheck,
    MemoryTracker,
    Timer,
    allocated_bytes,
    check_memory_instrument,
    host_peak_rss_bytes,
)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cpu_memory_tracker_marks_gpu_figures_not_measured():
    with MemoryTracker("cpu") as tracker:
        block = torch.ones(1 << 20)
    del block
    assert tracker.peak_allocated_bytes is None
    assert tracker.peak_reserved_bytes is None
    assert tracker.device_total_bytes is None
    assert tracker.device_total_source is None
    assert allocated_bytes("cpu") is None
    assert host_peak_rss_bytes() > 1 << 20


def test_cpu_tracker_still_exits_cleanly_when_the_work_raises():
    with pytest.raises(RuntimeError), MemoryTracker("cpu") as tracker:
        raise RuntimeError("boom")
    assert tracker.peak_allocated_bytes is None


def test_timer_measures_the_block():
    with Timer("cpu") as timer:
        time.sleep(0.02)
    assert 0.015 < timer.seconds < 1.0


class FakeReader:
    source = "fake"

    def __init__(self, values):
        self.values = list(values)

    def used_bytes(self):
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


def test_sampler_keeps_the_peak_of_device_wide_memory():
    reader = FakeReader([100, 300, 900, 200, 150])
    with DeviceMemorySampler(reader, interval_s=0.001) as sampler:
        time.sleep(0.05)
    assert sampler.start_bytes == 100
    assert sampler.peak_bytes == 900
    assert sampler.source == "fake"


def test_instrument_check_reports_each_figure_outside_tolerance():
    good = InstrumentCheck(1000, 1000, 1005, 995, "nvml", 0.01)
    assert good.problems() == []
    bad = InstrumentCheck(1000, 1000, 1000, 1200, "nvml", 0.01)
    assert bad.problems() == [
        "device-wide used (nvml) read 1200 bytes for a 1000-byte allocation (20.00% off, tolerance 1%)."
    ]


def test_instrument_check_needs_cuda():
    with pytest.raises(HarnessError, match="needs a CUDA device"):
        check_memory_instrument("cpu")


@pytest.mark.gpu
@needs_gpu
def test_known_allocation_reads_back_within_one_percent_on_gpu():
    check = check_memory_instrument("cuda", nbytes=1 << 30, tolerance=0.01)
    assert check.problems() == []
    assert check.allocated_delta_bytes == 1 << 30


@pytest.mark.gpu
@needs_gpu
def test_gpu_tracker_reads_peaks_and_device_total():
    torch.cuda.init()
    with MemoryTracker("cuda") as tracker:
        block = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        del block
    assert tracker.peak_allocated_bytes - tracker.start_allocated_bytes == 256 << 20
    assert tracker.peak_reserved_bytes >= tracker.peak_allocated_bytes
    assert tracker.device_total_bytes >= tracker.peak_reserved_bytes
    assert tracker.device_total_source in ("nvml", "mem_get_info")


@pytest.mark.gpu
@needs_gpu
def test_gpu_tracker_keeps_whole_run_and_steady_peaks_apart():
    torch.cuda.init()
    with MemoryTracker("cuda") as tracker:
        load = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
        del load
        tracker.mark_steady()
        step = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
        del step
    assert tracker.peak_allocated_bytes - tracker.start_allocated_bytes == 512 << 20
    assert tracker.steady_peak_allocated_bytes - tracker.start_allocated_bytes == 128 << 20
    assert tracker.device_total_bytes >= tracker.steady_device_total_bytes


def test_cpu_tracker_marks_steady_without_measuring():
    with MemoryTracker("cpu") as tracker:
        tracker.mark_steady()
    assert tracker.steady_peak_allocated_bytes is None and tracker.peak_allocated_bytes is None
