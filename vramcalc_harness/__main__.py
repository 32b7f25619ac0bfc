"""``python -m vramcalc_harness CASES -o OUT``: the ``measure`` command without the vramcalc CLI."""

from vramcalc_harness.cli import measure

measure(prog_name="python -m vramcalc_harness")
