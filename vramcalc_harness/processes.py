"""Processes the launcher starts: killing a case's whole process tree.

A single-GPU case is one worker in a process group of its own; a multi-GPU
case is ``vramcalc_harness.agent`` and one rank per GPU, which torch.distributed.run
starts in sessions of their own, out of the agent's group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from typing import Any


def kill_process_tree(proc: subprocess.Popen[bytes], wait_s: float = 30) -> list[int]:
    """SIGKILL ``proc``'s process group and every process below it; returns the pids killed.

    torch.distributed.run starts each rank in a session of its own, so the
    group alone would leave the ranks running. The group is stopped first so
    that no new child appears while the tree is read; the call returns once
    every process is gone (or ``wait_s`` passed), so the next case does not
    start beside ranks still holding a GPU.
    """
    import psutil  # a dependency of accelerate

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGSTOP)
    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in below:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(child.pid) == child.pid:  # a group leader: its own children too
                os.killpg(child.pid, signal.SIGKILL)
            os.kill(child.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + wait_s
    while any(_running(child) for child in below) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [proc.pid, *(child.pid for child in below)]


def _running(process: Any) -> bool:
    """Alive and not a zombie (a zombie holds no memory; a non-reaping init may keep it)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
