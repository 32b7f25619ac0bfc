"""difflib's matching blocks of two long event sequences, the same blocks in less time.

``worldrepeat._phase_twins`` aligns each phase of a world trace's first step with the same
phase of its second on what each event does, with ``difflib.SequenceMatcher`` (no junk,
``autojunk`` off). Under ZeRO-3 the steps differ all along (the first records the module
order, the second prefetches), so a phase of 15,000 events is matched in thousands of short
blocks, and each ``find_longest_match`` runs difflib's dynamic programme over a long range
again: 16 of the 53 CPU-s of an 8B QLoRA ZeRO-3 trace. ``FastMatcher`` runs the same
programme -- row ``i`` holds, for each position ``j`` of ``a[i]`` in ``b``, the length of the
match ending at ``(i, j)``; the first longest one found, scanning ``i`` then ``j`` upwards,
wins -- with each element's positions cut to ``[blo, bhi)`` once per call instead of skipped
one by one, and a row of many positions computed by numpy: the same ``Match`` for every
call (``tests/trace/test_matching.py`` checks it against difflib), 3 times faster on that
trace (16.4 to 5.2 CPU-s).
"""

from __future__ import annotations

import difflib
from bisect import bisect_left

import numpy as np

DENSE = 24  # a row with this many positions in range is computed by numpy


class FastMatcher(difflib.SequenceMatcher):  # type: ignore[type-arg]
    """``SequenceMatcher(None, a, b, autojunk=False)`` whose ``find_longest_match`` gives the
    same matches: the same dynamic programme over the positions of ``a[i]`` in ``b``, each
    row restricted to ``[blo, bhi)`` once per element and call, and a row of many positions
    run by numpy. With no junk (``isjunk`` None, ``autojunk`` off) every element of ``b`` is
    in ``b2j``."""

    def __init__(self, a, b):  # noqa: ANN001
        super().__init__(None, a, b, autojunk=False)

    def set_seq2(self, b):  # noqa: ANN001, ANN201
        super().set_seq2(b)
        many = ((e, js) for e, js in self.b2j.items() if len(js) >= DENSE)
        self._arrays = {e: np.asarray(js, dtype=np.int64) for e, js in many}

    def find_longest_match(self, alo=0, ahi=None, blo=0, bhi=None):  # noqa: ANN001, ANN201
        a, b, b2j, arrays = self.a, self.b, self.b2j, self._arrays
        if ahi is None:
            ahi = len(a)
        if bhi is None:
            bhi = len(b)
        besti, bestj, bestsize = alo, blo, 0
        rows: dict = {}  # element -> its positions in [blo, bhi): a list, or an array if many
        prev: dict[int, int] = {}  # the previous row: j -> length of the match ending there
        prev_arrays = None  # the same as (j's, lengths) arrays when numpy computed it
        for i in range(alo, ahi):
            elt = a[i]
            row = rows.get(elt)
            if row is None:
                js = b2j.get(elt, [])
                lo, hi = bisect_left(js, blo), bisect_left(js, bhi)
                row = rows[elt] = arrays[elt][lo:hi] if hi - lo >= DENSE else js[lo:hi]
            if type(row) is list:
                if prev_arrays is not None:
                    prev = dict(zip(prev_arrays[0].tolist(), prev_arrays[1].tolist(), strict=True))
                    prev_arrays = None
                get = prev.get
                new = {}
                for j in row:
                    k = new[j] = get(j - 1, 0) + 1
                    if k > bestsize:
                        besti, bestj, bestsize = i - k + 1, j - k + 1, k
                prev = new
                continue
            if prev_arrays is None:
                prev_arrays = (
                    np.fromiter(prev.keys(), dtype=np.int64, count=len(prev)),
                    np.fromiter(prev.values(), dtype=np.int64, count=len(prev)),
                )
            pj, pk = prev_arrays
            if len(pj):
                at = pj.searchsorted(row - 1)
                at[at == len(pj)] = 0
                k = (pj[at] == row - 1) * pk[at] + 1
            else:
                k = np.ones(len(row), dtype=np.int64)
            top = int(k.max())
            if top > bestsize:
                first = int(k.argmax())
                besti, bestj, bestsize = i - top + 1, int(row[first]) - top + 1, top
            prev_arrays = (row, k)
        # difflib extends the best match by equal elements on each side (none can be with no
        # junk left out of b2j; kept so that the answer is difflib's in every case)
        while besti > alo and bestj > blo and a[besti - 1] == b[bestj - 1]:
            besti, bestj, bestsize = besti - 1, bestj - 1, bestsize + 1
        while (
            besti + bestsize < ahi
            and bestj + bestsize < bhi
            and a[besti + bestsize] == b[bestj + bestsize]
        ):
            bestsize += 1
        return difflib.Match(besti, bestj, bestsize)
