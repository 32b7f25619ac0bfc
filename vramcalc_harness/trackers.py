"""Trackers: context managers that measure memory and time around work.

``MemoryTracker`` synchronizes the device and resets PyTorch's peak counters
on enter, and on exit (also when the work raised, e.g. an OOM) reads

* ``peak_allocated_bytes`` / ``peak_reserved_bytes``: ``max_memory_allocated``
  / ``max_memory_reserved`` of the caching allocator;
* ``device_total_bytes``: the peak of device-wide used memory (total - free),
  which includes the CUDA context, cuBLAS workspaces and anything outside the
  allocator. ``DeviceMemorySampler`` reads it ~100 times a second in a
  background thread, through NVML (``pynvml``) when importable, else through
  ``torch.cuda.mem_get_info``.

On CPU every GPU figure is ``None`` (not measured) -- never a made-up number.
``host_peak_rss_bytes`` (the process's peak resident set) is measured on both.
``Timer`` times a block with a synchronize at both ends.
``check_memory_instrument`` allocates a known tensor and checks that every
figure reads it back within 1 %.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from vramcalc_harness.errors import HarnessError, InstrumentError

SAMPLE_INTERVAL_S = 0.01


def _torch() -> Any:
    import torch

    return torch


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def synchronize(device: str) -> None:
    if is_cuda(device):
        _torch().cuda.synchronize()


def host_peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


# -- device-wide memory ----------------------------------------------------------------------
class _NvmlReader:
    """Device-wide used bytes of this process's GPU (torch's current device), via NVML."""

    source = "nvml"

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = self._find_handle()

    def _find_handle(self) -> Any:
        nvml = self._nvml
        torch = _torch()
        if torch.cuda.is_initialized():
            current = torch.cuda.current_device()
            uuid = str(getattr(torch.cuda.get_device_properties(current), "uuid", "") or "")
            if uuid:
                try:
                    name = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
                    return nvml.nvmlDeviceGetHandleByUUID(name)
                except nvml.NVMLError:
                    pass
        return nvml.nvmlDeviceGetHandleByIndex(_visible_device_index())

    def used_bytes(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def memory_v2(self) -> dict[str, int] | None:
        """NVML v2 memory info: ``total``, ``reserved`` (the driver's own), ``used``, ``free``.

        v1 ``used`` (what nvidia-smi shows and ``used_bytes`` returns) includes the
        driver's reservation; v2 reports it apart. None where the driver or pynvml lacks v2.
        """
        nvml = self._nvml
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(self._handle, version=nvml.nvmlMemory_v2)
        except Exception:  # noqa: BLE001 - old driver / pynvml without v2
            return None
        return {k: int(getattr(info, k)) for k in ("total", "reserved", "used", "free")}

    def driver_version(self) -> str:
        version = self._nvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)


class _MemGetInfoReader:
    """Device-wide used bytes via ``torch.cuda.mem_get_info`` (needs an initialized context)."""

    source = "mem_get_info"

    def used_bytes(self) -> int:
        free, total = _torch().cuda.mem_get_info()
        return int(total - free)


def _visible_device_entry() -> str:
    """This process's GPU as NVML names it: entry ``LOCAL_RANK`` of ``CUDA_VISIBLE_DEVICES``.

    A single-GPU worker has ``LOCAL_RANK`` 0; the ranks of a multi-GPU case
    each use GPU ``LOCAL_RANK`` (accelerate's ``PartialState`` sets it so).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return str(local_rank)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    return entries[local_rank] if local_rank < len(entries) else str(local_rank)


def _visible_device_index() -> int:
    entry = _visible_device_entry()
    return int(entry) if entry.isdigit() else int(os.environ.get("LOCAL_RANK", "0"))


def device_baseline_bytes() -> int | None:
    """Device-wide used bytes of this process's GPU *before* it creates a CUDA context (NVML only).

    ``None`` without pynvml, or once CUDA is initialized (the context is in it then).
    """
    if _torch().cuda.is_initialized():
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        entry = _visible_device_entry()
        if entry.isdigit():
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(entry))
        else:
            handle = pynvml.nvmlDeviceGetHandleByUUID(entry)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # noqa: BLE001 - no pynvml / NVML: not measured
        return None


def device_memory_reader() -> _NvmlReader | _MemGetInfoReader:
    """NVML when ``pynvml`` imports and initializes, else ``mem_get_info``."""
    try:
        return _NvmlReader()
    except Exception:  # noqa: BLE001 - no pynvml / no NVML library: fall back
        return _MemGetInfoReader()


class DeviceMemorySampler:
    """Samples device-wide used memory in a thread; ``peak_bytes`` after exit."""

    def __init__(self, reader: Any = None, interval_s: float = SAMPLE_INTERVAL_S):
        self.reader = reader or device_memory_reader()
        self.interval_s = interval_s
        self.start_bytes: int | None = None
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def source(self) -> str:
        return self.reader.source

    def sample(self) -> int:
        used = self.reader.used_bytes()
        if self.peak_bytes is None or used > self.peak_bytes:
            self.peak_bytes = used
        return used

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):  # a failed read must not kill the case
                self.sample()

    def __enter__(self) -> DeviceMemorySampler:
        self.start_bytes = self.sample()
        self._thread = threading.Thread(target=self._run, name="device-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


# -- allocator peaks ---------------------------------------------------------------------------
@dataclass
class MemoryTracker:
    """Peak allocator and device-wide memory of the work inside ``with``.

    Fields stay ``None`` on CPU. ``sampler`` may be shared with an outer
    tracker (one thread for the whole case); without one, a CUDA tracker makes
    its own.
    """

    device: str
    sampler: DeviceMemorySampler | None = None
    start_allocated_bytes: int | None = None
    start_reserved_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    end_allocated_bytes: int | None = None
    device_total_bytes: int | None = None
    device_start_bytes: int | None = None
    device_total_source: str | None = None
    # the same peaks over the measured steps only (after warm-up): the steady state the
    # estimator models, without model loading and the first optimizer step
    steady_peak_allocated_bytes: int | None = None
    steady_peak_reserved_bytes: int | None = None
    steady_device_total_bytes: int | None = None
    _whole_run: tuple[int, int, int | None] | None = None
    _own_sampler: bool = False

    def mark_steady(self) -> None:
        """Warm-up is over: keep the peaks so far and restart them for the measured steps."""
        if not is_cuda(self.device):
            return
        torch = _torch()
        torch.cuda.synchronize()
        assert self.sampler is not None
        self._whole_run = (
            int(torch.cuda.max_memory_allocated()),
            int(torch.cuda.max_memory_reserved()),
            self.sampler.peak_bytes,
        )
        torch.cuda.reset_peak_memory_stats()
        self.sampler.peak_bytes = None
        self.sampler.sample()

    def __enter__(self) -> MemoryTracker:
        if not is_cuda(self.device):
            return self
        torch = _torch()
        torch.cuda.init()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start_allocated_bytes = int(torch.cuda.memory_allocated())
        self.start_reserved_bytes = int(torch.cuda.memory_reserved())
        if self.sampler is None:
            self.sampler = DeviceMemorySampler()
            self._own_sampler = True
            self.sampler.__enter__()
        self.device_start_bytes = self.sampler.sample()
        return self

    def __exit__(self, *exc: object) -> None:
        if not is_cuda(self.device):
            return
        torch = _torch()
        torch.cuda.synchronize()
        self.peak_allocated_bytes = int(torch.cuda.max_memory_allocated())
        self.peak_reserved_bytes = int(torch.cuda.max_memory_reserved())
        self.end_allocated_bytes = int(torch.cuda.memory_allocated())
        assert self.sampler is not None
        if self._own_sampler:
            self.sampler.__exit__(*exc)
        else:
            self.sampler.sample()
        self.device_total_bytes = self.sampler.peak_bytes
        self.device_total_source = self.sampler.source
        if self._whole_run is not None:
            self.steady_peak_allocated_bytes = self.peak_allocated_bytes
            self.steady_peak_reserved_bytes = self.peak_reserved_bytes
            self.steady_device_total_bytes = self.device_total_bytes
            before = self._whole_run
            self.peak_allocated_bytes = max(self.peak_allocated_bytes, before[0])
            self.peak_reserved_bytes = max(self.peak_reserved_bytes, before[1])
            if before[2] is not None and self.device_total_bytes is not None:
                self.device_total_bytes = max(self.device_total_bytes, before[2])


def allocated_bytes(device: str) -> int | None:
    """Bytes held by live tensors now (``None`` on CPU)."""
    if not is_cuda(device):
        return None
    torch = _torch()
    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated())


