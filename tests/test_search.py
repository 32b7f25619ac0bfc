"""vramcalc.search: the one search for the largest value that fits, in log steps."""

from typing import NamedTuple

import pytest

from vramcalc.search import largest_fitting, largest_fitting_near


class Probe(NamedTuple):
    value: int
    fits: bool


def _probe_for(limit_value):
    seen = []

    def probe(units):
        seen.append(units)
        return Probe(units, units <= limit_value)

    return probe, seen


@pytest.mark.parametrize("answer", [1, 2, 3, 5, 8, 63, 64, 65, 1000])
def test_largest_fitting_finds_the_exact_boundary_in_log_steps(answer):
    probe, seen = _probe_for(answer)
    best, too_large = largest_fitting(probe, 1 << 20)
    assert best.value == answer and too_large.value == answer + 1
    assert len(set(seen)) <= 2 * answer.bit_length() + 2


def test_largest_fitting_when_nothing_fits_and_at_the_limit():
    probe, _ = _probe_for(0)
    best, too_large = largest_fitting(probe, 100)
    assert best is None and too_large.value == 1
    probe, _ = _probe_for(10**9)
    best, too_large = largest_fitting(probe, 100)
    assert best.value == 100 and too_large is None
    probe, _ = _probe_for(99)
    best, too_large = largest_fitting(probe, 100)
    assert (best.value, too_large.value) == (99, 100)


@pytest.mark.parametrize("hint", [1, 30, 37, 38, 50, 1000])
@pytest.mark.parametrize("answer", [0, 1, 37, 100])
def test_largest_fitting_near_gives_the_same_answer_from_any_guess(hint, answer):
    probe, seen = _probe_for(answer)
    assert largest_fitting_near(probe, 100, hint) == largest_fitting(_probe_for(answer)[0], 100)
    if abs(hint - answer) <= 1 and 0 < answer < 100:
        assert len(set(seen)) <= 3
