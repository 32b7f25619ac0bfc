"""NCCL's own device buffers per rank, from NCCL's documented defaults (no measurement yet).

A fake process group has no NCCL communicator, so neither the simulated-world
measurements nor the world trace contain these bytes; they are added by rule, and
every figure that includes them says so (``NCCL_ASSUMPTION``).

NCCL allocates them itself (``cuMem*``, outside PyTorch's caching allocator) when the
communicator connects its channels: for each channel, each connection to a peer gets
one buffer per protocol (NCCL ``src/init.cc`` ``computeBuffSizes``):

* LL: ``NCCL_LL_LINES_PER_THREAD * NCCL_LL_MAX_NTHREADS * NCCL_STEPS * 16 B`` =
  8 * 512 * 8 * 16 = 512 KiB (``NCCL_LL_BUFFSIZE``);
* LL128: ``NCCL_LL128_ELEMS_PER_THREAD * NCCL_LL128_MAX_NTHREADS * NCCL_STEPS * 8 B`` =
  120 * 640 * 8 * 8 = 4,915,200 B (``NCCL_LL128_BUFFSIZE``);
* Simple: ``1 << 22`` = 4 MiB (``NCCL_BUFFSIZE``).

Channels: NCCL opens up to ``MAXCHANNELS`` (32) collective channels on NVLink/NVSwitch
nodes; each rank connects a ring (one peer it receives from) and a tree (a chain inside
a node: one more peer) on every channel. NVLink SHARP (NVLS) buffers are left out: the
harness launches every multi-GPU run with ``NCCL_NVLS_ENABLE=0``
(``harness/distributed.py``). Point-to-point buffers appear only with send/recv, which
FSDP and DDP do not use.
"""

from __future__ import annotations

LL_BUFFER_BYTES = 8 * 512 * 8 * 16
LL128_BUFFER_BYTES = 120 * 640 * 8 * 8
SIMPLE_BUFFER_BYTES = 1 << 22
CHANNELS = 32
CONNECTIONS_PER_CHANNEL = 2  # ring + tree (chain) peer
NCCL_ASSUMPTION = (
    "NCCL buffers by rule from NCCL's defaults (32 channels x ring + tree connection x "
    "LL/LL128/Simple buffers); not measured: the simulated world has no NCCL communicator"
)


def nccl_buffer_bytes(num_gpus: int, channels: int = CHANNELS) -> int:
    """Device bytes NCCL's communicator buffers take on each of ``num_gpus`` ranks (0 alone)."""
    if num_gpus < 2:
        return 0
    per_connection = LL_BUFFER_BYTES + LL128_BUFFER_BYTES + SIMPLE_BUFFER_BYTES
    return channels * CONNECTIONS_PER_CHANNEL * per_connection
