"""Launcher: run every case in a fresh worker process and append its result.

For each case not yet in the output file: make sure the random-init
checkpoint exists (``python -m vramcalc_harness.worker prepare``, its own process), then
measure the case (``python -m vramcalc_harness.worker run``) under a per-case timeout.
The result -- ``ok``, ``oom``, ``timeout`` or ``error`` -- is appended to the
JSON-lines output as soon as the case ends, so a crash or a kill loses
nothing already measured, and a rerun skips every case already there (same
``case_id`` on the same device). A tqdm bar shows cases done / left and the
last case's seconds. On CUDA, a ``probe`` worker first records provenance and
checks the memory instrument (a known allocation must read back within 1 %).

A multi-GPU case (``num_gpus > 1``) is measured by ``python -m vramcalc_harness.agent``
(accelerate's launch env + ``torch.distributed.run``, one worker per GPU)
under configs written to ``SCRATCH/launch/<case_id>/``; its ranks' records
are merged into one (``vramcalc_harness.record.merge_rank_records``). On a timeout the
whole process tree is killed: the agent's group and every rank, which
torch.distributed.run starts in sessions of their own. Every process the
launcher starts has NVLink multicast off (``NVLS_OFF_ENV``).

A serving case (``kind: serve``, ``vramcalc_harness.serve_case``) goes the same way on one device:
the same checkpoint, a ``run`` worker that times ``generate`` (``vramcalc_harness.serve_step``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vramcalc.catalog import resolve_model
from vramcalc.errors import VramcalcError
from vramcalc_harness.build import checkpoint_dir, checkpoint_ready, touch_checkpoint
from vramcalc_harness.distributed import (
    NVLS_OFF_ENV,
    check_machine,
    is_distributed,
    write_launch_configs,
)
from vramcalc_harness.errors import HarnessError
from vramcalc_harness.measure import record_kind
from vramcalc_harness.processes import kill_process_tree
from vramcalc_harness.record import (
    PROVENANCE_FIELDS,
    REPO_ROOT,
    append_record,
    collect_provenance,
    make_record,
    merge_rank_records,
    read_records,
    utc_now,
)
from vramcalc_harness.scenario import Case, alloc_conf_for
from vramcalc_harness.serve_case import ServeCase
from vramcalc_harness.simworld import check_simulated_machine, simulated_launch_env, uses_accelerate

DEFAULT_TIMEOUT_S = 900.0
LOG_TAIL_LINES = 12
DEVICES = ("auto", "cuda", "cpu")


@dataclass(frozen=True)
class PlannedCase:
    """A case of the run and whether the output file already has its result."""

    case: Case | ServeCase
    done: bool


@dataclass(frozen=True)
class RunSummary:
    """What a run did: how many cases ran, were skipped, and their statuses."""

    output: Path
    device: str
    total: int
    skipped: int
    statuses: dict[str, int] = field(default_factory=dict)
    stopped_early: bool = False

    @property
    def ran(self) -> int:
        return sum(self.statuses.values())

    @property
    def left(self) -> int:
        return self.total - self.skipped - self.ran


@dataclass(frozen=True)
class WorkerOutcome:
    result: dict[str, Any] | None
    timed_out: bool
    returncode: int | None
    log_tail: str
    seconds: float
    rank_results: tuple[dict[str, Any], ...] = ()  # multi-GPU: what each rank wrote


def default_scratch_dir() -> Path:
    """``$VRAMCALC_SCRATCH`` or ``<tmp>/vramcalc-scratch``."""
    env = os.environ.get("VRAMCALC_SCRATCH")
    return Path(env) if env else Path(tempfile.gettempdir()) / "vramcalc-scratch"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``. Does not create a CUDA context."""
    if device not in DEVICES:
        raise HarnessError(f"--device {device!r} is not one of {', '.join(DEVICES)}.")
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise HarnessError(
            "--device cuda: no CUDA GPU is visible to torch; use --device cpu or auto."
        )
    return "cpu"


def finished_case_ids(output: Path, device: str, retry_errors: bool = False) -> set[str]:
    """Case ids the output already holds for ``device`` (the latest record of each counts)."""
    latest: dict[str, dict[str, Any]] = {}
    for record in read_records(output):
        if record.get("device") == device and record.get("case_id"):
            latest[record["case_id"]] = record
    return {
        case_id
        for case_id, record in latest.items()
        if not (retry_errors and record.get("status") in ("error", "timeout"))
    }


def plan_run(
    cases: Iterable[Case | ServeCase], output: Path, device: str, retry_errors: bool = False
) -> list[PlannedCase]:
    """Every case with its done flag, in order (what ``--dry-run`` shows)."""
    done = finished_case_ids(output, device, retry_errors)
    return [PlannedCase(case, case.case_id in done) for case in cases]


