"""Two processes on CPU (gloo) through the real multi-GPU path: agent, ranks, merge, OOM, timeout.

FSDP and DeepSpeed cannot run here (accelerate's FSDP plugin refuses the CPU,
deepspeed is not installed): their configs and env are checked in
tests/harness/test_distributed.py, their runs need the GPU case list.
"""

from __future__ import annotations

import re
from pathlib import Path

import psutil
import pytest
import yaml
from click.testing import CliRunner

from vramcalc_harness.caselist import load_cases
from vramcalc_harness.cli import measure
from vramcalc_harness.record import PER_RANK_FIELDS, RECORD_FIELDS, read_records

TINY_LLAMA = str(Path(__file__).parent / "cases" / "tiny-llama")
GPU_FIELDS = (
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "device_total_bytes",
    "total_device_bytes_all_gpus",
    "loaded_allocated_bytes",
)


SMALL = {
    "model": TINY_LLAMA,
    "seq_len": 16,
    "batch_size": 2,
    "steps": 2,
    "warmup_steps": 1,
    "num_gpus": 2,
    "strategy": "ddp",
    "split": "calibration",
}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One scratch directory, so the random-init checkpoint is made once for every test."""
    return tmp_path_factory.mktemp("multigpu")


def measure_one(scratch: Path, name: str, **fields: object) -> tuple[dict, Path]:
    """Run ``vramcalc measure`` on one two-process case; (its record, its log)."""
    cases_path = scratch / f"{name}.yaml"
    cases_path.write_text(yaml.safe_dump({"cases": [{**SMALL, **fields}]}))
    output = scratch / f"{name}.jsonl"
    args = [str(cases_path), "-o", str(output), "--device", "cpu", "--scratch", str(scratch)]
    result = CliRunner().invoke(measure, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    (record,) = read_records(output)
    (case,) = load_cases(cases_path)
    assert record["case_id"] == case.case_id
    assert list(record)[: len(RECORD_FIELDS)] == list(RECORD_FIELDS)
    assert (record["num_gpus"], record["strategy"], record["cpu_offload"]) == (2, "ddp", False)
    assert len(record["per_rank"]) == 2
    assert all(list(entry) == list(PER_RANK_FIELDS) for entry in record["per_rank"])
    assert all(record[k] is None for k in GPU_FIELDS)  # CPU: not measured, never faked
    return record, scratch / "logs" / f"{case.case_id}.log"


def started_pids(log: Path) -> list[int]:
    """The agent's and every rank's pid, as they announce themselves in the case's log."""
    return [
        int(p) for p in re.findall(r"\[harness\] (?:agent|rank \d+/\d+) pid (\d+)", log.read_text())
    ]


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_ddp_ranks_each_measure_and_the_record_sums_their_throughput(scratch):
    record, log_path = measure_one(scratch, "ok", method="lora", targets="q_proj,v_proj")
    assert (record["status"], record["error"]) == ("ok", None)
    ranks = record["per_rank"]
    assert [(e["rank"], e["local_rank"], e["status"]) for e in ranks] == [
        (0, 0, "ok"),
        (1, 1, "ok"),
    ]
    assert all(e["tokens_per_second"] > 0 and e["host_peak_rss_bytes"] > 0 for e in ranks)
    assert record["tokens_per_second_all_gpus"] == pytest.approx(
        sum(e["tokens_per_second"] for e in ranks)
    )
    assert record["tokens_per_second"] == pytest.approx(record["tokens_per_second_all_gpus"] / 2)
    assert record["step_seconds"] == max(e["step_seconds"] for e in ranks)
    assert (record["trainable_params"], record["lora_targets_used"]) == (3584, ["q_proj", "v_proj"])
    accelerate = record["distributed_config"]["accelerate"]
    assert (accelerate["distributed_type"], accelerate["num_processes"], accelerate["use_cpu"]) == (
        "MULTI_GPU",
        2,
        True,
    )
    launch = scratch / "launch" / record["case_id"] / "accelerate.yaml"
    assert yaml.safe_load(launch.read_text()) == accelerate
    log = log_path.read_text()
    assert "[harness] rank 0/2 pid" in log and "[harness] rank 1/2 pid" in log


def test_an_oom_on_one_rank_is_an_oom_and_stops_the_rank_waiting_for_it(scratch):
    """The plain loop under DDP; the last rank fails at the first measured step."""
    record, log_path = measure_one(
        scratch,
        "oom",
        method="full",
        recipe="loop",
        grad_accum=2,
        optimizer="adamw_torch",
        simulate="oom",
    )
    assert record["status"] == "oom"
    assert record["error"].startswith("rank 1: OutOfMemoryError: CUDA out of memory.")
    waiting, failed = record["per_rank"]
    assert failed["status"] == "oom"
    # rank 0 was in the step's all-reduce: stopped by torch.distributed.run (no record), or
    # it saw the connection close first (an error record)
    assert waiting["status"] in (None, "error")
    assert record["trainable_params"] == record["total_params"] == 106816
    assert "[harness] rank 0/2 pid" in log_path.read_text()
    assert all(gone(pid) for pid in started_pids(log_path))


def test_a_hung_collective_times_out_and_every_process_of_the_case_is_killed(scratch):
    """Rank 1 hangs at the first measured step; rank 0 waits for it in the all-reduce (40 s: two
    ranks importing torch and transformers on a loaded 2-core machine take 15-30 s to get there)."""
    record, log_path = measure_one(scratch, "hang", method="lora", simulate="hang", timeout_s=40)
    assert (record["status"], record["error"]) == (
        "timeout",
        "measuring: no result after 40 s; worker killed.",
    )
    assert [e["status"] for e in record["per_rank"]] == [None, None]
    assert "[harness] simulated hang on rank 1" in log_path.read_text()
    pids = started_pids(log_path)
    assert len(pids) == 3  # the agent and both ranks
    assert all(gone(pid) for pid in pids)
