"""The caching allocator's small pool on its own, for replays that split the two pools.

Where nothing caps memory (no ``capacity_bytes``) and segments are not expandable, a request
of at most ``kSmallSize`` (1 MiB, rounded) is served from the small pool and nothing else
touches it but ``empty_cache``: ``CachingAllocator.malloc`` falls back to releasing cached
blocks only when a cudaMalloc fails, which needs a capacity, and ``max_split_size`` (at
least 20 MiB) never applies to blocks of 2 MiB segments. The two pools are then two
independent allocators, whose statistics add up.

``SmallPool`` is that pool, exactly as ``allocator.py`` models it, and faster: every segment
is ``kSmallBuffer`` (2 MiB); best fit takes the free block of the smallest (size, address);
a block is always split (sizes are multiples of 512 bytes, so any remainder can be one); a
freed block merges with free neighbours of its segment; ``empty_cache`` releases the
segments that are one free block. Addresses only order equal free blocks, and the
allocator hands out segments top-down: here segment k sits at the bottom of the k-th 4 MiB
slot below ``ADDRESS_TOP``, so the order is the allocator's and two segments never touch
(a merge cannot cross one).

A replay may skip events it proves would repeat (``serving/stepskip.py``); for that the
pool keeps a journal: with ``journal`` set to a dict, the first change to a segment records
the segment as it was (``segment_blocks``) under its number.
"""

from __future__ import annotations

from bisect import bisect_left, insort

from vramcalc.errors import AllocatorTraceError
from vramcalc.memory.allocator import ADDRESS_TOP, SMALL_SEGMENT_BYTES

SEGMENT_BYTES = SMALL_SEGMENT_BYTES
SLOT_SHIFT = 22  # a segment's number: its address >> 22 (the 4 MiB slot it sits in)
_ADDRESS = (1 << 64) - 1
_SIZE_SHIFT = 64  # free blocks sort by size << 64 | address

#: a segment's blocks in address order: (offset, bytes, handle; None when free)
Blocks = tuple[tuple[int, int, int | None], ...]


class SmallPool:
    """The small pool of one device's caching allocator (module docstring). Blocks are
    rounded sizes: ``malloc`` takes a request already rounded (``block_bytes``)."""

    def __init__(self) -> None:
        self.keys: list[int] = []  # free blocks: size << 64 | address, sorted (best fit)
        self.free_at: dict[int, int] = {}  # free block's address -> its bytes
        self.free_end: dict[int, int] = {}  # free block's end -> its address
        self.live: dict[int, int] = {}  # handle -> its block's address
        self.owner: dict[int, tuple[int, int]] = {}  # allocated address -> (handle, bytes)
        self.segments = 0
        self.allocated_bytes = 0
        self.journal: dict[int, Blocks | None] | None = None
        self._next = ADDRESS_TOP

    @property
    def reserved_bytes(self) -> int:
        return self.segments * SEGMENT_BYTES

    def malloc(self, handle: int, size: int) -> None:
        """Allocate a block of ``size`` bytes (rounded, at most 1 MiB) for ``handle``."""
        if handle in self.live:
            raise AllocatorTraceError(f"handle {handle} allocated twice without a free")
        keys = self.keys
        i = bisect_left(keys, size << _SIZE_SHIFT)
        if i < len(keys):  # get_free_block
            key = keys[i]
            addr, block = key & _ADDRESS, key >> _SIZE_SHIFT
            if self.journal is not None:
                self._record(addr >> SLOT_SHIFT)
            del keys[i], self.free_at[addr], self.free_end[addr + block]
        else:  # alloc_block: a new segment
            self._next -= 2 * SEGMENT_BYTES
            addr, block = self._next, SEGMENT_BYTES
            self.segments += 1
            if self.journal is not None:
                self.journal.setdefault(addr >> SLOT_SHIFT, None)
        if block > size:  # should_split, always: the remainder is 512 bytes or more
            rest, rest_bytes = addr + size, block - size
            insort(keys, rest_bytes << _SIZE_SHIFT | rest)
            self.free_at[rest] = rest_bytes
            self.free_end[rest + rest_bytes] = rest
        self.live[handle] = addr
        self.owner[addr] = (handle, size)
        self.allocated_bytes += size

    def free(self, handle: int) -> int:
        """Free ``handle``'s block (merged with free neighbours); returns its bytes."""
        try:
            addr = self.live.pop(handle)
        except KeyError:
            raise AllocatorTraceError(f"free of handle {handle}, which is not allocated") from None
        if self.journal is not None:
            self._record(addr >> SLOT_SHIFT)
        size = self.owner.pop(addr)[1]
        self.allocated_bytes -= size
        keys, free_at, free_end = self.keys, self.free_at, self.free_end
        start, end = addr, addr + size
        before = free_end.pop(start, None)
        if before is not None:  # try_merge_blocks with the previous block
            before_bytes = free_at.pop(before)
            del keys[bisect_left(keys, before_bytes << _SIZE_SHIFT | before)]
            start = before
        after_bytes = free_at.pop(end, None)
        if after_bytes is not None:  # and the next
            del free_end[end + after_bytes]
            del keys[bisect_left(keys, after_bytes << _SIZE_SHIFT | end)]
            end += after_bytes
        insort(keys, (end - start) << _SIZE_SHIFT | start)
        free_at[start] = end - start
        free_end[end] = start
        return size

    def empty_cache(self) -> None:
        """``release_cached_blocks`` of this pool: release every segment that is one free
        block (they sort last: no free block is larger)."""
        keys = self.keys
        while keys and keys[-1] >> _SIZE_SHIFT == SEGMENT_BYTES:
            addr = keys[-1] & _ADDRESS
            if self.journal is not None:
                self._record(addr >> SLOT_SHIFT)
            keys.pop()
            del self.free_at[addr], self.free_end[addr + SEGMENT_BYTES]
            self.segments -= 1

    def rename(self, renamed: dict[int, int]) -> None:
        """Give live handles new names (old -> new); the blocks stay."""
        live, owner = self.live, self.owner
        moved = [(live.pop(old), new) for old, new in renamed.items()]
        for addr, new in moved:
            if new in live:
                raise AllocatorTraceError(f"handle {new} allocated twice without a free")
            live[new] = addr
            owner[addr] = (new, owner[addr][1])

    def has_segment(self, segment: int) -> bool:
        """Whether segment ``segment`` is allocated (its first block starts at its base)."""
        base = segment << SLOT_SHIFT
        return base in self.free_at or base in self.owner

    def segment_blocks(self, segment: int) -> Blocks:
        """Segment ``segment``'s blocks now, in address order."""
        base = segment << SLOT_SHIFT
        pos, end, out = base, base + SEGMENT_BYTES, []
        free_at, owner = self.free_at, self.owner
        while pos < end:
            size = free_at.get(pos)
            if size is None:
                handle, size = owner[pos]
                out.append((pos - base, size, handle))
            else:
                out.append((pos - base, size, None))
            pos += size
        return tuple(out)

    def _record(self, segment: int) -> None:
        journal = self.journal
        if journal is not None and segment not in journal:
            journal[segment] = self.segment_blocks(segment)
