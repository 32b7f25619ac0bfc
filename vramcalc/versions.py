"""Which library versions a plan traced, and whether committed measurements back them.

The estimator runs the recipe's own code (transformers' model, peft's adapters) on fake
tensors, so its bytes are those of the installed versions. The committed GPU measurements
(``data/measurements/``) ran one set of versions, recorded in every record and listed in
``data/calibration.json`` (``measured_libraries``; ``tests/test_versions.py`` checks the two
agree). Every estimate says which versions it traced and warns where they differ.
"""

from __future__ import annotations

import functools

from vramcalc.calibration import calibration_json

#: the libraries whose code the trace runs (torch runs on the CPU here and on the GPU there:
#: its allocator is modelled, so its CPU version is not compared)
TRACED_LIBRARIES = ("transformers", "peft")


@functools.lru_cache(maxsize=1)
def installed_versions() -> tuple[tuple[str, str], ...]:
    """(library, version) of what the trace runs, read once per process."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "transformers", "peft", "accelerate"):
        try:
            out.append((name, version(name)))
        except PackageNotFoundError:
            out.append((name, "missing"))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def measured_versions() -> dict[str, str]:
    """The library versions of the committed GPU measurements (``data/calibration.json``)."""
    entry = calibration_json().get("measured_libraries") or {}
    return {str(k): str(v) for k, v in (entry.get("value") or {}).items()}


def version_note() -> str:
    """One assumption line: the versions traced, and whether measurements back them."""
    installed = dict(installed_versions())
    measured = measured_versions()
    traced = ", ".join(f"{name} {installed.get(name, 'missing')}" for name in TRACED_LIBRARIES)
    differ = [
        f"{name} {installed.get(name)} (measured: {measured[name]})"
        for name in TRACED_LIBRARIES
        if name in measured and installed.get(name) != measured[name]
    ]
    if differ:
        return (
            f"WARNING: traced with {', '.join(differ)}: no committed GPU measurement ran these "
            "versions, so this estimate follows their code but is unchecked (other versions "
            "allocate differently)"
        )
    return f"traced with {traced}: the versions the committed GPU measurements ran"
