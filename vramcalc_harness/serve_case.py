"""Serving cases: a ``ServePlan`` plus how to measure it (``kind: serve`` in a case list).

A serving case measures ``generate`` on a base model with LoRA adapters, as ``vramcalc
serve`` plans it. Its fields, flat as in a training case::

    kind: serve                    # what makes it a serving case
    model, quant, double_quant, dtype, attn     # the base, loaded as a training case loads it
    adapters: 2                    # LoRA adapters of one shape (0: the base alone, mode unmerged)
    rank, alpha, targets           # their shape (targets: names, all-linear, or peft's default)
    dora: false                    # DoRA adapters (peft use_dora; not with mode multi)
    mode: merged|unmerged|multi    # how they are applied (vramcalc.serve_plan)
    batch: 4                       # concurrent sequences
    context / prompt_tokens / new_tokens        # any two fix the third (``context_split``)
    cache: dynamic|static          # generate's cache_implementation
    steps: 3, warmup_steps: 1      # timed and untimed generate rounds
    seed, split, timeout_s         # as in a training case
    record_trace: false            # the caching allocator's own trace, as in a training case

``merged`` with N > 1 adapters measures one merged copy decoding its share of the batch
(``ceil(batch / N)``, as ``vramcalc.serving.serve`` plans each copy); the record says so
(``measured_model_copies``, ``measured_batch``, ``serve_limits``).

The record (``serve_kind``, built by ``record.make_record``) has the plan's fields, ``kind: "serve"``, the memory
figures under the training record's names (``peak_allocated_bytes``, ``peak_reserved_bytes``,
``device_total_bytes``), ``prefill_tokens_per_second``, ``decode_tokens_per_second``,
``record_trace`` and ``trace_file`` as a training record has them, and the training record's
provenance.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from vramcalc.errors import InvalidPlanError
from vramcalc.serve_plan import ServePlan, context_split, uniform_adapters
from vramcalc.training_plan import parse_targets, suggest
from vramcalc_harness.errors import CaseError
from vramcalc_harness.record import PROVENANCE_FIELDS, RecordKind
from vramcalc_harness.scenario import CASE_DEFAULTS, case_problems

KIND = "serve"
PLAN_KEYS = (
    "model",
    "quant",
    "double_quant",
    "dtype",
    "attn",
    "adapters",
    "rank",
    "alpha",
    "targets",
    "dora",
    "mode",
    "batch",
    "context",
    "prompt_tokens",
    "new_tokens",
    "cache",
)
CASE_KEYS = ("kind", "steps", "warmup_steps", "seed", "split", "timeout_s", "record_trace")
SERVE_FIELDS = PLAN_KEYS + CASE_KEYS
DEFAULT_STEPS = 3
DEFAULT_WARMUP_STEPS = 1


@dataclass(frozen=True)
class ServeCase:
    """One serving measurement: a plan and how many ``generate`` rounds to time."""

    plan: ServePlan
    steps: int = DEFAULT_STEPS
    warmup_steps: int = DEFAULT_WARMUP_STEPS
    seed: int = 0
    split: str = "calibration"
    timeout_s: float | None = None
    # record the caching allocator's alloc/free trace (vramcalc_harness.alloc_trace)
    record_trace: bool = False

    def __post_init__(self) -> None:
        problems = serve_case_problems(self.plan, self._case_values())
        if problems:
            raise CaseError(problems)

    def _case_values(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "seed": self.seed,
            "split": self.split,
            "timeout_s": self.timeout_s,
            "record_trace": self.record_trace,
        }

    @property
    def kind(self) -> str:
        return KIND

    @property
    def case_id(self) -> str:
        """First 16 hex digits of the SHA-256 of ``canonical_key()``."""
        return hashlib.sha256(self.canonical_key().encode()).hexdigest()[:16]

    def canonical_key(self) -> str:
        """Canonical JSON of what determines the measurement (kind, plan, rounds, seed).

        ``record_trace`` enters only when true, so the ids of untraced cases stay the same.
        """
        key: dict[str, Any] = {
            "kind": KIND,
            "plan": self.plan.to_dict(),
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "seed": self.seed,
        }
        if self.record_trace:
            key["record_trace"] = True
        return json.dumps(key, sort_keys=True, separators=(",", ":"))

    @property
    def measured_batch(self) -> int:
        """Sequences the measured model decodes: a merged copy decodes its share of the batch."""
        return self.plan.copy_batch

    def plan_fields(self) -> dict[str, Any]:
        """The plan as flat case fields (what ``from_dict`` reads back)."""
        plan = self.plan
        first = plan.adapters[0] if plan.adapters else None
        return {
            "kind": KIND,
            "model": plan.model,
            "quant": plan.quant,
            "double_quant": plan.double_quant,
            "dtype": plan.dtype,
            "attn": plan.attn,
            "adapters": len(plan.adapters),
            "rank": first.rank if first else None,
            "alpha": first.alpha if first else None,
            "targets": list(first.targets) if first and first.targets else None,
            "dora": first.dora if first else None,
            "mode": plan.mode,
            "batch": plan.batch,
            "context": plan.context,
            "prompt_tokens": plan.prompt_tokens,
            "new_tokens": plan.new_tokens,
            "cache": plan.cache,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.plan_fields(), **self._case_values()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServeCase:
        return serve_case_from_mapping(data, where="case")

    def describe(self) -> str:
        """One line of ``--dry-run``."""
        plan = self.plan
        first = plan.adapters[0] if plan.adapters else None
        shape = (f" r{first.rank}" + (" dora" if first.dora else "")) if first else ""
        return (
            f"{self.split:<11} {self.case_id} serve   {plan.model} {plan.quant} "
            f"{plan.mode} x{len(plan.adapters)}{shape} batch {plan.batch} "
            f"prompt {plan.prompt_tokens} new {plan.new_tokens} cache {plan.cache}"
        )


def serve_case_problems(plan: ServePlan | None, values: Mapping[str, Any]) -> list[str]:
    """Every problem of a serving case's own fields and of what the harness can run."""
    problems = case_problems({**CASE_DEFAULTS, **values}, None)
    record_trace = values.get("record_trace", False)
    if not isinstance(record_trace, bool):
        problems.append(f"record_trace must be true or false, got {record_trace!r}.")
    if plan is not None and not plan.adapters and plan.mode != "unmerged":
        problems.append(f"mode {plan.mode} needs adapters >= 1 (adapters 0: the base alone).")
    if plan is not None and plan.mode == "multi" and any(a.dora for a in plan.adapters):
        problems.append(
            "dora with mode multi: peft mixes adapters in one batch only without DoRA "
            "(Cannot pass `adapter_names` when DoRA is enabled)."
        )
    return problems


