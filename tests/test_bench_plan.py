"""Speed targets of `vramcalc plan` (issue 18), each a process as a user runs it, the run
simulated, on the mission example (Llama-2-13b QLoRA r16, 2048 x 4):

* cold (an empty cache): <= 1.5x `python -c "import torch, transformers, peft"` in the same
  run (the recipe traced once, the model built on the meta device, the run replayed);
* the same recipe with another batch size, sequence length or rank: <= 0.35x that import
  (the recipe's trace is cached: the run is instantiated and replayed, no torch import);
* a warm repeat: <= 0.3 s.

Figures are in ``extra_info`` (seconds and the ratio to the import); benchmarks time, they do
not assert a time. A warm plan must not import torch (that is asserted: it is behaviour).
"""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

MISSION = [
    sys.executable, "-m", "vramcalc", "plan", "--model", "meta-llama/Llama-2-13b",
    "--method", "qlora", "--rank", "16", "--seq-len", "2048", "--batch-size", "4",
]  # fmt: skip
IMPORT = [sys.executable, "-c", "import torch, transformers, peft"]


def _env(cache: str) -> dict[str, str]:
    """The plans' environment: their own cache, and Python's bytecode cache on as a user's
    Python has it (a ``PYTHONDONTWRITEBYTECODE`` of the test machine would have every warm
    plan compile vramcalc's modules again: 0.1-0.2 s of a 0.3 s target)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return env | {"VRAMCALC_CACHE_DIR": cache, "VRAMCALC_ALLOCATOR_MODEL": "simulate"}


def _seconds(command: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory) -> Path:
    """The cache of the warm benchmarks: the cold plan's first round fills it (one cold plan
    the fewer), else ``warm_env`` does."""
    return tmp_path_factory.mktemp("warm-cache")


@pytest.fixture(scope="module")
def warm_env(warm_cache) -> dict[str, str]:
    """One cache holding the mission plan (and so its recipe), shared by the warm benchmarks."""
    env = _env(str(warm_cache))
    if not any(warm_cache.iterdir()):  # test_cold_plan did not run first (-k, a rerun)
        subprocess.run(MISSION, check=True, capture_output=True, env=env)
    return env


@pytest.fixture(scope="module")
def import_seconds(request) -> float:
    # the median of 3 where the benchmarks time (-n 0), after one that puts the files in the
    # page cache, as for the plans; one import where they only run once, beside the other
    # tests' processes (pytest-benchmark disables them under pytest-xdist)
    session = getattr(request.config, "_benchmarksession", None)
    if getattr(session, "disabled", False):
        return _seconds(IMPORT)
    _seconds(IMPORT)
    return statistics.median(_seconds(IMPORT) for _ in range(3))


@pytest.mark.benchmark(group="plan-process")
def test_cold_plan(benchmark, tmp_path, warm_cache, import_seconds, speed_figure):
    rounds = iter(range(100))

    def fresh():  # every round from an empty cache; the first one fills the warm benchmarks'
        cache = warm_cache if not any(warm_cache.iterdir()) else tmp_path / f"cache{next(rounds)}"
        return (MISSION, _env(str(cache))), {}

    seconds = benchmark.pedantic(_seconds, setup=fresh, rounds=2, warmup_rounds=0)
    benchmark.extra_info.update(
        seconds=round(seconds, 2),
        import_seconds=round(import_seconds, 2),
        ratio_to_import=round(seconds / import_seconds, 2),
        target_ratio=1.5,
    )
    speed_figure("cold plan", benchmark.extra_info)


@pytest.mark.benchmark(group="plan-process")
@pytest.mark.parametrize(
    "change",
    [["--batch-size", "8"], ["--seq-len", "4096"], ["--rank", "32"]],
    ids=["batch", "seq", "rank"],
)
def test_same_recipe_other_sizes(benchmark, warm_env, import_seconds, change, speed_figure):
    env = warm_env  # the recipe, cached
    values = iter(range(100))

    def another():  # a plan not simulated yet: the value moves each round
        flag, value = change[0], int(change[1]) + next(values)
        return ([*MISSION, flag, str(value)], env), {}

    seconds = benchmark.pedantic(_seconds, setup=another, rounds=3, warmup_rounds=0)
    benchmark.extra_info.update(
        seconds=round(seconds, 2),
        import_seconds=round(import_seconds, 2),
        ratio_to_import=round(seconds / import_seconds, 2),
        target_ratio=0.35,
    )
    speed_figure(f"same recipe, other {change[0]}", benchmark.extra_info)


@pytest.mark.benchmark(group="plan-process")
def test_warm_repeat(benchmark, warm_env, speed_figure):
    seconds = benchmark.pedantic(_seconds, args=(MISSION, warm_env), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(seconds=round(seconds, 3), target_seconds=0.3)
    speed_figure("warm repeat", benchmark.extra_info)


def test_a_warm_plan_imports_no_torch(warm_env):
    """The sub-second path must not import torch/transformers (they cost seconds): the same
    recipe at another size is answered from the cached recipe trace."""
    env = warm_env
    code = (
        "import sys, runpy; sys.argv = "
        + repr(["vramcalc", *MISSION[3:], "--batch-size", "6", "--rank", "24"])
        + "\ntry:\n    runpy.run_module('vramcalc', run_name='__main__')\nexcept SystemExit:\n"
        "    pass\nprint('HEAVY', sorted(m for m in ('torch', 'transformers', 'peft', "
        "'accelerate') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env
    ).stdout
    assert "HEAVY []" in out and "device total" in out
