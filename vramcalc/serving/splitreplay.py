"""A serving run replayed as ``phasereplay.replay`` replays it, with the same peaks, fast.

Three facts of the caching allocator (``memory/allocator.py``), each exact where nothing caps
memory and segments are not expandable (``splits``; else the run is laid out and replayed
whole):

1. **The pools are apart.** A request of at most 1 MiB (rounded) is served by the small pool,
   a larger one by the large pool, and only ``empty_cache`` acts on both
   (``memory/smallpool.py``). Allocated and reserved bytes are the sums of the two pools'.
2. **Small blocks are their requests.** In the small pool every block is the rounded request
   (``SmallPool``): small-pool allocated bytes are a running sum of the events, whatever the
   pool's state; only its reserved bytes need the pool replayed.
3. **Reserved bytes only grow** between two ``empty_cache`` calls (a FREE keeps a block
   cached): the most reserved after an ALLOC of a stretch is the reserved bytes at its end.

A ``DecodeSteps`` piece (``compactrun``) is replayed step by step without laying it out: its
large-pool events one by one (the KV cache grows), the allocated peak of the step from its
large-pool replay and, between two of its large-pool events, the running sum of its
small-pool events (``stepskip.StepPlan``, one per pattern of rounded sizes). Its small-pool
events are replayed up to where the pool provably repeats (``stepskip.Skipper``), the rest of
a sweep over the decoder layers left out: a decoding step runs every decoder layer alike,
and the pool is back where it was a few layers before.
"""

from __future__ import annotations

import itertools

from vramcalc.memory.allocator import (
    ALLOC,
    FREE,
    SMALL_REQUEST_BYTES,
    AllocatorConfig,
    CachingAllocator,
)
from vramcalc.memory.smallpool import SmallPool
from vramcalc.serving.compactrun import DecodeSteps, Event, Run
from vramcalc.serving.stepskip import Plans, Skipper, StepPlan


def splits(config: AllocatorConfig) -> bool:
    """Whether a run may be replayed with its pools apart (module docstring)."""
    return config.capacity_bytes is None and not config.expandable_segments


class SplitReplay:
    """``phasereplay.Stretches`` of a ``Run``: its stretches in order, pools apart."""

    def __init__(self, run: Run, config: AllocatorConfig):
        if not splits(config):
            raise ValueError("a capped or expandable allocator replays its pools together")
        self.large = CachingAllocator(config)
        self.small = SmallPool()
        self.spans = list(run.spans())
        self.skipped_events = 0  # small-pool events left out, proved to repeat
        self._plans: dict[tuple[tuple[tuple[int, int, int], ...], tuple[int, ...]], Plans] = {}
        self._skippers: dict[int, Skipper] = {}
        self._peak = -1  # most allocated after an ALLOC since the stretch or cache release
        self._most = (0, 0)

    @property
    def allocated_bytes(self) -> int:
        return self.small.allocated_bytes + self.large.allocated_bytes

    def replay(self, begin: int, stop: int) -> tuple[int, int]:
        """``phasereplay._replay_stretch`` of events ``[begin, stop)``."""
        self._peak, self._most = -1, (0, 0)
        for start, piece in self.spans:
            end = start + len(piece)
            if end <= begin or start >= stop:
                continue
            lo, hi = max(begin, start) - start, min(stop, end) - start
            if isinstance(piece, DecodeSteps):
                width = len(piece.template)
                for index in range(lo // width, -(-hi // width)):
                    step_lo, step_hi = max(lo - index * width, 0), min(hi - index * width, width)
                    step = piece.traced + 1 + index
                    if step_hi - step_lo == width:
                        self._step(piece, step)
                    else:  # part of a step (no stretch ends inside one now): laid out
                        self._events(piece.step_events(step), step_lo, step_hi)
            else:
                self._events(piece, lo, hi)
        self._flush()
        return self._most

    def _flush(self) -> None:
        """The end of a stretch or a cache release: what was seen since counts."""
        if self._peak >= 0:
            allocated, reserved = self._most
            self._most = (
                max(allocated, self._peak),
                max(reserved, self.small.reserved_bytes + self.large.reserved_bytes),
            )
            self._peak = -1

    def _events(self, events: list[Event], lo: int, hi: int) -> None:
        """Literal events, one by one."""
        small, large = self.small, self.large
        small_live, block_bytes = small.live, large.block_bytes
        peak = self._peak
        for op, handle, nbytes in itertools.islice(events, lo, hi):
            if op == FREE:
                if handle in small_live:
                    small.free(handle)
                else:
                    large.free(handle)
            elif op == ALLOC:
                size = block_bytes(nbytes) if nbytes > 0 else 0
                if 0 < size <= SMALL_REQUEST_BYTES:
                    small.malloc(handle, size)
                else:
                    large.malloc(handle, nbytes)
                allocated = small.allocated_bytes + large.allocated_bytes
                if allocated > peak:
                    peak = allocated
            else:  # EMPTY_CACHE (as _replay_stretch reads any other op)
                self._peak = peak
                self._flush()
                peak = -1
                large.empty_cache()  # release_cached_blocks: the large pool, then the small
                small.empty_cache()
        self._peak = peak

    def _step(self, piece: DecodeSteps, step: int) -> None:
        """Loop step ``step`` of ``piece``: its large-pool events replayed, the allocated
        peak from them and the plan's running sums, its small-pool events by the skipper."""
        plan, skipper = self._plan(piece, step)
        large = self.large
        malloc, free, handle = large.malloc, large.free, piece.handle
        start = self.small.allocated_bytes
        first = piece.base + (step - piece.traced - 1) * piece.count + 1
        grown = step - piece.traced
        gaps, sums = plan.gap_peaks, plan.large_sums
        # the most allocated after an ALLOC of the step, less the small pool's at its start
        # (None: no ALLOC yet; the difference may be below 0, the step freeing first)
        best: int | None = None
        if gaps[0] is not None:
            best = gaps[0] + large.allocated_bytes
        for index, (is_alloc, a, b, c) in enumerate(plan.large_ops):
            if is_alloc:  # (1, ordinal, bytes at step K, slope)
                malloc(first + a, b + grown * c)
                seen = sums[index] + large.allocated_bytes
                best = seen if best is None or seen > best else best
            else:  # (0, back, ordinal, 0)
                free(handle(step - a, b))
            gap = gaps[index + 1]
            if gap is not None:
                seen = gap + large.allocated_bytes
                best = seen if best is None or seen > best else best
        if best is not None:
            self._peak = max(self._peak, start + best)
        self.skipped_events += skipper.replay(self.small, plan, step)

    def _plan(self, piece: DecodeSteps, step: int) -> tuple[StepPlan, Skipper]:
        skipper = self._skippers.get(id(piece))
        if skipper is None:
            plans = self._plans.setdefault((piece.template, piece.tags), Plans())
            skipper = self._skippers[id(piece)] = Skipper(piece, self.large.block_bytes, plans)
        return skipper.plan(step), skipper
