"""What is on the device beyond live tensors: CUDA context, cuBLAS workspaces,
and the caching allocator's reserve over what is allocated.

These cannot be derived from model code; their values live in
``data/calibration.json`` with the source of each (fitted on measurements, or
a documented prior until measurements exist).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from vramcalc.calibration import CALIBRATION_JSON, calibration_json
from vramcalc.errors import CatalogError


@dataclass(frozen=True)
class Calibration:
    cuda_context_bytes: int
    cublas_workspace_bytes: int
    allocator_reserved_fraction: float
    allocator_reserved_floor_bytes: int
    nccl_communicator_bytes: int
    sources: dict[str, str]


@functools.lru_cache(maxsize=1)
def load_calibration() -> Calibration:
    raw = calibration_json()
    try:
        return Calibration(
            cuda_context_bytes=int(raw["cuda_context_bytes"]["value"]),
            cublas_workspace_bytes=int(raw["cublas_workspace_bytes"]["value"]),
            allocator_reserved_fraction=float(raw["allocator_reserved_fraction"]["value"]),
            allocator_reserved_floor_bytes=int(raw["allocator_reserved_floor_bytes"]["value"]),
            nccl_communicator_bytes=int(raw["nccl_communicator_bytes"]["value"]),
            sources={k: v["source"] for k, v in raw.items() if isinstance(v, dict)},
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CatalogError(f"calibration file {CALIBRATION_JSON} is malformed ({err})") from err


def allocator_reserve_bytes(peak_allocated_bytes: int, calibration: Calibration) -> int:
    """Reserved minus allocated at the peak: the caching allocator's slack."""
    slack = peak_allocated_bytes * calibration.allocator_reserved_fraction
    return int(max(slack, calibration.allocator_reserved_floor_bytes))
