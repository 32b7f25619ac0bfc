"""``vramcalc check``: a fits-gate for training configs kept in git.

Each config file (axolotl, LLaMA-Factory, TRL, HF Trainer) is read as ``--from`` reads it,
with the flags given on top, estimated as ``plan`` estimates it (the run simulated), and
judged against one GPU with the one headroom (``budget.judge``). ``CheckResult.fits`` is
what a CI job exits on; ``to_dict`` is the ``--json`` a later run compares against
(``compare``: the change of each config's device total in bytes and per cent).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vramcalc.budget import DEFAULT_HEADROOM, Verdict, judge
from vramcalc.catalog import Gpu
from vramcalc.configs import FilePlan, read_plan_file
from vramcalc.errors import ConfigFileError
from vramcalc.estimate import MemoryEstimate, prepare

#: the --json format a baseline must have (``compare`` refuses another)
FORMAT = "vramcalc-check/1"


@dataclass(frozen=True)
class CheckedPlan:
    """One config file: its plan, its estimate and the verdict on the GPU."""

    path: str
    file_plan: FilePlan
    memory: MemoryEstimate
    verdict: Verdict

    @property
    def fits(self) -> bool:
        return self.verdict.fits

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "fits": self.fits,
            "device_total_bytes": self.memory.device_total_bytes,
            "budget_bytes": self.verdict.budget_bytes,
            "margin_bytes": self.verdict.margin_bytes,
            "blocked_by": self.verdict.blocker,
            "allocator_model": self.memory.allocator_model,
            "plan": self.memory.plan.to_dict(),
        }


@dataclass(frozen=True)
class Change:
    """A config's device total against the baseline's (None: not in the baseline)."""

    path: str
    before_bytes: int | None
    after_bytes: int

    @property
    def change_bytes(self) -> int | None:
        return None if self.before_bytes is None else self.after_bytes - self.before_bytes

    @property
    def change_fraction(self) -> float | None:
        if not self.before_bytes:
            return None
        return self.after_bytes / self.before_bytes - 1.0


@dataclass(frozen=True)
class CheckResult:
    gpu: Gpu
    headroom: float
    plans: tuple[CheckedPlan, ...]
    changes: tuple[Change, ...] = ()  # against a baseline, when one was given

    @property
    def fits(self) -> bool:
        """Every plan fits: a CI job's exit status 0."""
        return all(p.fits for p in self.plans)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "gpu": self.gpu.name,
            "headroom": self.headroom,
            "fits": self.fits,
            "plans": [p.to_dict() for p in self.plans],
        }
        if self.changes:
            out["changes"] = [
                {
                    "path": c.path,
                    "before_bytes": c.before_bytes,
                    "after_bytes": c.after_bytes,
                    "change_bytes": c.change_bytes,
                    "change_fraction": c.change_fraction,
                }
                for c in self.changes
            ]
        return out


def config_paths(patterns: Iterable[str]) -> list[str]:
    """The files ``patterns`` name (a path or a glob each), in the order given, each once; a
    pattern that names no file is a ``ConfigFileError`` naming it."""
    out: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        files = [f for f in found if Path(f).is_file()]
        if not files:
            raise ConfigFileError(f"--from {pattern}: no such file")
        out.extend(f for f in files if f not in out)
    return out


def check_plans(
    patterns: Iterable[str],
    gpu: Gpu,
    headroom: float = DEFAULT_HEADROOM,
    flags: Mapping[str, Any] | None = None,
    baseline: Mapping[str, Any] | None = None,
    allocator_model: str | None = None,
) -> CheckResult:
    """Read each config (``flags`` on top), estimate it, judge it on ``gpu``; compare with a
    ``baseline`` (a ``to_dict`` of an earlier check) when given."""
    checked = []
    for path in config_paths(patterns):
        file_plan = read_plan_file(path, dict(flags or {}))
        plan = file_plan.plan
        memory = prepare(plan.model, plan).estimate(plan, allocator_model)
        checked.append(
            CheckedPlan(
                path, file_plan, memory, judge(memory.device_total_bytes, gpu, headroom, plan)
            )
        )
    changes: tuple[Change, ...] = ()
    if baseline is not None:
        changes = compare(checked, baseline)
    return CheckResult(gpu, headroom, tuple(checked), changes)


def read_baseline(path: str | Path) -> dict[str, Any]:
    """A baseline written by ``vramcalc check --json`` (``ConfigFileError`` otherwise)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigFileError(f"--baseline {path}: not a readable JSON file ({err})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigFileError(
            f"--baseline {path}: not the output of 'vramcalc check --json' (format {FORMAT})"
        )
    return data


def compare(checked: Iterable[CheckedPlan], baseline: Mapping[str, Any]) -> tuple[Change, ...]:
    before = {str(p["path"]): int(p["device_total_bytes"]) for p in baseline.get("plans", ()) or ()}
    return tuple(Change(p.path, before.get(p.path), p.memory.device_total_bytes) for p in checked)
