"""Exceptions of the measurement harness.

All derive from ``vramcalc.errors.VramcalcError``, so the CLI turns each into
one ``Error: ...`` line. A failing *case* is not an exception of the run: the
launcher records it (``status: "oom" | "timeout" | "error"``) and goes on.
"""

from __future__ import annotations

from vramcalc.errors import VramcalcError


class HarnessError(VramcalcError):
    """A measurement run cannot start or a case cannot be prepared."""


class CaseError(HarnessError):
    """A case file or case has invalid fields; ``problems`` lists every one."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class MissingDependencyError(HarnessError):
    """A case needs a package that is not installed (e.g. bitsandbytes)."""


class InstrumentError(HarnessError):
    """The memory instrument read a known allocation back outside tolerance."""
