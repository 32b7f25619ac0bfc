"""Speed target: a repeated `vramcalc plan` on a catalog model is a sub-second process.

The first plan of a model builds its inventory (imports torch/transformers/peft,
~4-6 s); later plans read the disk cache and import none of them.
"""

import subprocess
import sys

import pytest

COMMAND = [
    sys.executable,
    "-m",
    "vramcalc",
    "plan",
    "--model",
    "meta-llama/Llama-2-13b",
    "--method",
    "qlora",
    "--rank",
    "16",
]


@pytest.mark.benchmark(group="plan-process")
def test_repeated_plan_process(benchmark):
    subprocess.run(COMMAND, check=True, capture_output=True)  # fill the inventory cache
    result = benchmark.pedantic(
        lambda: subprocess.run(COMMAND, check=True, capture_output=True), rounds=5, iterations=1
    )
    assert b"device total" in result.stdout


def test_cached_plan_imports_no_torch():
    """The sub-second path must not import torch/transformers (they cost seconds)."""
    subprocess.run(COMMAND, check=True, capture_output=True)
    code = (
        "import sys, runpy; sys.argv = " + repr(["vramcalc", *COMMAND[3:]]) + "\n"
        "try:\n    runpy.run_module('vramcalc', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert "HEAVY []" in out
