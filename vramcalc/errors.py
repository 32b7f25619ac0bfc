"""Exceptions raised by the vramcalc library.

The CLI converts every ``VramcalcError`` into one ``Error: ...`` line (see
``cli.py``); nothing in the library prints or exits.
"""

from __future__ import annotations


class VramcalcError(Exception):
    """Base class of every error vramcalc raises on bad input or data."""


class UnknownModelError(VramcalcError):
    """``--model`` names no catalog entry, local path or reachable hub id."""


class UnknownGpuError(VramcalcError):
    """``--gpu`` names no entry of ``data/gpus.csv``."""


def _sentences(problems: list[str]) -> str:
    """Problems as one line of sentences: ``a. b?`` (no ``a.; b``)."""
    return " ".join(p if p.rstrip().endswith((".", "?", "!")) else p + "." for p in problems)


class InvalidPlanError(VramcalcError):
    """A training plan has one or more invalid fields.

    ``problems`` lists every problem found, each naming its CLI flag, so the
    user can fix them all at once.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(_sentences(self.problems))


class ConfigError(VramcalcError):
    """A model config file is missing, unreadable or malformed."""


class CatalogError(VramcalcError):
    """A bundled data file (model catalog, GPU catalog, calibration) is broken."""


class AllocatorTraceError(VramcalcError):
    """An allocator event sequence is malformed (a free of a handle that is not
    live, a handle allocated twice, an unknown op or trace action)."""


class ConfigFileError(VramcalcError):
    """A training config given with ``--from`` (axolotl, LLaMA-Factory, TRL, Trainer) is of an
    unknown format, unreadable, contradictory, or names a model that cannot be resolved; the
    message names the key."""


class SimulationError(VramcalcError):
    """A recipe's training step could not be traced on fake tensors, so its run cannot be
    simulated (the message names the way out: ``--allocator-model approximate``)."""
