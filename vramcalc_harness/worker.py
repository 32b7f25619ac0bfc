"""The process that measures one case: ``python -m vramcalc_harness.worker MODE SPEC.json RESULT.json``.

The launcher starts a fresh worker for every case, so no allocator cache,
CUDA context or compiled kernel of one case leaks into the next.

Modes:

``run``      build the model and run the recipe under the trackers (a serving case:
             ``vramcalc_harness.serve_step``, ``generate`` instead of training), with
             ``record_trace`` on CUDA inside the allocator's trace; RESULT
             holds the complete result record (``vramcalc_harness.record``). An OOM is a
             result (``status: "oom"``, memory peaks up to the failure kept),
             any other exception is ``status: "error"`` with the traceback's tail.
``prepare``  create the random-init checkpoint of the case's model and dtype.
``probe``    provenance of the machine and, on CUDA, the memory instrument check.

SPEC is ``{"case": Case.to_dict(), "device": ..., "scratch_dir": ..., "checkpoint": ...}``,
with ``"trace_path"`` for a case with ``record_trace``.

A simulated-world case (``simulate_world: N``) runs this worker once, as rank 0
of a fake N-GPU process group (``vramcalc_harness.simworld``), and writes RESULT itself.

A multi-GPU case runs this worker once per GPU under ``vramcalc_harness.agent``
(torch.distributed.run): each rank joins the process group before touching
CUDA, measures its own GPU, writes its record to ``RESULT.rank<r>.json``
(``vramcalc_harness.distributed.rank_result_path``) and, when it failed, exits
non-zero so that torch.distributed.run stops the ranks waiting for it. The
launcher merges the ranks' records (``vramcalc_harness.record.merge_rank_records``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vramcalc_harness.alloc_trace import case_trace
from vramcalc_harness.build import build_model, prepare_checkpoint
from vramcalc_harness.caselist import case_from_dict
from vramcalc_harness.distributed import (
    is_distributed,
    rank_info,
    rank_result_path,
    start_process_group,
    zero3_loading_context,
)
from vramcalc_harness.measure import error_text, is_oom, measure_case
from vramcalc_harness.record import collect_provenance, training_kind
from vramcalc_harness.scenario import Case
from vramcalc_harness.serve_case import ServeCase
from vramcalc_harness.serve_step import run_serve_case
from vramcalc_harness.simworld import start_fake_world, wrapper_name
from vramcalc_harness.step import RECIPES, compute_dtype_for
from vramcalc_harness.trackers import (
    MemoryTracker,
    allocated_bytes,
    check_memory_instrument,
    is_cuda,
)


def run_case(
    case: Case, device: str, checkpoint: str | Path, trace_path: str | Path | None = None
) -> dict[str, Any]:
    """Measure one training case in this process (``measure.measure_case``); returns its full
    result record.

    With ``case.record_trace`` on CUDA, the allocator's trace of the whole case is
    written to ``trace_path`` (``vramcalc_harness.alloc_trace``).
    """
    rank, local_rank, world_size = rank_info()

    def before_cuda(measurement: dict[str, Any]) -> None:
        if case.simulate_world is not None:  # rank 0 of a fake N-GPU world, before CUDA
            start_fake_world(case.simulate_world, device)
            measurement["simulated_world_wrapper"] = wrapper_name(case, device)
        elif is_distributed(case.plan):
            start_process_group(device)  # before CUDA: this rank's GPU only

    def train(tracker: MemoryTracker, measurement: dict[str, Any]) -> None:
        compute_dtype = compute_dtype_for(case, device)
        measurement["compute_dtype_used"] = compute_dtype
        _zero3_config = zero3_loading_context(case.plan)  # kept alive: ZeRO-3 loading
        trace = case_trace(case, device, trace_path)
        if trace is not None:
            measurement["trace_file"] = trace.path.name
        with tracker, trace or contextlib.nullcontext():
            built = build_model(case.plan, checkpoint, device)
            if trace is not None:
                trace.mark("loaded")
            measurement.update(
                loaded_allocated_bytes=allocated_bytes(device),
                trainable_params=built.trainable_params,
                total_params=built.total_params,
                lora_targets_used=list(built.lora_targets_used)
                if built.lora_targets_used
                else None,
            )
            print(
                f"[harness] built: {built.trainable_params} trainable / {built.total_params} params",
                flush=True,
            )
            result = RECIPES[case.recipe](
                built.model,
                case,
                device,
                compute_dtype,
                on_warmup_end=tracker.mark_steady,
                on_step_end=(lambda n: trace.mark("step_end")) if trace is not None else None,
            )
        plan = case.plan
        tokens_per_step = plan.seq_len * plan.batch_size * plan.grad_accum
        measurement.update(
            step_seconds=result.step_seconds,
            step_seconds_measured=list(result.step_seconds_measured),
            tokens_per_second=tokens_per_step / result.step_seconds
            if result.step_seconds
            else None,
            optimizer_class=result.optimizer_class,
            **(result.state_bytes or {}),
        )

    record = measure_case(training_kind(case), device, checkpoint, train, before_cuda)
    if is_distributed(case.plan) and case.simulate_world is None:  # merged by the launcher
        record.update(rank=rank, local_rank=local_rank, world_size=world_size)
    return record


def prepare(
    case: Case | ServeCase, device: str, scratch_dir: str | Path, sparse_when_short: bool = False
) -> dict[str, Any]:
    path = prepare_checkpoint(case.plan, scratch_dir, device, sparse_when_short)
    return {"status": "ok", "checkpoint": str(path)}


def probe(device: str, check_instrument: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"provenance": collect_provenance(device), "instrument": None}
    if is_cuda(device) and check_instrument:
        out["instrument"] = asdict(check_memory_instrument(device))
    return out


def die_with_launcher() -> None:
    """Get SIGKILL when the launcher dies (Linux), so no orphan worker keeps the GPU.

    ``VRAMCALC_LAUNCHER_PID`` is the parent's pid: the launcher's, or for the
    ranks of a multi-GPU case the agent's (``vramcalc_harness.agent``).
    """
    launcher = os.environ.get("VRAMCALC_LAUNCHER_PID")
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # the launcher died before prctl took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in ("run", "prepare", "probe"):
        print(
            "usage: python -m vramcalc_harness.worker run|prepare|probe SPEC.json RESULT.json",
            file=sys.stderr,
        )
        return 2
    mode, spec_path, result_path = argv
    die_with_launcher()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    rank, _, world_size = rank_info()
    if world_size > 1:
        result_path = str(rank_result_path(result_path, rank))
        print(f"[harness] rank {rank}/{world_size} pid {os.getpid()}", flush=True)
    spec = json.loads(Path(spec_path).read_text())
    device = spec["device"]
    try:
        if mode == "probe":
            result = probe(device, spec.get("check_instrument", True))
        else:
            case = case_from_dict(spec["case"])
            print(
                f"[harness] {mode} case {case.case_id} on {device}: {case.canonical_key()}",
                flush=True,
            )
            if mode == "prepare":
                result = prepare(
                    case, device, spec["scratch_dir"], spec.get("sparse_checkpoints", False)
                )
            elif isinstance(case, ServeCase):
                result = run_serve_case(case, device, spec["checkpoint"], spec.get("trace_path"))
            else:
                result = run_case(case, device, spec["checkpoint"], spec.get("trace_path"))
    except Exception as err:  # noqa: BLE001 - reported to the launcher, not raised
        result = {"status": "oom" if is_oom(err) else "error", "error": error_text(err)}
        print(result["error"], file=sys.stderr, flush=True)
    tmp = Path(result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, result_path)
    if world_size > 1 and result.get("status") != "ok":
        return 1  # torch.distributed.run stops the other ranks
    return 0


if __name__ == "__main__":
    sys.exit(main())