# -- time ------------------------------------------------------------------------------------
@dataclass
class Timer:
    """Wall seconds of the block, with a device synchronize at both ends."""

    device: str = "cpu"
    seconds: float | None = None
    _start: float = 0.0

    def __enter__(self) -> Timer:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


# -- the instrument check ------------------------------------------------------------------------
def warm_up_device(device: str) -> None:
    """Create the CUDA context and load the kernels the check uses, outside what it measures.

    With CUDA's lazy module loading (the default since CUDA 11.7) the first launch of a
    kernel loads its module into device memory: on an H200 (driver 580) the first
    ``fill_`` moved NVML's used memory by ~92 MiB on top of a 1 GiB allocation, so a
    check that allocates and fills in one go reads 1,170,210,816 bytes for 1 GiB. Doing
    the same small allocation and fill once before measuring keeps module loading out.
    """
    if not is_cuda(device):
        return
    torch = _torch()
    warm = torch.empty(1 << 20, dtype=torch.uint8, device=device)
    warm.fill_(1)
    torch.cuda.synchronize()
    del warm


@dataclass(frozen=True)
class InstrumentCheck:
    """What each figure read for a known allocation of ``expected_bytes``."""

    expected_bytes: int
    allocated_delta_bytes: int
    reserved_delta_bytes: int
    device_delta_bytes: int
    device_total_source: str
    tolerance: float

    def problems(self) -> list[str]:
        out = []
        for name, value in (
            ("max_memory_allocated", self.allocated_delta_bytes),
            ("max_memory_reserved", self.reserved_delta_bytes),
            (f"device-wide used ({self.device_total_source})", self.device_delta_bytes),
        ):
            error = abs(value - self.expected_bytes) / self.expected_bytes
            if error > self.tolerance:
                out.append(
                    f"{name} read {value} bytes for a {self.expected_bytes}-byte allocation "
                    f"({error:.2%} off, tolerance {self.tolerance:.0%})."
                )
        return out


