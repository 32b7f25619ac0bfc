"""``trace/matching.py``: difflib's matching blocks, the same ones, from ``FastMatcher``."""

from __future__ import annotations

import difflib
import random

import pytest

from vramcalc.trace import matching


@pytest.mark.parametrize("dense", [1, 3, matching.DENSE])
def test_the_matching_blocks_are_difflibs(dense: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random sequences over small alphabets (many repeats: the hard case for the longest
    match), some near copies of each other as two steps of a trace are; ``dense`` 1 runs
    every row through numpy, the default mostly through the Python loop."""
    monkeypatch.setattr(matching, "DENSE", dense)
    rnd = random.Random(dense)
    for _ in range(1500):
        n, m, alphabet = rnd.randint(0, 70), rnd.randint(0, 70), rnd.randint(1, 8)
        a = [rnd.randint(0, alphabet) for _ in range(n)]
        b = [rnd.randint(0, alphabet) for _ in range(m)]
        if rnd.random() < 0.5:  # a with some of it replaced and some inserted
            b = a[: rnd.randint(0, n)] + b[: rnd.randint(0, m)] + a[rnd.randint(0, n) :]
        expected = difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
        assert matching.FastMatcher(a, b).get_matching_blocks() == expected, (a, b)


def test_tuples_of_a_trace_phase_match_as_in_difflib() -> None:
    """Events as ``_phase_twins`` signs them: (op, bytes, stream, label), long and repetitive."""
    rnd = random.Random(7)
    kinds = [(1, 8192, 0, "mm"), (2, 8192, 0, ""), (1, 4096, 0, "add"), (1, 512, 1, "empty")]
    step0 = [rnd.choice(kinds) for _ in range(3000)]
    step1 = [e for e in step0 if rnd.random() > 0.02]  # the first step's extra events
    for at in sorted(rnd.sample(range(len(step1)), 40), reverse=True):
        step1.insert(at, (1, 2048, 1, "cat"))  # the second step's prefetches
    expected = difflib.SequenceMatcher(None, step0, step1, autojunk=False).get_matching_blocks()
    assert matching.FastMatcher(step0, step1).get_matching_blocks() == expected
