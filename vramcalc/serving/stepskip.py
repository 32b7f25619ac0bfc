"""A decoding step of a ``DecodeSteps`` piece replayed without laying it out, its small-pool
events left out where they provably repeat.

**The plan of a step** (``StepPlan``): which of the template's events go to the small pool
and which to the large one, and, for the allocated peak, the running sum of the small-pool
blocks (``splitreplay`` fact 2) at each large-pool event and its most between two of them.
A step's plan depends only on the class of each event's size (``size_class``), which changes
with the step only where a size grows past a rounding step (512 bytes) or past 1 MiB: steps
alike share one plan (``Skipper.pattern``), and a plan that only resizes small blocks of
another is made from it (``_resized``: the running sums moved by the size changes).

**Skipping** (``Skipper``). A decoding step runs the decoder layers one after the other,
alike, and a layer's small tensors live a few layers at most: the small pool comes back to
where it was a few layers before. Take checkpoints c1 < c2 = c1 + P of a step (starts of
decoder layers' runs of events, ``DecodeSteps.tags``; positions count the step's events)
such that the step's small-pool events from c1 to h = c1 + mP (m >= 2) repeat with period P
(``_shape``: the same ops and rounded sizes, each FREE of a block allocated the same number
of events before it, or of an older step's) and no FREE from c2 on frees a block allocated
before c1. Label each live block with the distance from the checkpoint to its FREE, -1 when
that is h - c2 or more or no step frees it (``Skipper._label``). Say the pool at c2 is the
pool at c1: the same segments, each with the same blocks (offset, bytes, free or allocated
with the same label). Then, event by event, the pool does from c2 what it did from c1: best
fit compares sizes and addresses, the same; a split or a merge depends on the neighbours,
the same; a FREE frees either a block allocated since the checkpoint, the twin of its
counterpart's, or one of the same label. So at every c1 + kP up to h the pool is the pool at
c1 (the blocks allocated in [c1, c2) are those allocated (k - 1)P events later), and its
reserved bytes stay (the segments are those at c1: a step releases none). The replay jumps
from c2 to h and renames those blocks: reserved bytes, blocks and what the rest of the run
frees are a plain replay's.

Only the segments changed between c1 and c2 can differ, and only they are compared (the
pool's journal keeps them as they were at c1): an unchanged segment holds the same blocks,
with the same labels unless one of them, allocated before c1, is freed between c2 and h,
which no FREE from c2 on does.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vramcalc.memory.allocator import SMALL_REQUEST_BYTES
from vramcalc.memory.smallpool import Blocks, SmallPool
from vramcalc.serving.compactrun import DecodeSteps

#: checkpoints back a step's pool is compared with: a pool may repeat every few layers
LAGS = 6
_NOT_BEFORE_HORIZON = -1


def size_class(nbytes: int, block_bytes: Callable[[int], int]) -> int:
    """0: no block (malloc never sees a size-0 tensor); the bytes of a small-pool block (the
    rounded request); -1: a large-pool block."""
    if nbytes <= 0:
        return 0
    size = block_bytes(nbytes)
    return size if size <= SMALL_REQUEST_BYTES else -1


@dataclass
class StepPlan:
    """A step's events by pool (module docstring). ``large_ops``: (1, ordinal, bytes at step
    K, slope) or (0, back, ordinal, 0) per large-pool event (and size-0 ALLOC); ``large_sums``:
    the small-pool bytes (from the step's start) before each; ``gap_peaks[g]``: the most
    small-pool bytes right after a small-pool ALLOC before large-pool event g (after the
    last for g = len), None without one. ``small_ops``: (1, ordinal, bytes), (0, ordinal, 0)
    freeing one of the step's, (2, back, ordinal) freeing an older step's, at template
    ``small_positions``; ``shape``: per template event, its small-pool shape (``_shape``)."""

    large_ops: list[tuple[int, int, int, int]]
    large_sums: list[int]
    gap_peaks: list[int | None]
    small_ops: list[tuple[int, int, int]]
    small_positions: list[int]
    shape: list[int]
    checkpoints: list[tuple[int, int]]  # (op index, template position) to compare pools at
    signed: list[int]  # per small op: its bytes, < 0 for a FREE
    gaps: list[tuple[int, int]]  # per gap: its small ops [lo, hi)
    base: StepPlan | None = None  # the plan this one was made from, sizes changed
    changed: list[int] = field(default_factory=list)  # template positions whose shape did
    jumps: dict[tuple[int, int], tuple[_Jump | None, int]] = field(default_factory=dict)


def _shape(position: int, size: int, entry: tuple[int, int, int], alloc_at: list[int]) -> int:
    """An event's small-pool shape: a small block's bytes for its ALLOC; for a FREE of one,
    -2 - how many events back it was allocated in the step, -1 when in an older step; 0 for
    a large-pool event."""
    is_alloc, a, b = entry
    if size <= 0:
        return 0
    if is_alloc:
        return size
    return -2 - (position - alloc_at[b]) if a == 0 else -1


def _full_plan(piece: DecodeSteps, classes: list[int], checkpoints: list[int]) -> StepPlan:
    """A step's plan, from the class of each template event's size."""
    alloc_at = piece.alloc_positions
    large_ops: list[tuple[int, int, int, int]] = []
    large_sums: list[int] = []
    gap_peaks: list[int | None] = []
    small_ops: list[tuple[int, int, int]] = []
    small_positions: list[int] = []
    signed: list[int] = []
    gaps: list[tuple[int, int]] = []
    shape = [
        _shape(p, c, e, alloc_at)
        for p, (c, e) in enumerate(zip(classes, piece.template, strict=True))
    ]
    total, gap, ordinal, low = 0, None, 0, 0
    for position, (is_alloc, a, b) in enumerate(piece.template):
        size = classes[position]
        if size > 0:
            small_positions.append(position)
            if is_alloc:
                small_ops.append((1, ordinal, size))
                signed.append(size)
                total += size
                gap = total if gap is None or total > gap else gap
            else:
                small_ops.append((0, b, 0) if a == 0 else (2, a, b))
                signed.append(-size)
                total -= size
        else:
            large_ops.append((1, ordinal, a, b) if is_alloc else (0, a, b, 0))
            large_sums.append(total)
            gap_peaks.append(gap)
            gaps.append((low, len(small_ops)))
            gap, low = None, len(small_ops)
        ordinal += is_alloc
    gap_peaks.append(gap)
    gaps.append((low, len(small_ops)))
    marks = [(bisect_left(small_positions, p), p) for p in checkpoints]
    return StepPlan(large_ops, large_sums, gap_peaks, small_ops, small_positions, shape, marks,
                    signed, gaps)  # fmt: skip


def _resized(base: StepPlan, sizes: dict[int, int]) -> StepPlan:
    """``base`` with the small blocks of some events resized (op index -> new bytes)."""
    ops, signed, shape = list(base.small_ops), list(base.signed), list(base.shape)
    deltas: dict[int, int] = {}
    changed = []
    for index, size in sizes.items():
        old = signed[index]
        new = size if old > 0 else -size
        if new == old:
            continue
        deltas[index] = new - old
        signed[index] = new
        kind, a, _ = ops[index]
        if kind == 1:
            ops[index] = (1, a, size)
            shape[base.small_positions[index]] = size
            changed.append(base.small_positions[index])
    order = sorted(deltas)
    running = list(itertools.accumulate(deltas[i] for i in order))

    def shift(before: int) -> int:  # the size change of the ops before op index ``before``
        n = bisect_left(order, before)
        return running[n - 1] if n else 0

    gap_peaks: list[int | None] = []
    for (low, high), peak in zip(base.gaps, base.gap_peaks, strict=True):
        n = bisect_left(order, low)
        if n < len(order) and order[n] < high:  # a resized event inside: sum it again
            total = sum(signed[:low]) if low else 0
            peak = None
            for index in range(low, high):
                total += signed[index]
                if signed[index] > 0 and (peak is None or total > peak):
                    peak = total
            gap_peaks.append(peak)
        else:
            gap_peaks.append(None if peak is None else peak + shift(low))
    # large-pool event g follows gap g: the small ops before it are those below its end
    large_sums = [total + shift(high)
                  for total, (_, high) in zip(base.large_sums, base.gaps, strict=False)]  # fmt: skip
    return StepPlan(base.large_ops, large_sums, gap_peaks, ops, base.small_positions, shape,
                    base.checkpoints, signed, base.gaps, base, sorted(changed))  # fmt: skip


def layer_checkpoints(piece: DecodeSteps) -> list[int]:
    """Template positions where a decoder layer's run of events starts."""
    tags = piece.tags
    return [i for i, tag in enumerate(tags) if tag >= 0 and (i == 0 or tags[i - 1] != tag)]


@dataclass(frozen=True)
class _Jump:
    """From checkpoint k to template position ``target`` (op index ``target_index``): the
    blocks allocated in [c1, c2), by ordinal, become those ``target - c2`` later."""

    target: int
    target_index: int
    renamed: tuple[tuple[int, int], ...]  # (ordinal in [c1, c2), ordinal then)


class Plans:
    """The plans of the steps of pieces alike (one template): one per pattern of size
    classes (``Skipper.pattern``), made from the first of the same pools by resizing."""

    def __init__(self) -> None:
        self.by_pattern: dict[tuple[int, ...], StepPlan] = {}
        # the first plan of each choice of pools for the events that may change, and where
        # each of its small-pool events is among them (template position -> op index)
        self.by_pools: dict[tuple[bool, ...], tuple[StepPlan, dict[int, int]]] = {}


class Skipper:
    """The small-pool replay of one piece's steps (module docstring), and its plans."""

    def __init__(self, piece: DecodeSteps, block_bytes: Callable[[int], int], plans: Plans):
        self.piece, self.block_bytes, self.plans = piece, block_bytes, plans
        self.origin = {h: (step, o) for step, handles in piece.traced_allocs.items()
                       for o, h in enumerate(handles)}  # fmt: skip
        # ordinal -> (back, template position) of the FREE that frees it in a later step
        self.freed_by: dict[int, tuple[int, int]] = {}
        for position, (is_alloc, back, ordinal) in enumerate(piece.template):
            if not is_alloc:
                self.freed_by[ordinal] = (back, position)
        self.ordinals = {p: o for o, p in enumerate(piece.alloc_positions)}
        self.checkpoints = layer_checkpoints(piece)
        slopes = piece.slopes
        # events whose size class may change with the step: (position, is ALLOC, a, b)
        self.variable = [
            (p, is_alloc, a, b)
            for p, (is_alloc, a, b) in enumerate(piece.template)
            if (is_alloc and b) or (not is_alloc and (a > 0 or slopes[b]))
        ]

    def pattern(self, step: int) -> tuple[int, ...]:
        """The size class (``size_class``) at step ``step`` of each template event whose
        size may change with the step (an ALLOC that grows, a FREE of a grown block or of
        an older step's)."""
        piece, block_bytes = self.piece, self.block_bytes
        grown = step - piece.traced
        return tuple(
            size_class(a + grown * b if is_alloc else piece.block_bytes(step - a, b), block_bytes)
            for _, is_alloc, a, b in self.variable
        )

    def plan(self, step: int) -> StepPlan:
        """Step ``step``'s plan."""
        pattern = self.pattern(step)
        plans = self.plans
        plan = plans.by_pattern.get(pattern)
        if plan is not None:
            return plan
        pools = tuple(size > 0 for size in pattern)
        found = plans.by_pools.get(pools)
        if found is None:
            piece, block_bytes = self.piece, self.block_bytes
            classes = [size_class(a if is_alloc else piece.sizes[b], block_bytes)
                       for is_alloc, a, b in piece.template]  # fmt: skip
            for (position, _, _, _), size in zip(self.variable, pattern, strict=True):
                classes[position] = size
            plan = _full_plan(piece, classes, self.checkpoints)
            index = {p: i for i, p in enumerate(plan.small_positions)}
            plans.by_pools[pools] = (plan, index)
        else:
            base, index = found
            plan = _resized(base, {index[p]: size for (p, _, _, _), size
                                   in zip(self.variable, pattern, strict=True) if size > 0})  # fmt: skip
        plans.by_pattern[pattern] = plan
        return plan

    def replay(self, pool: SmallPool, plan: StepPlan, step: int) -> int:
        """Step ``step``'s small-pool events into ``pool``; returns how many were left out."""
        piece = self.piece
        first = piece.base + (step - piece.traced - 1) * piece.count + 1
        handle, ops = piece.handle, plan.small_ops
        malloc, free = pool.malloc, pool.free

        def run(lo: int, hi: int) -> None:
            for kind, a, b in itertools.islice(ops, lo, hi):
                if kind == 1:
                    malloc(first + a, b)
                elif kind == 0:
                    free(first + a)
                else:
                    free(handle(step - a, b))

        records: list[dict[int, Blocks | None]] = []  # per checkpoint: segments as they were
        segments: list[int] = []  # per checkpoint: the pool's segments
        done = 0
        for k, (index, _) in enumerate(plan.checkpoints):
            pool.journal = records[-1] if records else None
            run(done, index)
            pool.journal = None
            done = index
            jump = self._jump(pool, plan, step, records, segments, k)
            if jump is not None:
                pool.rename({first + a: first + b for a, b in jump.renamed
                             if first + a in pool.live})  # fmt: skip
                run(jump.target_index, len(ops))
                return jump.target_index - index
            records.append({})
            segments.append(pool.segments)
        run(done, len(ops))
        return 0

    def _jump(
        self,
        pool: SmallPool,
        plan: StepPlan,
        step: int,
        records: list[dict[int, Blocks | None]],
        segments: list[int],
        k: int,
    ) -> _Jump | None:
        """A jump from checkpoint k, if the pool now is the pool at one of the ``LAGS``
        checkpoints before it and the events repeat from there."""
        now: dict[int, Blocks | None] = {}
        c2 = plan.checkpoints[k][1]
        for j in range(k - 1, max(k - LAGS, 0) - 1, -1):
            if segments[j] != pool.segments:
                continue
            jump = self._periodic(plan, j, k)
            if jump is None:
                continue
            c1, cap = plan.checkpoints[j][1], jump.target - c2
            changed: dict[int, Blocks | None] = {}
            for record in records[j:k]:
                for segment, blocks in record.items():
                    changed.setdefault(segment, blocks)
            for segment, blocks in changed.items():
                if segment not in now:
                    alive = pool.has_segment(segment)
                    now[segment] = pool.segment_blocks(segment) if alive else None
                if self._labelled(blocks, c1, cap, step) != self._labelled(
                    now[segment], c2, cap, step
                ):
                    break
            else:
                return jump
        return None

    def _periodic(self, plan: StepPlan, j: int, k: int) -> _Jump | None:
        """The jump from checkpoint k back to j, if the small-pool events repeat from j with
        period c2 - c1 for two periods or more and nothing from c2 on frees a block allocated
        before c1 (module docstring). Found once per plan; a resized plan takes its base's
        when no event it resized is among those the base's answer read."""
        known = plan.jumps.get((j, k))
        if known is None and plan.base is not None:
            known = plan.base.jumps.get((j, k))
            if known is None:
                self._periodic(plan.base, j, k)
                known = plan.base.jumps[(j, k)]
            c1 = plan.checkpoints[j][1]
            n = bisect_left(plan.changed, c1)
            if n < len(plan.changed) and plan.changed[n] < known[1]:
                known = None
        if known is None:
            known = plan.jumps[(j, k)] = self._find_period(plan, j, k)
        return known[0]

    def _find_period(self, plan: StepPlan, j: int, k: int) -> tuple[_Jump | None, int]:
        """``_periodic``'s answer, and the end of the events it read (from c1 on)."""
        (_, c1), (index, c2) = plan.checkpoints[j], plan.checkpoints[k]
        period, shape = c2 - c1, plan.shape
        periods = 1
        while (
            c1 + (periods + 1) * period <= len(shape)
            and shape[c1 + (periods - 1) * period : c1 + periods * period]
            == shape[c1 + periods * period : c1 + (periods + 1) * period]
        ):
            periods += 1
        read = min(len(shape), c1 + (periods + 1) * period)
        if periods < 2:
            return None, read
        for i in range(c2, c2 + period):
            kind = shape[i]
            if kind == -1 or (kind < -1 and i - (-2 - kind) < c1):
                return None, read
        target = c1 + periods * period
        target_index = bisect_left(plan.small_positions, target)
        ordinals = self.ordinals
        renamed = tuple(
            (ordinals[p], ordinals[p + target - c2])
            for p in plan.small_positions[plan.checkpoints[j][0] : index]
            if shape[p] > 0
        )
        return _Jump(target, target_index, renamed), read

    def _labelled(self, blocks: Blocks | None, checkpoint: int, cap: int, step: int) -> Any:
        if blocks is None:
            return None
        label = self._label
        return tuple((offset, size, None if handle is None else label(handle, checkpoint, cap, step))
                     for offset, size, handle in blocks)  # fmt: skip

    def _label(self, handle: int, checkpoint: int, cap: int, step: int) -> int:
        """When ``handle`` is freed, counted from ``checkpoint``: its FREE's template position
        in this step less the checkpoint, if below ``cap``; else -1."""
        piece = self.piece
        if piece.base < handle <= piece.top:
            made, ordinal = divmod(handle - piece.base - 1, piece.count)
            made += piece.traced + 1
        else:
            origin = self.origin.get(handle)
            if origin is None:  # not a loop step's: no step frees it
                return _NOT_BEFORE_HORIZON
            made, ordinal = origin
        freed = self.freed_by.get(ordinal)
        # (a traced step's block the step ``freed`` names did not free: no step frees it)
        if freed is None or made + freed[0] != step or not 0 <= freed[1] - checkpoint < cap:
            return _NOT_BEFORE_HORIZON
        return freed[1] - checkpoint
