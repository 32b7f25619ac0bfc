"""``python -m harness CASES -o OUT``: the ``measure`` command without the vramcalc CLI."""

from harness.cli import measure

measure(prog_name="python -m harness")