def serve_case_from_mapping(data: Mapping[str, Any], where: str) -> ServeCase:
    """Validate a flat mapping with ``kind: serve`` into a ``ServeCase`` (every problem)."""
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    problems = [
        f"{where}: unknown field {k!r} for kind serve.{suggest(k, SERVE_FIELDS)}"
        for k in values
        if k not in SERVE_FIELDS
    ]
    values = {k: v for k, v in values.items() if v is not None or k in ("alpha", "targets")}
    if values.get("kind") != KIND:
        problems.append(f"{where}: kind must be {KIND!r}, got {values.get('kind')!r}.")
    if "split" not in values:
        problems.append(
            f"{where}: split is missing; give calibration or validation "
            "(per case, per grid, or in defaults)."
        )
    if "model" not in values:
        problems.append(f"{where}: model is missing.")
    plan = None
    try:
        plan = _plan(values)
    except InvalidPlanError as err:
        problems.extend(f"{where}: {p}" for p in err.problems)
    except (TypeError, ValueError) as err:  # a field of the wrong shape
        problems.append(f"{where}: {err}")
    case_values = {
        k: values[k]
        for k in ("steps", "warmup_steps", "seed", "split", "timeout_s", "record_trace")
        if k in values
    }
    case_values.setdefault("split", "calibration")
    problems.extend(f"{where}: {p}" for p in serve_case_problems(plan, _with_defaults(case_values)))
    if problems or plan is None:
        raise CaseError(problems)
    return ServeCase(plan=plan, **case_values)


def _with_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "steps": DEFAULT_STEPS,
        "warmup_steps": DEFAULT_WARMUP_STEPS,
        "seed": 0,
        "timeout_s": None,
        **values,
    }


