"""The result record: one JSON object per case, with provenance.

Field names are shared with the estimator's JSON so that comparing the two is
a join: every field of ``TrainingPlan.to_dict()`` at top level, then the case
and result fields (``RESULT_FIELDS``), a few diagnostics (``EXTRA_FIELDS``)
and provenance (``PROVENANCE_FIELDS``). Every record has every field; a figure
that was not measured (GPU memory on CPU, anything after an OOM) is ``null``.

Units are in the names: ``*_bytes`` are bytes, ``*_seconds`` / ``*_s`` seconds.

A multi-GPU case is one record too (``merge_rank_records``): memory figures
are per GPU, the maximum over the ranks (the estimator's per-GPU figures),
``tokens_per_second`` is per GPU as in the estimator and
``tokens_per_second_all_gpus`` the total over the ranks; ``per_rank`` keeps
every rank's own figures and ``distributed_config`` the accelerate / DeepSpeed
configs the case ran under.

A simulated-world case (``simulate_world: N``, ``vramcalc_harness.simworld``) is rank 0
of an N-GPU world run alone: its memory figures are per GPU of the plan with
``num_gpus`` N, ``simulated_world_size`` says so and ``simulated_world_limits``
what it cannot show; its tokens/s are rank 0's alone (no all-GPU total), and
the speed fit leaves it out.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from vramcalc_harness.scenario import PLAN_FIELDS, SIMULATED_WORLD_LIMITS, Case

REPO_ROOT = Path(__file__).resolve().parent.parent
STATUSES = ("ok", "oom", "timeout", "error")

RESULT_FIELDS = (
    "case_id",
    "split",
    "recipe",
    "steps",
    "warmup_steps",
    "seed",
    "device",
    "status",
    "error",
    "peak_allocated_bytes",  # max_memory_allocated over load + training
    "peak_reserved_bytes",  # max_memory_reserved over load + training
    "device_total_bytes",  # peak device-wide used memory, CUDA context included
    "total_device_bytes_all_gpus",  # sum of device_total_bytes over the GPUs of the case
    "loaded_allocated_bytes",  # memory_allocated after the model (+ adapters) is built
    "tokens_per_second",  # per GPU: seq_len * batch_size * grad_accum / step_seconds
    "tokens_per_second_all_gpus",  # the sum over the GPUs (ranks) of the case
    "step_seconds",  # median of the measured optimizer steps
    "mfu",  # model FLOPs utilization; None (not computed yet)
    "trainable_params",
    "total_params",  # as peft's get_nb_trainable_parameters counts (Params4bit x2)
    "compute_dtype_used",  # autocast dtype of the recipe: bf16, fp16 or fp32
)
EXTRA_FIELDS = (
    "steady_peak_allocated_bytes",  # max_memory_allocated over the measured steps only
    "steady_peak_reserved_bytes",  # max_memory_reserved over the measured steps only
    "steady_device_total_bytes",  # device-wide peak over the measured steps only
    "step_seconds_measured",  # every measured step, in order
    "device_total_source",  # "nvml" or "mem_get_info"
    "device_baseline_bytes",  # device-wide used before this process touched CUDA (NVML only)
    "host_peak_rss_bytes",  # peak resident set of the worker process
    "lora_targets_used",  # leaf names peft wrapped (None for full fine-tuning)
    "optimizer_class",  # the optimizer the recipe really built
    "case_seconds",  # wall time of the worker, imports included
    "per_rank",  # multi-GPU: one dict per rank (PER_RANK_FIELDS), else None
    "distributed_config",  # multi-GPU: {"accelerate": {...}, "deepspeed": {...} | None}
    "pytorch_cuda_alloc_conf",  # PYTORCH_CUDA_ALLOC_CONF the worker ran under (None: unset)
    "cuda_total_bytes",  # mem_get_info total: what a process can use ("total capacity")
    "context_device_bytes",  # mem_get_info used right after the CUDA context exists
    "nvml_total_bytes",  # NVML v2 total (nvidia-smi's total)
    "driver_reserved_bytes",  # NVML v2 reserved: the driver's own, inside nvidia-smi's used
    "min_seconds",  # the case's minimum measured time
    "record_trace",  # whether the allocator trace was recorded (timing slightly perturbed)
    "trace_file",  # the trace's file name beside the JSONL (NAME_traces/), if recorded
    "simulated_world_size",  # N when rank 0 of an N-GPU world ran alone (vramcalc_harness.simworld)
    "simulated_world_limits",  # what that fake world cannot show (no NCCL buffers, no speed)
    "simulated_world_wrapper",  # what wrapped the model there (FSDP1, FSDP2, DDP + hook)
    "rank_parameter_bytes",  # simulated world: this rank's parameter bytes (local shards)
    "rank_gradient_bytes",  # ... its gradient bytes after the last optimizer step
    "rank_optimizer_state_bytes",  # ... its optimizer-state bytes
    "deepspeed_skipped_steps",  # ZeRO: optimizer steps DeepSpeed skipped (overflow), None otherwise
    "checkpoint_weights",  # "random" (random init) or "zeros" (sparse checkpoint, too large a model)
)
PER_RANK_FIELDS = (
    "rank",
    "local_rank",
    "status",
    "error",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "device_total_bytes",
    "device_baseline_bytes",
    "loaded_allocated_bytes",
    "tokens_per_second",
    "step_seconds",
    "host_peak_rss_bytes",
    "case_seconds",
)
MISSING_RANK_ERROR = "no result: the process was stopped or died before writing one"
PROVENANCE_FIELDS = (
    "gpu_name",
    "gpu_memory_bytes",
    "driver_version",
    "cuda_version",
    "torch_version",
    "transformers_version",
    "peft_version",
    "bitsandbytes_version",
    "accelerate_version",
    "deepspeed_version",
    "python_version",
    "measured_at",
    "vramcalc_commit",
    "hostname",
)
RECORD_FIELDS = PLAN_FIELDS + RESULT_FIELDS + EXTRA_FIELDS + PROVENANCE_FIELDS


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """``git rev-parse HEAD`` of the checkout the harness runs from, or None.

    ``$VRAMCALC_COMMIT`` stands in where the tree is a copy without ``.git``
    (e.g. a working tree shipped to a GPU machine).
    """
    if os.environ.get("VRAMCALC_COMMIT"):
        return os.environ["VRAMCALC_COMMIT"].strip()
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def driver_version() -> str | None:
    """NVIDIA driver version from NVML, else ``nvidia-smi``, else None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - fall back to nvidia-smi
        pass
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def collect_provenance(device: str) -> dict[str, Any]:
    """Where and with what a case is measured. GPU facts are None on CPU.

    Touches CUDA (creates a context) when ``device`` is cuda: call it in the worker.
    """
    import torch

    on_gpu = device.startswith("cuda")
    gpu_name = gpu_memory = None
    if on_gpu:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu_name, gpu_memory = props.name, int(props.total_memory)
    return {
        "gpu_name": gpu_name,
        "gpu_memory_bytes": gpu_memory,
        "driver_version": driver_version() if on_gpu else None,
        "cuda_version": torch.version.cuda if on_gpu else None,
        "torch_version": torch.__version__,
        "transformers_version": package_version("transformers"),
        "peft_version": package_version("peft"),
        "bitsandbytes_version": package_version("bitsandbytes"),
        "accelerate_version": package_version("accelerate"),
        "deepspeed_version": package_version("deepspeed"),
        "python_version": platform.python_version(),
        "measured_at": utc_now(),
        "vramcalc_commit": git_commit(),
        "hostname": socket.gethostname(),
    }


