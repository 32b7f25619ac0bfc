"""``PYTORCH_CUDA_ALLOC_CONF`` read as torch reads it (``CUDAAllocatorConfig::parseArgs``), into the
settings of the allocator model (``allocator.AllocatorConfig``)."""

from __future__ import annotations

import re
from typing import Any

from vramcalc.errors import InvalidPlanError
from vramcalc.memory.allocator import (
    LARGE_SEGMENT_BYTES,
    MIB,
    MIN_LARGE_ALLOC_BYTES,
    ROUNDUP_INTERVALS,
    AllocatorConfig,
)

# Keys that do not change how the device pools are laid out (host allocator,
# locking, CUDA-graph capture): accepted and ignored.
_IGNORED_KEYS = (
    "release_lock_on_cudamalloc",
    "release_lock_on_hipmalloc",
    "graph_capture_record_stream_reuse",
)


# Keys that change the layout in ways the simulator does not follow.
_UNMODELLED_KEYS = {
    "per_process_memory_fraction": "is not modelled; give capacity_bytes instead",
    "throw_on_cudamalloc_oom": "is not modelled",
}


def parse_alloc_conf(env: str) -> dict[str, Any]:
    """``AllocatorConfig`` fields from a ``PYTORCH_CUDA_ALLOC_CONF`` string, read as
    ``AcceleratorAllocatorConfig::parseArgs`` and ``CUDAAllocatorConfig::parseArgs``
    read it; raises ``InvalidPlanError`` listing every bad or unmodelled key."""
    tokens = re.findall(r"[,:\[\]]|[^,:\[\]\s]+", env)
    values: dict[str, str | list[str]] = {}
    problems: list[str] = []
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if tokens[i + 1 : i + 2] != [":"] or i + 2 >= len(tokens):
            problems.append(f"PYTORCH_CUDA_ALLOC_CONF: expected '{key}:<value>'")
            break
        if tokens[i + 2] == "[":
            end = tokens.index("]", i) if "]" in tokens[i:] else len(tokens)
            values[key], i = tokens[i + 3 : end], end + 1
        else:
            values[key], i = tokens[i + 2], i + 3
        if i < len(tokens) and tokens[i] != ",":
            problems.append(f"PYTORCH_CUDA_ALLOC_CONF: expected ',' after '{key}'")
            break
        i += 1
    settings: dict[str, Any] = {}
    large_mb = _int_setting(values, "large_segment_size_mb", problems)
    if large_mb is not None:
        if large_mb * MIB <= MIN_LARGE_ALLOC_BYTES:
            problems.append("large_segment_size_mb must be > 10")
        settings["large_segment_bytes"] = large_mb * MIB
    min_split_mb = settings.get("large_segment_bytes", LARGE_SEGMENT_BYTES) // MIB
    for key, field in (
        ("max_split_size_mb", "max_split_size_bytes"),
        ("max_non_split_rounding_mb", "max_non_split_rounding_bytes"),
    ):
        mb = _int_setting(values, key, problems)
        if mb is not None and mb < min_split_mb:
            problems.append(f"{key} must be >= {min_split_mb} (large_segment_size_mb), got {mb}")
        elif mb is not None:
            settings[field] = mb * MIB
    for key, value in values.items():
        if key == "expandable_segments":
            if value not in ("True", "False"):
                problems.append(f"expandable_segments must be True or False, got {value!r}")
            settings["expandable_segments"] = value == "True"
        elif key == "roundup_power2_divisions":
            settings[key] = _roundup_divisions(value, problems)
        elif key == "garbage_collection_threshold":  # acts only under a memory fraction
            if not isinstance(value, str) or not 0 < _float(value) < 1:
                problems.append(f"garbage_collection_threshold must be in (0, 1), got {value!r}")
        elif key == "backend" and value != "native":
            problems.append(f"backend:{value} is not modelled (only the native allocator)")
        elif key in _UNMODELLED_KEYS and value != "False":
            problems.append(f"{key} {_UNMODELLED_KEYS[key]}")
        elif key not in _IGNORED_KEYS and not key.startswith("pinned_") and key not in (
            "backend", "large_segment_size_mb", "max_split_size_mb",
            "max_non_split_rounding_mb", *_UNMODELLED_KEYS,
        ):  # fmt: skip
            problems.append(f"unknown PYTORCH_CUDA_ALLOC_CONF key {key!r}")
    if problems:
        raise InvalidPlanError(problems)
    return settings


def _int_setting(values: dict[str, Any], key: str, problems: list[str]) -> int | None:
    value = values.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.isdigit():
        problems.append(f"{key} must be a whole number of MiB, got {value!r}")
        return None
    return int(value)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _roundup_divisions(value: str | list[str], problems: list[str]) -> tuple[int, ...]:
    """``parseRoundUpPower2Divisions``: one number for every interval, or a list
    ``[boundary_mb:divisions, ..., >:divisions]`` (boundaries powers of two)."""
    table = [0] * ROUNDUP_INTERVALS
    pairs = [value] if isinstance(value, str) else " ".join(value).split(" , ")
    first, last_index = True, 0
    for pair in pairs:
        parts = pair.split(" : ") if isinstance(value, list) else ["*", pair]
        count = parts[-1]
        if len(parts) != 2 or not count.isdigit() or int(count) & (int(count) - 1):
            problems.append(f"roundup_power2_divisions: bad entry {pair!r} (powers of two or 0)")
            continue
        boundary, divisions = parts[0], int(count)
        if boundary == "*":
            table = [divisions] * ROUNDUP_INTERVALS
        elif boundary == ">":
            table[last_index + 1 :] = [divisions] * (ROUNDUP_INTERVALS - last_index - 1)
        elif not boundary.isdigit() or int(boundary) & (int(boundary) - 1) or boundary == "0":
            problems.append(f"roundup_power2_divisions: interval {boundary!r} is not a power of 2")
        else:
            index = min(int(boundary).bit_length() - 1, ROUNDUP_INTERVALS - 1)
            if first:
                table[:index] = [divisions] * index
                first = False
            table[index], last_index = divisions, index
    return tuple(table)


def allocator_config(env: str, capacity_bytes: int | None = None) -> AllocatorConfig:
    """The allocator's settings from a ``PYTORCH_CUDA_ALLOC_CONF`` string, e.g.
    ``"expandable_segments:True,max_split_size_mb:128"``; raises ``InvalidPlanError`` naming
    every bad or unmodelled key."""
    return AllocatorConfig(capacity_bytes=capacity_bytes, **parse_alloc_conf(env))