def _plan(values: Mapping[str, Any]) -> ServePlan:
    count = values.get("adapters", 1)
    rank = values.get("rank", 8)
    problems = []
    for name, value in (("adapters", count), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.append(f"{name} must be an integer >= 0, got {value!r}.")
    dora = values.get("dora", False)
    if not isinstance(dora, bool):
        problems.append(f"dora must be true or false, got {dora!r}.")
    alpha = values.get("alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        problems.append(f"alpha must be a number, got {alpha!r}.")
    targets = values.get("targets")
    if isinstance(targets, str):
        targets = parse_targets(targets)
    elif isinstance(targets, list):  # in order, as a training case and the string form keep them
        targets = tuple(str(t) for t in targets)
    elif targets is not None:
        problems.append(f"targets must be names or all-linear, got {targets!r}.")
    if problems:
        raise InvalidPlanError(problems)
    prompt, new = context_split(
        values.get("context"), values.get("prompt_tokens"), values.get("new_tokens")
    )
    plan_values = {
        k: values[k]
        for k in ("quant", "double_quant", "dtype", "attn", "mode", "batch", "cache")
        if k in values
    }
    adapters = uniform_adapters(count, rank, float(alpha) if alpha is not None else None, targets)
    if dora:
        adapters = tuple(replace(a, dora=True) for a in adapters)
    return ServePlan(
        model=str(values.get("model", "?")),
        adapters=adapters,
        prompt_tokens=prompt,
        new_tokens=new,
        **plan_values,
    )


# -- the record ----------------------------------------------------------------------------------
SERVE_RESULT_FIELDS = (
    "case_id",
    "split",
    "steps",  # timed generate rounds
    "warmup_steps",  # untimed generate rounds first
    "seed",
    "device",
    "status",
    "error",
    "peak_allocated_bytes",  # max_memory_allocated over load + adapters + generate
    "peak_reserved_bytes",  # max_memory_reserved over the same
    "device_total_bytes",  # peak device-wide used memory, CUDA context included
    "loaded_allocated_bytes",  # memory_allocated once the model and its adapters are ready
    "prefill_tokens_per_second",  # measured_batch * prompt_tokens / prefill_seconds
    "decode_tokens_per_second",  # (new_tokens - 1) * measured_batch / (generate - prefill)
    "prefill_seconds",  # median: generate with max_new_tokens=1 (time to first token)
    "generate_seconds",  # median: generate of all new_tokens
    "prefill_seconds_measured",  # every timed round, in order
    "generate_seconds_measured",
    "measured_model_copies",  # base models the measurement held (merged: 1 of N)
    "measured_batch",  # sequences the measured model decoded
    "serve_limits",  # where the measurement differs from the plan, in words
    "total_params",  # as peft counts (Params4bit x2); after merging, the merged model's
    "lora_targets_used",  # leaf names peft wrapped
    "adapter_names_used",  # multi: the adapter of each sequence of the batch
    "steady_peak_allocated_bytes",  # the peaks over the timed rounds only
    "steady_peak_reserved_bytes",
    "steady_device_total_bytes",
    "device_total_source",
    "device_baseline_bytes",
    "host_peak_rss_bytes",
    "case_seconds",
    "pytorch_cuda_alloc_conf",
    "cuda_total_bytes",
    "context_device_bytes",
    "nvml_total_bytes",
    "driver_reserved_bytes",
    "checkpoint_weights",  # "random" (random init) or "zeros" (a sparse checkpoint)
    "record_trace",  # whether the allocator trace was recorded (timing slightly perturbed)
    "trace_file",  # the trace's file name beside the JSONL (NAME_traces/), if recorded
)


def serve_record_fields() -> tuple[str, ...]:
    return PLAN_KEYS + ("kind",) + SERVE_RESULT_FIELDS + PROVENANCE_FIELDS


def serve_kind(case: ServeCase) -> RecordKind:
    """A serving case's record: its plan's fields, ``kind: serve``, what ``generate``
    measured (``SERVE_RESULT_FIELDS``) and the provenance."""
    values = case.plan_fields() | {
        "case_id": case.case_id,
        "split": case.split,
        "steps": case.steps,
        "warmup_steps": case.warmup_steps,
        "seed": case.seed,
        "record_trace": case.record_trace,
        "measured_model_copies": 1,
        "measured_batch": case.measured_batch,
        "serve_limits": serve_limits(case),
    }
    return RecordKind(serve_record_fields(), frozenset(SERVE_RESULT_FIELDS), values)


def serve_limits(case: ServeCase) -> list[str]:
    """Where the measurement is not the whole plan."""
    plan = case.plan
    if plan.mode == "merged" and plan.model_copies > 1:
        return [
            f"merged with {plan.model_copies} adapters: one merged copy measured, decoding "
            f"{case.measured_batch} of the batch's {plan.batch} sequences; the plan holds "
            f"{plan.model_copies} copies"
        ]
    return []
