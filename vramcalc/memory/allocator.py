"""Replay of PyTorch's CUDA caching allocator, to predict ``max_memory_reserved()``.

A pure-Python model of ``DeviceCachingAllocator`` (``c10/cuda/CUDACachingAllocator.cpp``)
with its settings from ``AcceleratorAllocatorConfig`` (``c10/core/AllocatorConfig.*``),
as in torch 2.11-2.13 (constants and settings checked against the torch 2.13.0
headers, git cf30153c). Methods follow, and are named after, the C++ functions:

- ``malloc``: ``round_size`` (512 B, or ``roundup_power2_next_division``); ``get_pool``
  (small pool for <= ``kSmallSize`` 1 MiB); ``get_free_block`` (best fit in (stream,
  size, address) order, with the ``max_split_size`` and ``max_non_split_rounding_size``
  rules); else ``alloc_block`` (a cudaMalloc of ``get_allocation_size``: 2 MiB for the
  small pool, ``large_segment_size`` 20 MiB below ``kMinLargeAlloc`` 10 MiB, else a
  multiple of ``kRoundLarge`` 2 MiB), ``release_available_cached_blocks`` and
  ``release_cached_blocks`` + retry when it fails; ``should_split``, ``alloc_found_block``.
- ``free``: ``free_block``, ``try_merge_blocks``; ``empty_cache``: ``release_cached_blocks``,
  ``release_blocks``, ``release_block``, ``unmap_block``, ``release_expandable_segment``.
- Expandable segments: one virtual segment per (stream, pool), grown by ``map_block``
  in pages of 2 MiB (small pool) or ``large_segment_size`` 20 MiB (large pool) from
  ``try_allocate_expandable_block`` / ``find_expandable_block``; pages are unmapped
  only by ``release_cached_blocks`` (``empty_cache``, or a failed map).

Statistics as ``DeviceStats``: ``allocated_bytes`` sums block sizes (rounded; the whole
block when its remainder is not split), ``requested_bytes`` requested sizes,
``reserved_bytes`` segments (mapped pages for expandable segments);
``cuda_malloc_calls`` is ``num_device_alloc`` (cudaMallocs or page mappings).
``segments()`` counts cudaMalloc segments plus contiguous mapped expandable ranges,
as ``snapshot()`` reports them (torch's ``segment`` stat stays 0 for the latter).

- CUDA-graph private pools: ``begin_allocate_to_pool`` / ``end_allocate_to_pool`` /
  ``release_pool`` (``beginAllocateToPool``, ``endAllocateToPool``, ``releasePool``;
  ``PrivatePool``): a malloc on the capture stream is served from the pool's own
  ``BlockPool``s (cudaMalloc segments, never expandable), its blocks go back there, and
  ``release_cached_blocks`` frees its segments only once no graph uses it.

Not modelled: user memory pools (``torch.cuda.MemPool``), cross-stream use (``recordStream``
events: a block is reusable once freed), ``garbage_collection_threshold`` and
``per_process_memory_fraction`` (the collector only runs under a fraction), free-memory
callbacks, ``cudaMallocAsync``. Segments get addresses from a bump pointer; real
addresses only break ties between free blocks of equal size.
``allocator_trace`` turns a recorded ``torch.cuda.memory._snapshot()`` trace into events.
``simulate(..., observer=...)`` reports every action as torch's ``record_trace`` does
(``AllocatorAction``: what ``memory/snapshot.py`` writes as a snapshot's device trace).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vramcalc.errors import AllocatorTraceError, InvalidPlanError
from vramcalc.memory import ALLOCATOR_ROUND_BYTES

MIB = 2**20
MIN_BLOCK_BYTES = ALLOCATOR_ROUND_BYTES  # kMinBlockSize
SMALL_REQUEST_BYTES = MIB  # kSmallSize: largest request served by the small pool
SMALL_SEGMENT_BYTES = 2 * MIB  # kSmallBuffer: small-pool segment (and page) size
MIN_LARGE_ALLOC_BYTES = 10 * MIB  # kMinLargeAlloc
ROUND_LARGE_BYTES = 2 * MIB  # kRoundLarge
LARGE_SEGMENT_BYTES = 20 * MIB  # kLargeBuffer, the default large_segment_size
ROUNDUP_INTERVALS = 16  # kRoundUpPowerOfTwoIntervals: 1 MiB, 2 MiB, ... 32 GiB and up
_SIZE_SHIFT, _STREAM_SHIFT = 64, 128  # sort keys: stream << 128 | size << 64 | address
UNLIMITED_BYTES = 2**64 - 1  # std::numeric_limits<size_t>::max(), max_split_size default
DEFAULT_ADDRESS_SPACE_BYTES = 2**40  # virtual range per expandable segment without capacity
ADDRESS_TOP = 2**56  # where the simulated address space starts; segments are placed below it

ALLOC, FREE, EMPTY_CACHE = 0, 1, 2  # event ops: (op, handle, nbytes)
# CUDA-graph private pools: (op, pool id, stream) -> begin_allocate_to_pool, (op, pool id, 0) ->
# end_allocate_to_pool / release_pool (``CachingAllocator.pool_event``)
BEGIN_POOL, END_POOL, RELEASE_POOL = 3, 4, 5
POOL_OPS = (BEGIN_POOL, END_POOL, RELEASE_POOL)


@dataclass(frozen=True)
class AllocatorConfig:
    """The allocator settings of ``PYTORCH_CUDA_ALLOC_CONF`` that shape memory.

    ``roundup_power2_divisions`` holds one division count per power-of-two size
    interval from 1 MiB (index 0, also used below 1 MiB) to 32 GiB and above
    (index 15); empty means off. ``max_non_split_rounding_bytes`` None means
    ``large_segment_bytes``, as ``AcceleratorAllocatorConfig::parseArgs`` sets it.
    ``capacity_bytes`` is what cudaMalloc can obtain in total (None: unlimited);
    ``torch.cuda.set_per_process_memory_fraction(f)`` acts as ``int(f * total_memory)``
    for cudaMalloc segments (with expandable segments torch checks the fraction
    against ``get_allocation_size`` before mapping, which is not modelled).
    """

    expandable_segments: bool = False
    max_split_size_bytes: int | None = None
    capacity_bytes: int | None = None
    roundup_power2_divisions: tuple[int, ...] = ()
    max_non_split_rounding_bytes: int | None = None
    large_segment_bytes: int = LARGE_SEGMENT_BYTES

    def __post_init__(self) -> None:
        problems = []
        if self.large_segment_bytes <= MIN_LARGE_ALLOC_BYTES:
            problems.append("large_segment_bytes must be > 10 MiB (kMinLargeAlloc)")
        for name in ("max_split_size_bytes", "max_non_split_rounding_bytes"):
            if (value := getattr(self, name)) is not None and value < self.large_segment_bytes:
                problems.append(f"{name} must be >= large_segment_bytes, got {value}")
        if self.capacity_bytes is not None and self.capacity_bytes < 0:
            problems.append(f"capacity_bytes must be >= 0, got {self.capacity_bytes}")
        if (divisions := self.roundup_power2_divisions) and (
            len(divisions) != ROUNDUP_INTERVALS or any(d < 0 or d & (d - 1) for d in divisions)
        ):
            problems.append(f"roundup_power2_divisions: {ROUNDUP_INTERVALS} powers of two or 0")
        if problems:
            raise InvalidPlanError(problems)


DEFAULT_CONFIG = AllocatorConfig()


@dataclass(frozen=True)
class AllocatorResult:
    """Statistics of one replay; peaks are ``max_memory_*()`` of the run."""

    peak_allocated_bytes: int
    peak_reserved_bytes: int
    peak_requested_bytes: int
    final_allocated_bytes: int
    final_reserved_bytes: int
    segments: int  # segments (or mapped ranges of expandable segments) alive at the end
    cuda_malloc_calls: int
    oom_event_index: int | None  # index of the ALLOC event that ran out of memory
    oom_request_bytes: int | None  # its requested (unrounded) size


@dataclass(frozen=True, slots=True)
class AllocatorAction:
    """One action of a replay, as ``record_trace`` reports it in a torch memory snapshot.

    ``action`` is ``alloc``, ``free_requested``, ``free_completed`` (a FREE event gives
    both), ``segment_alloc``, ``segment_free``, ``segment_map``, ``segment_unmap`` or
    ``oom``. ``requested_bytes`` is the request (torch's trace ``size`` of alloc and
    frees), ``block_bytes`` the block it got (rounded; the whole block when not split);
    both are the segment or page range bytes for segment actions, and the rounded request
    for ``oom``. ``allocated_bytes`` and ``reserved_bytes`` are the statistics after the
    action; ``event_index`` and ``handle`` name the ``(op, handle, nbytes)`` event it
    belongs to (handle 0 for segment actions).
    """

    action: str
    addr: int
    requested_bytes: int
    block_bytes: int
    stream: int
    allocated_bytes: int
    reserved_bytes: int
    event_index: int
    handle: int


#: receives every action of an observed replay
AllocatorObserver = Callable[[AllocatorAction], None]


@dataclass(frozen=True)
class SegmentState:
    """A segment at the end of a replay, as a snapshot's ``segments`` lists it: a
    cudaMalloc segment, or a contiguous mapped range of an expandable segment.
    ``blocks`` are (address, bytes, requested bytes, allocated) in address order."""

    address: int
    total_bytes: int
    stream: int
    small: bool
    expandable: bool
    blocks: tuple[tuple[int, int, int, bool], ...]


class _Block:
    """``Block``: a range of a segment, free or allocated, linked to its neighbours.
    ``segment`` is (base address, page bytes) of an expandable segment, else None; ``pool``
    the ``_Pool`` it goes back to when freed (``Block::pool``: a global or a private pool)."""

    __slots__ = ("addr", "size", "stream", "small", "segment", "mapped", "requested", "allocated",
                 "prev", "next", "pool")  # fmt: skip

    def __init__(
        self,
        addr: int,
        size: int,
        stream: int,
        small: bool,
        segment: tuple[int, int] | None = None,
        mapped: bool = True,
        pool: _Pool | None = None,
    ):
        self.addr, self.size, self.stream, self.small = addr, size, stream, small
        self.segment = segment
        self.mapped: bool = mapped
        self.pool = pool
        self.requested, self.allocated = 0, False
        self.prev: _Block | None = None
        self.next: _Block | None = None


class _Pool:
    """``BlockPool``: free mapped blocks sorted by (stream, size, address) and
    unmapped ones by (stream, address), each list beside its sorted int keys.
    ``owner``: the id of the CUDA-graph private pool it belongs to (``owner_PrivatePool``),
    None for the allocator's two global pools."""

    __slots__ = ("small", "keys", "blocks", "unmapped_keys", "unmapped", "owner")

    def __init__(self, small: bool, owner: int | None = None):
        self.small = small
        self.owner = owner
        self.keys: list[int] = []
        self.blocks: list[_Block] = []
        self.unmapped_keys: list[int] = []
        self.unmapped: list[_Block] = []

    def insert(self, b: _Block) -> None:
        key = b.stream << _STREAM_SHIFT | b.size << _SIZE_SHIFT | b.addr
        i = bisect_left(self.keys, key)
        self.keys.insert(i, key)
        self.blocks.insert(i, b)

    def remove(self, b: _Block) -> None:
        i = bisect_left(self.keys, b.stream << _STREAM_SHIFT | b.size << _SIZE_SHIFT | b.addr)
        del self.keys[i], self.blocks[i]

    def insert_unmapped(self, b: _Block) -> None:
        key = b.stream << _SIZE_SHIFT | b.addr
        i = bisect_left(self.unmapped_keys, key)
        self.unmapped_keys.insert(i, key)
        self.unmapped.insert(i, b)

    def remove_unmapped(self, b: _Block) -> None:
        i = bisect_left(self.unmapped_keys, b.stream << _SIZE_SHIFT | b.addr)
        del self.unmapped_keys[i], self.unmapped[i]


