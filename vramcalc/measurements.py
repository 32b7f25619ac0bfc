"""The GPU measurements the harness records (``data/measurements/*.jsonl``): reading them, the plan
each one ran, and which ones the training estimate describes."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vramcalc.catalog import DATA_DIR
from vramcalc.errors import VramcalcError
from vramcalc.training_plan import PLAN_FIELDS, TrainingPlan, plan_from_values

MEASUREMENTS_DIR = DATA_DIR / "measurements"


MULTI_GPU_PREFIX = "multi-gpu/"


def is_multi_gpu(record: dict[str, Any]) -> bool:
    """A record of a multi-GPU plan (rank 0 of a simulated world, or a real N-GPU run)."""
    return bool(record.get("simulated_world_size")) or int(record.get("num_gpus") or 1) > 1


SERVE_RECORD_REASON = (
    "serving measurement (kind serve): the training estimate does not describe it; "
    "vramcalc serve's estimate is not compared yet"
)


def load_measurements(directory: Path = MEASUREMENTS_DIR) -> tuple[list[dict[str, Any]], list[str]]:
    """All records of ``directory/*.jsonl`` (file name kept in ``source_file``).

    A ``NAME.meta.json`` beside ``NAME.jsonl`` may give ``defaults``: run conditions the
    records of that file do not state (e.g. the allocator setting of a run made before the
    harness recorded it). They fill only fields a record lacks.
    """
    records: list[dict[str, Any]] = []
    files = sorted(directory.glob("*.jsonl")) if directory.is_dir() else []
    for path in files:
        meta_path = path.with_suffix(".meta.json")
        defaults: dict[str, Any] = {}
        if meta_path.is_file():
            try:
                defaults = dict(json.loads(meta_path.read_text()).get("defaults") or {})
            except (ValueError, AttributeError, TypeError) as err:
                raise VramcalcError(
                    f"{meta_path}: not a JSON object with 'defaults' ({err})"
                ) from err
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise VramcalcError(f"{path}:{number}: not a JSON line ({err})") from err
            for key, value in defaults.items():
                record.setdefault(key, value)
            record["source_file"] = path.name
            records.append(record)
    return records, [p.name for p in files]


def plan_of(record: Mapping[str, Any]) -> TrainingPlan:
    """The plan a measurement record describes (its plan fields; null ones take the default)."""
    return plan_from_values({k: record[k] for k in PLAN_FIELDS if k in record})


@dataclass(frozen=True)
class Gate:
    """A report's figures held against the committed report's: what got worse (``None``: no
    committed report to compare with, this run is the baseline), how far each validation
    figure stands from its target, and the targets not met."""

    regressions: tuple[str, ...] | None
    distances: tuple[str, ...]
    target_problems: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return bool(self.regressions)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