@dataclass(frozen=True)
class RecordKind:
    """What a kind of case (training, serving) puts in its record: every field in order, the
    fields a measurement fills, the case's own values, and the fields derived at the end."""

    fields: tuple[str, ...]
    measured: frozenset[str]
    values: Mapping[str, Any]
    finish: Callable[[dict[str, Any]], None] = lambda record: None


def make_record(
    case: Case | RecordKind,
    device: str,
    status: str,
    measurement: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The one record builder, for a training ``Case`` or any ``RecordKind`` (a serving case:
    ``serve_case.serve_kind``): every field present (None: not measured), in the kind's order,
    the case's values, what was measured, the provenance, the status."""
    kind = training_kind(case) if isinstance(case, Case) else case
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    record: dict[str, Any] = dict.fromkeys(kind.fields)
    record.update(kind.values)
    for key, value in (measurement or {}).items():
        if key in kind.measured:
            record[key] = value
    for key, value in (provenance or {}).items():
        if key in PROVENANCE_FIELDS:
            record[key] = value
    record.update(device=device, status=status, error=error)
    if record["measured_at"] is None:
        record["measured_at"] = utc_now()
    kind.finish(record)
    return record


def training_kind(case: Case) -> RecordKind:
    """A training case's record: ``RECORD_FIELDS``; the all-GPU totals of one GPU are its
    own figures; simulated runs say so."""

    def finish(record: dict[str, Any]) -> None:
        if case.plan.num_gpus == 1:
            record["tokens_per_second_all_gpus"] = record["tokens_per_second"]
            record["total_device_bytes_all_gpus"] = record["device_total_bytes"]
        if case.simulate is not None:
            record["simulate"] = case.simulate
        if case.simulate_world is not None:
            record["simulated_world_size"] = case.simulate_world
            record["simulated_world_limits"] = list(SIMULATED_WORLD_LIMITS)

    values = case.plan.to_dict() | {
        "case_id": case.case_id,
        "split": case.split,
        "recipe": case.recipe,
        "steps": case.steps,
        "warmup_steps": case.warmup_steps,
        "seed": case.seed,
        "min_seconds": case.min_seconds,
        "record_trace": case.record_trace,
    }
    return RecordKind(RECORD_FIELDS, frozenset(RECORD_FIELDS), values, finish)


# -- multi-GPU: one record from the ranks' records -------------------------------------------------
def merge_rank_records(
    case: Case,
    device: str,
    rank_records: Sequence[Mapping[str, Any]],
    provenance: Mapping[str, Any] | None = None,
    launch_failure: tuple[str, str] | None = None,
    distributed_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One record for a multi-GPU case from the records its ranks wrote.

    Per-GPU figures are the maximum over the ranks, totals the sum; a rank
    with no record (killed, or died) is a ``per_rank`` entry with status None.
    Status: ``oom`` when any rank ran out of memory, else ``error`` when any
    rank failed, else ``ok`` when every rank measured, else
    ``launch_failure`` (``(status, error)`` of the launch: a timeout, a
    crashed agent), else ``error`` naming the ranks that wrote nothing.
    """
    num_gpus = case.plan.num_gpus
    by_rank = {int(r["rank"]): r for r in rank_records if r.get("rank") is not None}
    per_rank = []
    for rank in range(num_gpus):
        own = by_rank.get(rank)
        entry = dict.fromkeys(PER_RANK_FIELDS)
        if own is None:
            entry.update(rank=rank, local_rank=rank, error=MISSING_RANK_ERROR)
        else:
            entry.update({k: own.get(k) for k in PER_RANK_FIELDS})
        per_rank.append(entry)
    status, error = _merged_status(per_rank, launch_failure)
    present = [by_rank[r] for r in sorted(by_rank)]
    first = present[0] if present else {}
    measurement: dict[str, Any] = {
        key: first.get(key)
        for key in (
            "compute_dtype_used",
            "trainable_params",
            "total_params",
            "lora_targets_used",
            "optimizer_class",
            "device_total_source",
        )
    }
    for key in (
        "peak_allocated_bytes",
        "peak_reserved_bytes",
        "device_total_bytes",
        "steady_peak_allocated_bytes",
        "steady_peak_reserved_bytes",
        "steady_device_total_bytes",
        "loaded_allocated_bytes",
        "device_baseline_bytes",
        "step_seconds",
        "host_peak_rss_bytes",
        "case_seconds",
    ):
        measurement[key] = _max(r.get(key) for r in present)
    measurement["total_device_bytes_all_gpus"] = _sum([e["device_total_bytes"] for e in per_rank])
    all_gpus = _sum([e["tokens_per_second"] for e in per_rank])
    measurement["tokens_per_second_all_gpus"] = all_gpus
    measurement["tokens_per_second"] = all_gpus / num_gpus if all_gpus is not None else None
    steps = [r.get("step_seconds_measured") for r in present]
    if len(steps) == num_gpus and all(steps) and len({len(s) for s in steps}) == 1:
        measurement["step_seconds_measured"] = [max(column) for column in zip(*steps, strict=True)]
    measurement["per_rank"] = per_rank
    measurement["distributed_config"] = dict(distributed_config) if distributed_config else None
    merged_provenance = {k: first.get(k) for k in PROVENANCE_FIELDS}
    for key, value in (provenance or {}).items():
        if merged_provenance.get(key) is None:
            merged_provenance[key] = value
    return make_record(case, device, status, measurement, merged_provenance, error)


def _merged_status(
    per_rank: list[dict[str, Any]], launch_failure: tuple[str, str] | None
) -> tuple[str, str | None]:
    for wanted in ("oom", "error"):
        failed = [e for e in per_rank if e["status"] == wanted]
        if failed:
            return wanted, "\n".join(f"rank {e['rank']}: {e['error']}" for e in failed)
    missing = [e["rank"] for e in per_rank if e["status"] is None]
    if not missing:  # every rank measured: a failure after that (teardown) changes nothing
        return "ok", None
    if launch_failure is not None:
        return launch_failure
    return "error", f"ranks {missing}: {MISSING_RANK_ERROR}."


def _max(values: Iterable[Any]) -> Any:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _sum(values: list[Any]) -> Any:
    """The sum, or None unless every value is there (a partial total would mislead)."""
    return sum(values) if values and all(v is not None for v in values) else None


# -- JSON lines ----------------------------------------------------------------------------------
def append_record(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line and flush it to disk, so a crash loses nothing written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=False, allow_nan=False) + "\n"
    with path.open("a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:  # a line cut short by a crash must not swallow this one
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write(line.encode())
        handle.flush()
        os.fsync(handle.fileno())


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a JSON-lines file (a line cut short by a crash is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records
