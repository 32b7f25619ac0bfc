"""What is on the device beyond live tensors, and the allocator's slack where it is not simulated.

* ``driver_reserved_bytes``: the driver's own reservation, which nvidia-smi counts as used;
* ``runtime_bytes``: the CUDA context plus kernel modules and library handles loaded while
  training (less without flash attention, more with bitsandbytes' int8 kernels);
* ``paged_device_bytes``: managed-memory optimizer states, as the driver places them (in
  128 MiB batches);
* ``allocator_reserve_bytes``: the documented fallback for the caching allocator's slack
  (a fraction of peak allocated) where ``memory/slack.py`` does not simulate it.

Every value lives in ``data/calibration.json`` with the measurements it comes from.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from vramcalc.calibration import CALIBRATION_JSON, calibration_json
from vramcalc.errors import CatalogError
from vramcalc.training_plan import TrainingPlan


@dataclass(frozen=True)
class Calibration:
    driver_reserved_bytes: int
    cuda_runtime_bytes: int
    eager_attention_runtime_delta_bytes: int
    bnb_int8_runtime_bytes: int
    managed_memory_granularity_bytes: int
    cublas_workspace_bytes: int
    allocator_reserved_fraction: float
    allocator_reserved_fraction_expandable: float
    allocator_reserved_floor_bytes: int
    sources: dict[str, str]


_INT_KEYS = (
    "driver_reserved_bytes",
    "cuda_runtime_bytes",
    "eager_attention_runtime_delta_bytes",
    "bnb_int8_runtime_bytes",
    "managed_memory_granularity_bytes",
    "cublas_workspace_bytes",
    "allocator_reserved_floor_bytes",
)
_FLOAT_KEYS = ("allocator_reserved_fraction", "allocator_reserved_fraction_expandable")


@functools.lru_cache(maxsize=1)
def load_calibration() -> Calibration:
    raw = calibration_json()
    try:
        values: dict = {k: int(raw[k]["value"]) for k in _INT_KEYS}
        values.update({k: float(raw[k]["value"]) for k in _FLOAT_KEYS})
        sources = {k: v["source"] for k, v in raw.items() if isinstance(v, dict)}
        return Calibration(**values, sources=sources)
    except (KeyError, TypeError, ValueError) as err:
        raise CatalogError(f"calibration file {CALIBRATION_JSON} is malformed ({err})") from err


def allocator_reserve_bytes(
    peak_allocated_bytes: int, calibration: Calibration, allocator: str = "default"
) -> int:
    """Fallback for reserved minus allocated at the peak (where the allocator is not simulated)."""
    fraction = (
        calibration.allocator_reserved_fraction_expandable
        if allocator == "expandable"
        else calibration.allocator_reserved_fraction
    )
    return int(max(peak_allocated_bytes * fraction, calibration.allocator_reserved_floor_bytes))


def runtime_bytes(plan: TrainingPlan, eager_attention: bool, calibration: Calibration) -> int:
    """The CUDA context and the kernel modules / handles a run of ``plan`` loads."""
    total = calibration.cuda_runtime_bytes
    if eager_attention:
        total += calibration.eager_attention_runtime_delta_bytes
    if plan.quant == "int8":
        total += calibration.bnb_int8_runtime_bytes
    return total


def paged_device_bytes(paged_state_bytes: int, calibration: Calibration) -> int:
    """Managed-memory states as the driver places them on the device (whole batches)."""
    batch = calibration.managed_memory_granularity_bytes
    return -(-paged_state_bytes // batch) * batch if paged_state_bytes > 0 else 0
