"""The result record: one JSON object per case, with provenance.

Field names are shared with the estimator's JSON so that comparing the two is
a join: every field of ``TrainingPlan.to_dict()`` at top level, then the case
and result fields (``RESULT_FIELDS``), a few diagnostics (``EXTRA_FIELDS``)
and provenance (``PROVENANCE_FIELDS``). Every record has every field; a figure
that was not measured (GPU memory on CPU, anything after an OOM) is ``null``.

Units are in the names: ``*_bytes`` are bytes, ``*_seconds`` / ``*_s`` seconds.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.scenario import PLAN_FIELDS, Case

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
    "loaded_allocated_bytes",  # memory_allocated after the model (+ adapters) is built
    "tokens_per_second",  # seq_len * batch_size * grad_accum / step_seconds
    "step_seconds",  # median of the measured optimizer steps
    "mfu",  # model FLOPs utilization; None (not computed yet)
    "trainable_params",
    "total_params",  # as peft's get_nb_trainable_parameters counts (Params4bit x2)
    "compute_dtype_used",  # autocast dtype of the recipe: bf16, fp16 or fp32
)
EXTRA_FIELDS = (
    "step_seconds_measured",  # every measured step, in order
    "device_total_source",  # "nvml" or "mem_get_info"
    "device_baseline_bytes",  # device-wide used before this process touched CUDA (NVML only)
    "host_peak_rss_bytes",  # peak resident set of the worker process
    "lora_targets_used",  # leaf names peft wrapped (None for full fine-tuning)
    "optimizer_class",  # the optimizer the recipe really built
    "case_seconds",  # wall time of the worker, imports included
)
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
        props = torch.cuda.get_device_properties(0)
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
        "python_version": platform.python_version(),
        "measured_at": utc_now(),
        "vramcalc_commit": git_commit(),
        "hostname": socket.gethostname(),
    }


def make_record(
    case: Case,
    device: str,
    status: str,
    measurement: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The full result record of one case, every field present, in ``RECORD_FIELDS`` order."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    record: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
    record.update(case.plan.to_dict())
    record.update(
        case_id=case.case_id,
        split=case.split,
        recipe=case.recipe,
        steps=case.steps,
        warmup_steps=case.warmup_steps,
        seed=case.seed,
    )
    for key, value in (measurement or {}).items():
        if key in RECORD_FIELDS:
            record[key] = value
    for key, value in (provenance or {}).items():
        if key in PROVENANCE_FIELDS:
            record[key] = value
    record.update(device=device, status=status, error=error)
    if record["measured_at"] is None:
        record["measured_at"] = utc_now()
    if case.simulate is not None:
        record["simulate"] = case.simulate
    return record


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
