"""The one folder of vramcalc's disk caches: ``$VRAMCALC_CACHE_DIR``, else
``$XDG_CACHE_HOME/vramcalc`` (``~/.cache/vramcalc``), one subfolder per kind of entry:
``inventory`` (parameter counts), ``opprofile`` (a recipe's ops), ``allocator`` (simulated
runs), ``recipes`` (recipe traces), ``serving`` (simulated serving runs). Every entry is
keyed by what changes it, library versions included; a read-only or missing folder only
costs speed."""

from __future__ import annotations

import os
from pathlib import Path

KINDS = ("inventory", "opprofile", "allocator", "recipes", "serving")


def cache_root() -> Path:
    """The folder every kind of cache entry lives under (read from the environment each call)."""
    root = os.environ.get("VRAMCALC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vramcalc"
    )
    return Path(root)


def cache_dir(kind: str) -> Path:
    """The folder of one kind of entry (``KINDS``)."""
    if kind not in KINDS:
        raise ValueError(f"cache kind {kind!r} is not one of {', '.join(KINDS)}")
    return cache_root() / kind