def check_memory_instrument(
    device: str = "cuda", nbytes: int = 1 << 30, tolerance: float = 0.01
) -> InstrumentCheck:
    """Allocate ``nbytes`` on the GPU and verify every tracker reads it back within ``tolerance``.

    Raises ``InstrumentError`` listing each figure that is off, ``HarnessError`` on CPU.
    """
    if not is_cuda(device):
        raise HarnessError(
            "the memory instrument check needs a CUDA device; on CPU there is nothing to check."
        )
    torch = _torch()
    torch.cuda.init()
    warm_up_device(device)
    torch.cuda.empty_cache()
    with MemoryTracker(device) as tracker:
        block = torch.empty(nbytes, dtype=torch.uint8, device=device)
        block.fill_(1)
        torch.cuda.synchronize()
        time.sleep(20 * SAMPLE_INTERVAL_S)  # let the sampler see it
        del block
    torch.cuda.empty_cache()
    check = InstrumentCheck(
        expected_bytes=nbytes,
        allocated_delta_bytes=tracker.peak_allocated_bytes - tracker.start_allocated_bytes,  # type: ignore[operator]
        reserved_delta_bytes=tracker.peak_reserved_bytes - tracker.start_reserved_bytes,  # type: ignore[operator]
        device_delta_bytes=tracker.device_total_bytes - tracker.device_start_bytes,  # type: ignore[operator]
        device_total_source=tracker.device_total_source or "",
        tolerance=tolerance,
    )
    problems = check.problems()
    if problems:
        raise InstrumentError("memory instrument check failed: " + " ".join(problems))
    return check


# -- device facts ----------------------------------------------------------------------------------
def device_memory_facts(device: str) -> dict[str, Any]:
    """What the driver and CUDA say about the device's memory, read once per case.

    * ``cuda_total_bytes``: ``mem_get_info`` total, what a process can use (torch's OOM
      message calls it "total capacity");
    * ``context_device_bytes``: ``mem_get_info`` used (total - free) when called right
      after the CUDA context exists and before anything is allocated: the context;
    * ``nvml_total_bytes`` / ``driver_reserved_bytes``: NVML v2 ``total`` (nvidia-smi's
      total) and ``reserved`` (the driver's own reservation, inside v1 ``used``);
    * ``pytorch_cuda_alloc_conf``: the allocator settings the process runs under.

    GPU figures are None on CPU or where NVML v2 is missing.
    """
    facts: dict[str, Any] = {
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "cuda_total_bytes": None,
        "context_device_bytes": None,
        "nvml_total_bytes": None,
        "driver_reserved_bytes": None,
    }
    if not is_cuda(device):
        return facts
    torch = _torch()
    free, total = torch.cuda.mem_get_info()
    facts.update(cuda_total_bytes=int(total), context_device_bytes=int(total - free))
    try:
        v2 = _NvmlReader().memory_v2()
    except Exception:  # noqa: BLE001 - no pynvml: not measured
        v2 = None
    if v2 is not None:
        facts.update(nvml_total_bytes=v2["total"], driver_reserved_bytes=v2["reserved"])
    return facts
