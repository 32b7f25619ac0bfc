"""Values past any physical meaning, refused in one line that names the flag.

A count beyond int64 (what torch and numpy count sizes in) cannot be a sequence length, a
batch or a number of tokens, and a plan that needs more than 1 PiB on one GPU (over 5,000
times the largest GPU's memory) is a typo, not a plan: both are errors before anything is
traced or simulated (``TrainingPlan``, ``RunLength``, ``estimate.Prepared.estimate``).
"""

from __future__ import annotations

#: past any physical meaning: a count beyond int64 (what torch and numpy count sizes in), and
#: a plan needing more than 1 PiB per GPU (over 5,000 times the largest GPU's memory)
MAX_COUNT = 2**63 - 1
MAX_DEVICE_BYTES = 2**50


def count_problem(flag: str, number: object) -> str | None:
    """Why ``number`` (of ``flag``) is past any physical meaning, or None."""
    if isinstance(number, int) and not isinstance(number, bool) and number > MAX_COUNT:
        return (
            f"{flag} {number} is past any physical meaning: more than int64 counts ({MAX_COUNT:,})."
        )
    return None


def bytes_problem(device_total_bytes: int, flags: str) -> str | None:
    """Why a plan that needs ``device_total_bytes`` per GPU is past any physical meaning (it
    names ``flags``, the options that made it so large), or None."""
    if device_total_bytes <= MAX_DEVICE_BYTES:
        return None
    units = [(2**70, "ZiB"), (2**60, "EiB"), (2**50, "PiB")]
    size = next(
        f"{device_total_bytes / u:,.1f} {name}" for u, name in units if device_total_bytes >= u
    )
    return (
        f"the plan needs {size} per GPU, past any physical meaning (more than 1 PiB, over "
        f"5,000 times the largest GPU's memory); check {flags}."
    )