def _splice(b: _Block, before: _Block | None, after: _Block | None) -> None:
    """``Block::splice``: link ``b`` between ``before`` and ``after``."""
    b.prev, b.next = before, after
    if before is not None:
        before.next = b
    if after is not None:
        after.prev = b


def _merge_neighbours(block: _Block, remove: Callable[[_Block], None]) -> None:
    """``try_merge_blocks`` with the previous, then the next block: absorb each
    one that is free and mapped alike, ``remove`` taking it out of its list."""
    prev, nxt = block.prev, block.next
    if prev is not None and not prev.allocated and prev.mapped == block.mapped:
        remove(prev)
        block.addr = prev.addr
        block.size += prev.size
        _splice(block, prev.prev, nxt)
    if nxt is not None and not nxt.allocated and nxt.mapped == block.mapped:
        remove(nxt)
        block.size += nxt.size
        _splice(block, block.prev, nxt.next)


def _expandable_size(block: _Block) -> int:
    """``get_free_block``'s size of a block counting the unmapped range after it."""
    nxt = block.next
    return block.size + (nxt.size if nxt is not None and not nxt.mapped else 0)


class CachingAllocator:
    """One device's caching allocator: ``malloc``, ``free``, ``empty_cache`` and
    the statistics, as ``DeviceCachingAllocator`` keeps them.

    ``segment_log`` lists (action, bytes) of every ``segment_alloc``,
    ``segment_free``, ``segment_map`` and ``segment_unmap``, the trace actions
    ``allocator_trace.segment_events`` reads from a real run.
    """

    def __init__(
        self, config: AllocatorConfig = DEFAULT_CONFIG, segment_addresses: Iterable[int] = ()
    ):
        self.config = config
        # the driver's address of each cudaMalloc, in order (a measured trace's, to replay it
        # as it ran); once they run out, the model's own (``_take_addresses``)
        self._driver_addresses = iter(segment_addresses)
        self._max_split = config.max_split_size_bytes or UNLIMITED_BYTES
        self._non_split_rounding = config.max_non_split_rounding_bytes or config.large_segment_bytes
        self._capacity = config.capacity_bytes
        self._divisions = config.roundup_power2_divisions
        self._expandable = config.expandable_segments
        self._pools = (_Pool(False), _Pool(True))  # indexed by "is small"
        # CUDA-graph private pools: id -> [large, small, use_count, cudaMalloc segments]
        self._graph_pools: dict[int, list] = {}
        self._capturing: dict[int, int] = {}  # captures_underway: stream -> pool id
        self._live: dict[int, _Block | None] = {}
        self._next_addr = ADDRESS_TOP
        self.allocated_bytes = self.peak_allocated_bytes = 0
        self.reserved_bytes = self.peak_reserved_bytes = 0
        self.requested_bytes = self.peak_requested_bytes = 0
        self.cuda_malloc_segments = 0  # stats.segment: live cudaMalloc segments
        self.cuda_malloc_calls = self.cuda_free_calls = 0  # num_device_alloc / _free
        self.alloc_retries = self.ooms = 0
        self.segment_log: list[tuple[str, int]] = []
        # called with (action, address, bytes, stream) at each segment action (observed replays)
        self.segment_hook: Callable[[str, int, int, int], None] | None = None

    def live_block_bytes(self) -> dict[int, int]:
        """Each allocated handle's block bytes (what ``allocated_bytes`` sums)."""
        return {h: b.size for h, b in self._live.items() if b is not None}

    def malloc(self, handle: int, nbytes: int, stream: int = 0) -> bool:
        """``DeviceCachingAllocator::malloc``; False when it runs out of memory
        (the state is then as torch leaves it, the cache released)."""
        live = self._live
        if handle in live:
            raise AllocatorTraceError(f"handle {handle} allocated twice without a free")
        if nbytes <= 0:  # NativeCachingAllocator::allocate: size 0 never reaches malloc
            live[handle] = None
            return True
        if self._divisions:
            size = self._round_size(nbytes)
        else:  # round_size
            size = (nbytes + MIN_BLOCK_BYTES - 1) // MIN_BLOCK_BYTES * MIN_BLOCK_BYTES
        small = size <= SMALL_REQUEST_BYTES  # get_pool
        capture = self._capturing.get(stream) if self._capturing else None
        pool = self._pools[small] if capture is None else self._graph_pools[capture][small]
        block = self._get_free_block(pool, size, stream)
        if block is None:
            block = self._alloc_block(pool, size, stream)
            if block is None and self._release_available_cached_blocks(pool, size, stream):
                block = self._alloc_block(pool, size, stream)
            if block is None and not self._capturing:  # no release while capturing
                self._release_cached_blocks()
                self.alloc_retries += 1
                block = self._alloc_block(pool, size, stream)
            if block is None:
                self.ooms += 1
                return False
        remaining = block.size - size
        if (  # should_split; then alloc_found_block hands out the front part
            remaining >= MIN_BLOCK_BYTES
            if small or self._expandable
            else size < self._max_split and remaining > SMALL_REQUEST_BYTES
        ):
            front = _Block(block.addr, size, stream, small, block.segment, pool=pool)
            front.prev, front.next, block.prev = (prev := block.prev), block, front  # splice
            if prev is not None:
                prev.next = front
            block.addr += size
            block.size = remaining
            keys = pool.keys  # pool.insert(block), inlined: the hot path
            key = stream << _STREAM_SHIFT | remaining << _SIZE_SHIFT | block.addr
            i = bisect_left(keys, key)
            keys.insert(i, key)
            pool.blocks.insert(i, block)
            block = front
        block.allocated = True
        block.requested = nbytes
        live[handle] = block
        allocated = self.allocated_bytes = self.allocated_bytes + block.size
        if allocated > self.peak_allocated_bytes:
            self.peak_allocated_bytes = allocated
        requested = self.requested_bytes = self.requested_bytes + nbytes
        if requested > self.peak_requested_bytes:
            self.peak_requested_bytes = requested
        return True

    def free(self, handle: int) -> None:
        """``free`` + ``free_block``: merge with free neighbours, back to the pool."""
        try:
            block = self._live.pop(handle)
        except KeyError:
            raise AllocatorTraceError(f"free of handle {handle}, which is not allocated") from None
        if block is not None:
            block.allocated = False
            self.allocated_bytes -= block.size
            self.requested_bytes -= block.requested
            pool = block.pool
            keys, blocks = pool.keys, pool.blocks  # merges and insert inlined: the hot path
            prev, nxt = block.prev, block.next
            if prev is not None and not prev.allocated and prev.mapped:  # try_merge_blocks
                i = bisect_left(
                    keys, prev.stream << _STREAM_SHIFT | prev.size << _SIZE_SHIFT | prev.addr
                )
                del keys[i], blocks[i]
                block.addr, block.size, block.prev = prev.addr, block.size + prev.size, prev.prev
                if block.prev is not None:
                    block.prev.next = block
            if nxt is not None and not nxt.allocated and nxt.mapped:
                i = bisect_left(
                    keys, nxt.stream << _STREAM_SHIFT | nxt.size << _SIZE_SHIFT | nxt.addr
                )
                del keys[i], blocks[i]
                block.size, block.next = block.size + nxt.size, nxt.next
                if block.next is not None:
                    block.next.prev = block
            key = block.stream << _STREAM_SHIFT | block.size << _SIZE_SHIFT | block.addr
            i = bisect_left(keys, key)
            keys.insert(i, key)
            blocks.insert(i, block)

    def empty_cache(self) -> None:
        """``emptyCache``: ``release_cached_blocks``."""
        self._release_cached_blocks()

    def begin_allocate_to_pool(self, pool_id: int, stream: int) -> None:
        """``beginAllocateToPool`` (``CUDAGraph::capture_begin``, or cudagraph trees'
        ``_use_cuda_memory_pool_manager``): until ``end_allocate_to_pool``, every malloc on
        ``stream`` (the capture filter) is served from private pool ``pool_id`` only, made
        now (``PrivatePool``, use count 1) or shared (use count + 1). Its blocks go back to
        it when freed, and are never handed to an allocation outside it."""
        if pool_id in self._capturing.values():
            raise AllocatorTraceError(f"already allocating to pool {pool_id}")
        if (entry := self._graph_pools.get(pool_id)) is None:
            self._graph_pools[pool_id] = [_Pool(False, pool_id), _Pool(True, pool_id), 1, 0]
        else:
            entry[2] += 1
        self._capturing[stream] = pool_id

    def pool_event(self, op: int, pool_id: int, stream: int) -> None:
        """A ``BEGIN_POOL``, ``END_POOL`` or ``RELEASE_POOL`` event."""
        if op == BEGIN_POOL:
            self.begin_allocate_to_pool(pool_id, stream)
        elif op == END_POOL:
            self.end_allocate_to_pool(pool_id)
        else:
            self.release_pool(pool_id)

    def end_allocate_to_pool(self, pool_id: int) -> None:
        """``endAllocateToPool`` (``CUDAGraph::capture_end``)."""
        for stream, capture in list(self._capturing.items()):
            if capture == pool_id:
                del self._capturing[stream]
                return
        raise AllocatorTraceError(f"not allocating to pool {pool_id}")

    def release_pool(self, pool_id: int) -> None:
        """``releasePool`` (``CUDAGraph::reset``): one graph fewer uses the pool; at none,
        ``release_cached_blocks`` (``empty_cache``) may cudaFree its wholly free segments
        (``graph_pools_freeable``), and forgets the pool once it has none left."""
        entry = self._graph_pools.get(pool_id)
        if entry is None or entry[2] <= 0:
            raise AllocatorTraceError(f"pool {pool_id} released more often than used")
        entry[2] -= 1

    def _all_pools(self) -> list[_Pool]:
        """The global pools and every private pool's."""
        return [*self._pools, *(q for entry in self._graph_pools.values() for q in entry[:2])]

    def segments(self) -> int:
        """Live cudaMalloc segments plus contiguous mapped expandable ranges."""
        blocks = [b for pool in self._all_pools() for b in pool.blocks]
        blocks += [b for b in self._live.values() if b is not None]
        heads = [b for b in blocks if b.segment and (b.prev is None or not b.prev.mapped)]
        return self.cuda_malloc_segments + len(heads)

    def segment_states(self) -> list[SegmentState]:
        """The segments now, as a snapshot lists them (by address): each cudaMalloc
        segment, and each contiguous mapped range of an expandable segment."""
        blocks = [b for pool in self._all_pools() for b in pool.blocks]
        blocks += [b for b in self._live.values() if b is not None]
        out = []
        for head in blocks:
            if head.prev is not None and (head.segment is None or head.prev.mapped):
                continue  # not the first block of its segment or mapped range
            chain = []
            b: _Block | None = head
            while b is not None and b.mapped:
                chain.append((b.addr, b.size, b.requested if b.allocated else 0, b.allocated))
                b = b.next
            total = sum(size for _, size, _, _ in chain)
            out.append(SegmentState(head.addr, total, head.stream, head.small,
                                    head.segment is not None, tuple(chain)))  # fmt: skip
        return sorted(out, key=lambda seg: seg.address)

    def block_bytes(self, nbytes: int) -> int:
        """The rounded size of a request (``round_size``)."""
        if self._divisions:
            return self._round_size(nbytes)
        return (nbytes + MIN_BLOCK_BYTES - 1) // MIN_BLOCK_BYTES * MIN_BLOCK_BYTES

    def result(self, oom_event_index: int | None = None, oom_request_bytes: int | None = None):
        return AllocatorResult(
            self.peak_allocated_bytes, self.peak_reserved_bytes, self.peak_requested_bytes,
            self.allocated_bytes, self.reserved_bytes, self.segments(), self.cuda_malloc_calls,
            oom_event_index, oom_request_bytes,
        )  # fmt: skip

    def _round_size(self, nbytes: int) -> int:
        """``round_size`` with ``roundup_power2_divisions``: the next of
        ``divisions`` equal steps between two powers of two."""
        index = min(max(nbytes.bit_length() - 21, 0), ROUNDUP_INTERVALS - 1)
        divisions = self._divisions[index]
        if nbytes < MIN_BLOCK_BYTES or divisions <= 1 or nbytes <= MIN_BLOCK_BYTES * divisions:
            return max(-(-nbytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES, MIN_BLOCK_BYTES)
        if nbytes & (nbytes - 1) == 0:  # roundup_power2_next_division
            return nbytes
        step = 1 << (nbytes.bit_length() - divisions.bit_length())
        return -(-nbytes // step) * step

    def _get_free_block(self, pool: _Pool, size: int, stream: int) -> _Block | None:
        """``get_free_block``: the smallest free block of this stream that fits."""
        keys = pool.keys
        i = bisect_left(keys, stream << _STREAM_SHIFT | size << _SIZE_SHIFT)
        if i == len(keys) or keys[i] >> _STREAM_SHIFT != stream:
            return None
        blocks = pool.blocks
        block = blocks[i]
        if block.segment is not None:
            # Best fit counts the unmapped range after a block as part of its size:
            # step to the next larger block while that one could grow less.
            while (
                block.segment is not None
                and i + 1 < len(keys)
                and keys[i + 1] >> _STREAM_SHIFT == stream
                and _expandable_size(blocks[i + 1]) < _expandable_size(block)
            ):
                i += 1
                block = blocks[i]
        if size < self._max_split <= block.size:  # no oversize block for a small request
            return None
        if size >= self._max_split and block.size >= size + self._non_split_rounding:
            return None
        del keys[i], blocks[i]
        return block

    def _alloc_block(self, pool: _Pool, size: int, stream: int) -> _Block | None:
        """``alloc_block``: a cudaMalloc segment of ``get_allocation_size`` bytes."""
        if self._expandable and pool.owner is None:  # private pools: cudaMalloc segments
            return self._try_allocate_expandable_block(pool, size, stream)
        if pool.small:
            segment_bytes = SMALL_SEGMENT_BYTES
        elif size < MIN_LARGE_ALLOC_BYTES:
            segment_bytes = self.config.large_segment_bytes
        else:
            segment_bytes = -(-size // ROUND_LARGE_BYTES) * ROUND_LARGE_BYTES
        if self._capacity is not None and self.reserved_bytes + segment_bytes > self._capacity:
            return None
        self.cuda_malloc_segments += 1
        if pool.owner is not None:
            self._graph_pools[pool.owner][3] += 1  # cudaMalloc_count
        addr = self._take_addresses(segment_bytes)
        self._reserve(segment_bytes, "segment_alloc", addr, stream)
        return _Block(addr, segment_bytes, stream, pool.small, pool=pool)

    def _take_addresses(self, nbytes: int) -> int:
        """cudaMalloc's address: fresh 2 MiB-aligned ranges in *decreasing* order.

        Addresses only order equal-sized free blocks in best fit (merging follows the
        prev/next links), but that order decides which of them is split, and so the
        fragmentation. The driver hands out large segments top-down: in the 2026-12-01
        H200 traces (data/measurements/h200_round2_traces) most successive segments sit
        below the last one, and replaying those traces with decreasing addresses gives
        torch's peak reserved bytes exactly, where increasing ones fall up to 3.9 GiB
        short (gemma-2-2b LoRA); tests/memory/test_allocator_traces.py checks it. The
        driver does not always go down: in a DeepSpeed ZeRO-2 trace
        (h100_zero_2026-12-06_traces/f3d54081) it placed 2 MiB segments upwards, and best
        fit then emptied two other small segments than this order does (4 MiB of peak
        reserved, 0.02 %); in a ZeRO-2 full fine-tuning trace (ef85cf65), after DeepSpeed's
        ``empty_cache`` it put new segments into the ranges it had just freed, and this
        order reserves 2.84 % less. A measured trace is replayed with the driver's own addresses
        (``segment_addresses``) where the allocator's logic alone is checked.
        """
        driver = next(self._driver_addresses, None)
        if driver is not None:
            return driver
        self._next_addr -= -(-nbytes // ROUND_LARGE_BYTES) * ROUND_LARGE_BYTES
        return self._next_addr

    def _reserve(self, nbytes: int, action: str, addr: int, stream: int) -> None:
        """Count a cudaMalloc / cudaFree (or page map / unmap) of ``nbytes`` (< 0: freed)
        at ``addr``."""
        self.reserved_bytes += nbytes
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        if nbytes > 0:
            self.cuda_malloc_calls += 1
        else:
            self.cuda_free_calls += 1
        self.segment_log.append((action, abs(nbytes)))
        if self.segment_hook is not None:
            self.segment_hook(action, addr, abs(nbytes), stream)

    def _try_allocate_expandable_block(self, pool: _Pool, size: int, stream: int):
        """``try_allocate_expandable_block``: map pages after the lowest free tail."""
        candidate = self._find_expandable_block(pool, size, stream)
        if not candidate.mapped and not self._map_block(pool, candidate, min(candidate.size, size)):
            return None
        while candidate.size < size:  # free -> unmapped: map more, merging into it
            nxt = candidate.next
            assert nxt is not None  # find_expandable_block saw the room
            if not self._map_block(pool, nxt, min(size - candidate.size, nxt.size)):
                return None
            candidate = nxt
        pool.remove(candidate)
        return candidate

    def _find_expandable_block(self, pool: _Pool, size: int, stream: int) -> _Block:
        """``find_expandable_block``: the lowest address with ``size`` free or
        unmapped bytes, else a new virtual segment for this (stream, pool)."""
        for unmapped in pool.unmapped:
            if unmapped.stream != stream:
                continue
            prev = unmapped.prev
            candidate = prev if prev is not None and not prev.allocated else unmapped
            b: _Block | None
            room, b = 0, candidate  # has_available_address_space
            while room < size and b is not None and not b.allocated:
                room, b = room + b.size, b.next
            if room >= size:
                return candidate
        page = SMALL_SEGMENT_BYTES if pool.small else self.config.large_segment_bytes
        device = DEFAULT_ADDRESS_SPACE_BYTES if self._capacity is None else self._capacity
        va_bytes = -(-(device + device // 8) // page) * page  # 1 1/8 of the device
        base = self._take_addresses(va_bytes)
        candidate = _Block(base, va_bytes, stream, pool.small, (base, page), False, pool)
        pool.insert_unmapped(candidate)
        return candidate

    def _map_block(self, pool: _Pool, block: _Block, size: int) -> bool:
        """``map_block``: map the pages holding the first ``size`` bytes of an
        unmapped block (the rest stays unmapped); merge with free neighbours."""
        assert block.segment is not None
        base, page = block.segment
        offset = block.addr - base
        mapped_bytes = (-(-(offset + size) // page) - offset // page) * page
        if self._capacity is not None and self.reserved_bytes + mapped_bytes > self._capacity:
            return False  # cuMemCreate ran out of memory; map() releases what it made
        pool.remove_unmapped(block)
        mapped_at = base + offset // page * page
        block.mapped = True
        if mapped_bytes < block.size:
            rest = _Block(block.addr + mapped_bytes, block.size - mapped_bytes, block.stream,
                          block.small, block.segment, False, pool)  # fmt: skip
            _splice(rest, block, block.next)
            pool.insert_unmapped(rest)
            block.size = mapped_bytes
        _merge_neighbours(block, pool.remove)
        pool.insert(block)
        self._reserve(mapped_bytes, "segment_map", mapped_at, block.stream)
        return True

    def _unmap_block(self, pool: _Pool, block: _Block) -> None:
        """``unmap_block``: unmap the whole pages inside a free block; partial pages
        at its ends stay mapped as free blocks; merge with unmapped neighbours."""
        assert block.segment is not None
        base, page = block.segment
        first, end = -(-(block.addr - base) // page), (block.addr + block.size - base) // page
        if first >= end:
            return
        pool.remove(block)
        start, nbytes = base + first * page, (end - first) * page
        stream, small, segment = block.stream, block.small, block.segment
        if start > block.addr:
            before = _Block(block.addr, start - block.addr, stream, small, segment, pool=pool)
            _splice(before, block.prev, block)
            pool.insert(before)
        if block.addr + block.size > start + nbytes:
            after_bytes = block.addr + block.size - start - nbytes
            after = _Block(start + nbytes, after_bytes, stream, small, segment, pool=pool)
            _splice(after, block, block.next)
            pool.insert(after)
        block.addr, block.size, block.mapped = start, nbytes, False
        _merge_neighbours(block, pool.remove_unmapped)
        pool.insert_unmapped(block)
        self._reserve(-nbytes, "segment_unmap", start, stream)

    def _release_block(self, pool: _Pool, block: _Block) -> None:
        """``release_block``: cudaFree a whole free segment."""
        pool.remove(block)
        self.cuda_malloc_segments -= 1
        if pool.owner is not None:
            self._graph_pools[pool.owner][3] -= 1
        self._reserve(-block.size, "segment_free", block.addr, block.stream)

    def _release_available_cached_blocks(self, pool: _Pool, size: int, stream: int) -> bool:
        """``release_available_cached_blocks``: with ``max_split_size`` set, free the
        smallest oversize block that covers the request, else the largest oversize
        blocks until their sizes add up to it."""
        max_split = self._max_split
        if max_split == UNLIMITED_BYTES:
            return False
        keys, blocks = pool.keys, pool.blocks
        key_size = max(size, max_split)
        i = bisect_left(keys, stream << _STREAM_SHIFT | key_size << _SIZE_SHIFT)
        if i < len(keys) and blocks[i].stream == stream and blocks[i].segment is None:
            self._release_block(pool, blocks[i])
            return True
        released = 0
        while i > 0 and released < key_size:  # from the largest block downwards
            i -= 1
            block = blocks[i]
            if block.size < max_split or block.stream != stream:
                break
            if block.segment is None:
                released += block.size
                self._release_block(pool, block)
        return released >= key_size

    def _release_cached_blocks(self) -> None:
        """``release_cached_blocks``: ``release_blocks`` of the large, then the small
        pool: cudaFree unsplit free segments, unmap free pages of expandable ones; then the
        private pools no graph uses any more (``graph_pools_freeable``), forgetting each one
        left without segments. A private pool in use keeps its segments."""
        freeable = [p for p, e in self._graph_pools.items() if e[2] == 0]
        pools = [*self._pools, *(q for p in freeable for q in self._graph_pools[p][1::-1])]
        for pool in pools:
            to_unmap = []
            for block in list(pool.blocks):
                if block.segment is not None:
                    to_unmap.append(block)
                elif block.prev is None and block.next is None:
                    self._release_block(pool, block)
            for block in to_unmap:
                self._unmap_block(pool, block)
                if block.prev is None and block.next is None and not block.mapped:
                    pool.remove_unmapped(block)  # release_expandable_segment
        for pool_id in freeable:
            if self._graph_pools[pool_id][3] == 0:
                del self._graph_pools[pool_id]


def simulate(
    events: Iterable[tuple[int, int, int]],
    config: AllocatorConfig = DEFAULT_CONFIG,
    observer: AllocatorObserver | None = None,
    allocator: CachingAllocator | None = None,
) -> AllocatorResult:
    """Replay ``(op, handle, nbytes)`` events from an empty allocator.

    ``nbytes`` is the requested (unrounded) size of an ALLOC; FREE frees the
    handle's block; EMPTY_CACHE is ``torch.cuda.empty_cache()``. The replay stops
    at the first ALLOC that does not fit ``capacity_bytes``, as a training step
    stops at its OutOfMemoryError; the statistics are those at that moment.
    ``observer`` receives every action (``AllocatorAction``); ``allocator`` is the
    (fresh) allocator to replay into, to read its state afterwards.
    """
    if allocator is None:
        allocator = CachingAllocator(config)
    if observer is not None:
        return _simulate_observed(events, allocator, observer)

    malloc, free = allocator.malloc, allocator.free
    for index, (op, handle, nbytes) in enumerate(events):
        if op == FREE:
            free(handle)
        elif op == ALLOC:
            if not malloc(handle, nbytes):
                return allocator.result(oom_event_index=index, oom_request_bytes=nbytes)
        elif op == EMPTY_CACHE:
            allocator.empty_cache()
        elif op in POOL_OPS:
            allocator.pool_event(op, handle, nbytes)
        else:
            raise AllocatorTraceError(f"event {index}: unknown op {op!r}")
    return allocator.result()


def _simulate_observed(
    events: Iterable[tuple[int, int, int]], allocator: CachingAllocator, observer: AllocatorObserver
) -> AllocatorResult:
    """``simulate`` reporting each action (kept apart: the plain replay stays as fast)."""
    index = 0

    def segment(action: str, addr: int, nbytes: int, stream: int) -> None:
        observer(AllocatorAction(action, addr, nbytes, nbytes, stream, allocator.allocated_bytes,
                                 allocator.reserved_bytes, index, 0))  # fmt: skip

    allocator.segment_hook = segment
    live = allocator._live
    try:
        for index, (op, handle, nbytes) in enumerate(events):
            if op == FREE:
                block = live.get(handle)
                if block is None:  # a size-0 tensor (or an unknown handle: free raises)
                    allocator.free(handle)
                    continue
                # merging may change the block: its fields are read before
                addr, requested, size = block.addr, block.requested, block.size
                stream = block.stream
                allocator.free(handle)
                allocated, reserved = allocator.allocated_bytes, allocator.reserved_bytes
                for action in ("free_requested", "free_completed"):
                    observer(AllocatorAction(action, addr, requested, size, stream, allocated,
                                             reserved, index, handle))  # fmt: skip
            elif op == ALLOC:
                if not allocator.malloc(handle, nbytes):
                    observer(AllocatorAction("oom", 0, nbytes, allocator.block_bytes(nbytes), 0,
                                             allocator.allocated_bytes, allocator.reserved_bytes,
                                             index, handle))  # fmt: skip
                    return allocator.result(oom_event_index=index, oom_request_bytes=nbytes)
                block = live[handle]
                if block is not None:
                    observer(AllocatorAction("alloc", block.addr, nbytes, block.size, block.stream,
                                             allocator.allocated_bytes, allocator.reserved_bytes,
                                             index, handle))  # fmt: skip
            elif op == EMPTY_CACHE:
                allocator.empty_cache()
            elif op in POOL_OPS:
                allocator.pool_event(op, handle, nbytes)
            else:
                raise AllocatorTraceError(f"event {index}: unknown op {op!r}")
    finally:
        allocator.segment_hook = None
    return allocator.result()
