"""The one search: the largest value that fits, for a judgement that is monotone (memory never
shrinks when the batch, the sequence or the context grows).

Values are counted in *units* ``1..max_units`` (a batch size, a number of sequence steps); the
caller's ``probe(units)`` estimates one value and says whether it fits. ``largest_fitting``
doubles until the plan no longer fits, then bisects; ``largest_fitting_near`` starts from a
guess (gallops away from it, then bisects), which takes a few probes when the guess is close.
Both return the probe at the answer and the probe one unit above it (``None`` where the answer
is ``max_units``), or ``(None, probe(1))`` when nothing fits. O(log k) probes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar


class Judged(Protocol):
    @property
    def fits(self) -> bool: ...


P = TypeVar("P", bound=Judged)


def largest_fitting(probe: Callable[[int], P], max_units: int) -> tuple[P | None, P | None]:
    """Largest ``k`` in ``1..max_units`` with ``probe(k).fits``: doubling, then bisection."""
    first = probe(1)
    if not first.fits:
        return None, first
    low, high = 1, None
    while high is None:  # double until it does not fit, or the limit
        if low >= max_units:
            return probe(low), None
        candidate = min(2 * low, max_units)
        if probe(candidate).fits:
            low = candidate
        else:
            high = candidate
    return _bisect(probe, low, high)


def largest_fitting_near(
    probe: Callable[[int], P], max_units: int, hint: int
) -> tuple[P | None, P | None]:
    """``largest_fitting`` starting from a guess ``hint``: gallop away from it, then bisect."""
    hint = min(max(hint, 1), max_units)
    if probe(hint).fits:
        low, distance = hint, 1
        while True:  # up until it does not fit
            if low >= max_units:
                return probe(low), None
            candidate = min(low + distance, max_units)
            if not probe(candidate).fits:
                high = candidate
                break
            low, distance = candidate, 2 * distance
    else:
        high, distance = hint, 1
        while True:  # down until it fits
            candidate = max(high - distance, 1)
            if probe(candidate).fits:
                low = candidate
                break
            if candidate == 1:
                return None, probe(1)
            high, distance = candidate, 2 * distance
    return _bisect(probe, low, high)


def _bisect(probe: Callable[[int], P], low: int, high: int) -> tuple[P, P]:
    """``probe(low)`` fits and ``probe(high)`` does not: close in on the boundary."""
    while high - low > 1:
        middle = (low + high) // 2
        if probe(middle).fits:
            low = middle
        else:
            high = middle
    return probe(low), probe(high)