def check_models(cases: Iterable[Case | ServeCase]) -> list[str]:
    """A problem for each distinct model that does not resolve (catalog or local path)."""

    problems = []
    for name in dict.fromkeys(case.plan.model for case in cases):
        try:
            resolve_model(name)
        except VramcalcError as err:
            problems.append(str(err))
    return problems


# -- worker processes ------------------------------------------------------------------------------
def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def trace_dir_for(output: Path) -> Path:
    """Where the allocator traces of ``output``'s cases go: ``NAME_traces/`` beside it."""
    return output.parent / f"{output.stem}_traces"


def spawn_worker(
    mode: str,
    spec: dict[str, Any],
    timeout_s: float,
    log_path: Path,
    accelerate_config_file: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> WorkerOutcome:
    """Run ``python -m vramcalc_harness.worker MODE`` in a fresh process; kill its tree on timeout.

    With ``accelerate_config_file`` the process is ``vramcalc_harness.agent``, which
    starts one worker per GPU; each rank's record comes back in ``rank_results``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["VRAMCALC_LAUNCHER_PID"] = str(os.getpid())
    env.update(NVLS_OFF_ENV)
    env.update(extra_env or {})  # a simulated world's launch env
    if "case" in spec:  # the plan's allocator mode, and nothing inherited
        conf = alloc_conf_for(spec["case"].get("allocator") or "default")
        if conf is None:
            env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        else:
            env["PYTORCH_CUDA_ALLOC_CONF"] = conf
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vramcalc-worker-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        worker_args = [mode, str(spec_path), str(result_path)]
        if accelerate_config_file is None:
            command = [sys.executable, "-m", "vramcalc_harness.worker", *worker_args]
        else:
            command = [
                sys.executable,
                "-m",
                "vramcalc_harness.agent",
                accelerate_config_file,
                *worker_args,
            ]
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(REPO_ROOT),
                start_new_session=True,  # its own process group, killed whole on timeout
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                if proc.poll() is None:
                    kill_process_tree(proc)
        result = (
            json.loads(result_path.read_text()) if result_path.exists() and not timed_out else None
        )
        rank_results = tuple(
            json.loads(path.read_text()) for path in sorted(Path(tmp).glob("result.rank*.json"))
        )
    return WorkerOutcome(
        result,
        timed_out,
        proc.returncode,
        _tail(log_path),
        time.perf_counter() - started,
        rank_results,
    )


def _failure(outcome: WorkerOutcome, what: str, timeout_s: float) -> tuple[str, str]:
    """(status, error) of a worker that produced no record."""
    if outcome.timed_out:
        return "timeout", f"{what}: no result after {timeout_s:g} s; worker killed."
    if outcome.result is not None and outcome.result.get("error"):
        return outcome.result.get("status", "error"), f"{what}: {outcome.result['error']}"
    text = outcome.log_tail
    status = (
        "oom" if "CUDA out of memory" in text or "CUDA error: out of memory" in text else "error"
    )
    return status, f"{what}: worker exited with code {outcome.returncode} and no result.\n{text}"


def measure_case(
    case: Case | ServeCase,
    device: str,
    timeout_s: float,
    scratch_dir: Path,
    provenance: dict[str, Any],
    trace_dir: Path | None = None,
    sparse_checkpoints: bool = False,
) -> dict[str, Any]:
    """Prepare (if needed) and measure one case in fresh processes; always returns a record.

    A case with ``record_trace`` writes its allocator trace to ``trace_dir/<case_id>.json.gz``.
    ``sparse_checkpoints``: a checkpoint too large for the scratch disk is written sparse,
    all zeros (``vramcalc_harness.build.write_sparse_checkpoint``).
    """

    timeout_s = case.timeout_s or timeout_s
    log_path = scratch_dir / "logs" / f"{case.case_id}.log"
    spec: dict[str, Any] = {
        "case": case.to_dict(),
        "device": device,
        "scratch_dir": str(scratch_dir),
        "sparse_checkpoints": sparse_checkpoints,
    }
    if case.record_trace and trace_dir is not None:
        spec["trace_path"] = str(trace_dir / f"{case.case_id}.json.gz")
    status, error = "error", None
    try:
        checkpoint = checkpoint_dir(case.plan, scratch_dir)
    except VramcalcError as err:
        return _fallback_record(case, device, "error", f"model: {err}", provenance)
    launch: dict[str, Any] | None = None
    simulated_env: dict[str, str] | None = None
    if isinstance(case, Case) and is_distributed(case.plan):
        try:
            if case.simulate_world is not None:
                check_simulated_machine(case, device)
            else:
                check_machine(case.plan, device)
            launch = write_launch_configs(case, device, scratch_dir / "launch" / case.case_id)
            if case.simulate_world is not None:
                simulated_env = simulated_launch_env(case, device, launch["accelerate_config_file"])
        except VramcalcError as err:
            return _fallback_record(case, device, "error", str(err), provenance)
    if not checkpoint_ready(checkpoint):
        outcome = spawn_worker("prepare", spec, timeout_s, log_path)
        if outcome.result is None or outcome.result.get("status") != "ok":
            status, error = _failure(outcome, "preparing the random-init checkpoint", timeout_s)
            return _fallback_record(case, device, status, error, provenance)
    touch_checkpoint(checkpoint)
    spec["checkpoint"] = str(checkpoint)
    if launch is not None and simulated_env is None:
        outcome = spawn_worker("run", spec, timeout_s, log_path, launch["accelerate_config_file"])
        failure = None
        if outcome.timed_out or outcome.returncode != 0:
            failure = _failure(outcome, "measuring", timeout_s)
        config = {"accelerate": launch["accelerate"], "deepspeed": launch["deepspeed"]}
        return merge_rank_records(case, device, outcome.rank_results, provenance, failure, config)
    outcome = spawn_worker("run", spec, timeout_s, log_path, extra_env=simulated_env)
    if outcome.result is not None and outcome.result.get("case_id") == case.case_id:
        record = outcome.result
        if launch is not None and isinstance(case, Case) and uses_accelerate(case, device):
            record["distributed_config"] = {
                "accelerate": launch["accelerate"],
                "deepspeed": launch["deepspeed"],
            }
        for key in PROVENANCE_FIELDS:
            if record.get(key) is None and key != "measured_at":
                record[key] = provenance.get(key)
        return record
    if outcome.result is not None and outcome.result.get("case_id") not in (None, case.case_id):
        error = (
            f"measuring: the worker's record is for case {outcome.result['case_id']}, not "
            f"{case.case_id} (the case changed on its way through to_dict / from_dict)"
        )
        return _fallback_record(case, device, "error", error, provenance)
    status, error = _failure(outcome, "measuring", timeout_s)
    return _fallback_record(case, device, status, error, provenance)


def _fallback_record(
    case: Case | ServeCase, device: str, status: str, error: str, provenance: dict[str, Any]
) -> dict[str, Any]:
    kind = record_kind(case)
    return make_record(
        kind, device, status, provenance={**provenance, "measured_at": utc_now()}, error=error
    )


def machine_provenance(
    device: str, scratch_dir: Path, check_instrument: bool = True
) -> dict[str, Any]:
    """Provenance for records the worker could not write; on CUDA also checks the instrument."""
    if device == "cpu":
        return collect_provenance("cpu")
    spec = {"device": device, "check_instrument": check_instrument}
    outcome = spawn_worker("probe", spec, 300, scratch_dir / "logs" / "probe.log")
    if outcome.result is None or outcome.result.get("error"):
        _, error = _failure(outcome, "probe (provenance + memory instrument check)", 300)
        raise HarnessError(error)
    return outcome.result["provenance"]


# -- the run -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM (e.g. from ``timeout``) into a ``HarnessError`` while cases run.

    The exception unwinds through ``spawn_worker``, which kills the running
    worker's process group; every finished case is already on disk.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise HarnessError("interrupted by SIGTERM; finished cases are saved, rerun to go on.")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cases(
    cases: Sequence[Case | ServeCase],
    output: str | Path,
    device: str = "auto",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    scratch_dir: str | Path | None = None,
    retry_errors: bool = False,
    stop_after_s: float | None = None,
    progress: bool = True,
    check_instrument: bool = True,
    sparse_checkpoints: bool = False,
) -> RunSummary:
    """Measure every case not yet in ``output``, appending one JSON line per case."""
    from tqdm import tqdm

    output = Path(output)
    device = resolve_device(device)
    scratch = Path(scratch_dir) if scratch_dir is not None else default_scratch_dir()
    scratch.mkdir(parents=True, exist_ok=True)
    planned = plan_run(cases, output, device, retry_errors)
    todo = [p.case for p in planned if not p.done]
    statuses: Counter[str] = Counter()
    stopped = False
    if todo:
        provenance = machine_provenance(device, scratch, check_instrument)
        started = time.perf_counter()
        with (
            sigterm_unwinds(),
            tqdm(
                total=len(planned),
                initial=len(planned) - len(todo),
                unit="case",
                desc="measure",
                disable=not progress,
                file=sys.stderr,
                dynamic_ncols=True,
            ) as bar,
        ):
            for case in todo:
                if stop_after_s is not None and time.perf_counter() - started > stop_after_s:
                    stopped = True
                    break
                case_started = time.perf_counter()
                record = measure_case(
                    case,
                    device,
                    timeout_s,
                    scratch,
                    provenance,
                    trace_dir_for(output),
                    sparse_checkpoints,
                )
                append_record(output, record)
                statuses[record["status"]] += 1
                bar.set_postfix_str(
                    f"last {time.perf_counter() - case_started:.0f}s {record['status']}"
                )
                bar.update(1)
    return RunSummary(
        output, device, len(planned), len(planned) - len(todo), dict(statuses), stopped
    )
