"""Memory rules, one module per component; each is a pure function of an
inventory and a plan (and, for overheads, the calibration file)."""

from __future__ import annotations

import math

#: The CUDA caching allocator rounds every block to a multiple of 512 bytes
#: (``kMinBlockSize`` in c10/cuda/CUDACachingAllocator.cpp); the ``allocated``
#: statistics count the rounded size.
ALLOCATOR_ROUND_BYTES = 512

#: Bytes in a GiB: every size shown to users is in GiB (2**30), never "GB".
GIB = 2**30
MIB = 2**20

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "uint8": 1}


def alloc_bytes(nbytes: int | float, tensors: int = 1) -> int:
    """Bytes the caching allocator charges for ``tensors`` tensors of ``nbytes`` each."""
    if nbytes <= 0 or tensors <= 0:
        return 0
    per = math.ceil(nbytes / ALLOCATOR_ROUND_BYTES) * ALLOCATOR_ROUND_BYTES
    return int(per * tensors)
