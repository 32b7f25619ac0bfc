"""The launch agent of a multi-GPU case: ``python -m vramcalc_harness.agent ACCELERATE.yaml MODE SPEC RESULT``.

It is ``accelerate launch --config_file ACCELERATE.yaml -m vramcalc_harness.worker MODE
SPEC RESULT`` on one node: the env comes from accelerate's own functions
(``vramcalc_harness.distributed.launch_env``), the processes from
``torch.distributed.run`` (``--standalone``: a free port per case, no
restarts), run in this process as accelerate does. Unlike ``accelerate
launch`` it also starts several CPU processes (gloo) without MPI, which is how
the CPU tests run the multi-GPU path.

The agent dies with the launcher (``PR_SET_PDEATHSIG``), and each worker with
the agent, so a killed launcher leaves no rank holding a GPU. When a rank
fails it exits non-zero after writing its record, and torch.distributed.run
stops the other ranks (which may be waiting for it in a collective).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from vramcalc_harness.distributed import launch_env
from vramcalc_harness.worker import die_with_launcher

USAGE = "usage: python -m vramcalc_harness.agent ACCELERATE.yaml run|prepare SPEC.json RESULT.json"


def torchrun_args(num_processes: int, worker_args: list[str]) -> list[str]:
    """``torch.distributed.run`` arguments that start ``num_processes`` workers on this node."""
    return [
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(num_processes),
        "--max-restarts",
        "0",
        "--module",
        "vramcalc_harness.worker",
        *worker_args,
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4:
        print(USAGE, file=sys.stderr)
        return 2

    die_with_launcher()
    config_file, *worker_args = argv
    num_processes = int(yaml.safe_load(Path(config_file).read_text())["num_processes"])
    os.environ.update(launch_env(config_file, worker_args))
    os.environ["VRAMCALC_LAUNCHER_PID"] = str(os.getpid())  # the workers' parent is this agent
    print(
        f"[harness] agent pid {os.getpid()}: {num_processes} processes, config {config_file}",
        flush=True,
    )
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_args(num_processes, worker_args))
    try:
        run(args)
    except ChildFailedError as err:
        failures = ", ".join(
            f"rank {rank} exit code {failure.exitcode}" for rank, failure in err.failures.items()
        )
        print(f"[harness] agent: worker processes failed ({failures})", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
