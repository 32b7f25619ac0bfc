"""Speed target of the capacity issue: 1,000 plans in under 5 s on the 2-core CI machine.

The sweep is the issue's example grid made 1,000 plans long: 2 catalog 7B
models x lora/qlora x 5 LoRA ranks x 5 sequence lengths x 10 batch sizes,
checked on 3 GPUs and written to CSV.

* ``cold``: every round starts with an empty inventory cache on disk and in
  the process, so the 10 distinct inventories (model x rank) are made inside
  the timing: each model is built on the meta device and wrapped by peft once
  (at the structure rank), the five ranks are derived from it; only the one-off
  torch/transformers import is outside (the warm-up round).
* ``warm``: the disk cache is filled (a user's second sweep); per-row cost.

Both run the sweep's default allocator model (``auto``), not the test suite's
``approximate``: 1,000 plans are a long sweep, so each row looks for a cached
simulation and takes the calibrated slack without one.
"""

import statistics
import time

import pytest

from vramcalc.catalog import find_gpu
from vramcalc.cli import cli  # noqa: F401 - registers cli_capacity before it is imported
from vramcalc.cli.capacity import plan_defaults
from vramcalc.estimate import forget_prepared
from vramcalc.render.export import write_sweep
from vramcalc.sweeps import expand_cases, run_sweep

AXES = {
    "model": ["meta-llama/Llama-2-7b-hf", "mistralai/Mistral-7B-v0.1"],
    "method": ["lora", "qlora"],
    "rank": [8, 16, 32, 64, 128],
    "seq_len": [256, 512, 1024, 2048, 4096],
    "batch_size": list(range(1, 11)),
}
TARGET_SECONDS = 5.0


@pytest.fixture(scope="module")
def cases():
    out = expand_cases(AXES, plan_defaults())
    assert len(out) == 1000
    return out


@pytest.fixture(autouse=True)
def _sweep_default_allocator_model(monkeypatch):
    monkeypatch.delenv("VRAMCALC_ALLOCATOR_MODEL", raising=False)


@pytest.fixture(scope="module")
def gpus():
    return [find_gpu(name) for name in ("A100-40GB", "H100-80GB", "RTX-4090")]


def _timed_sweep(cases, gpus, path, seconds):
    start = time.perf_counter()
    result = run_sweep(cases, gpus)
    write_sweep(result, path)
    seconds.append(time.perf_counter() - start)
    return result


@pytest.mark.benchmark
def test_thousand_plans_cold_inventories(benchmark, cases, gpus, tmp_path, monkeypatch):
    seconds: list[float] = []
    rounds = iter(range(100))

    def fresh_disk_cache():
        forget_prepared()
        monkeypatch.setenv("VRAMCALC_CACHE_DIR", str(tmp_path / f"cache{next(rounds)}"))
        return (cases, gpus, tmp_path / "sweep.csv", seconds), {}

    result = benchmark.pedantic(_timed_sweep, setup=fresh_disk_cache, rounds=3, warmup_rounds=1)
    assert len(result.rows) == 1000 and result.errors == 0 and result.approximated == 1000
    median = statistics.median(seconds[-3:])
    benchmark.extra_info["plans_per_second"] = round(1000 / median)
    assert median < TARGET_SECONDS, f"1,000 plans took {median:.2f} s"


@pytest.mark.benchmark
def test_thousand_plans_warm_disk_cache(benchmark, cases, gpus, tmp_path):
    seconds: list[float] = []
    run_sweep(cases, gpus)  # fill the disk cache (imports, meta builds)
    result = benchmark.pedantic(
        _timed_sweep, args=(cases, gpus, tmp_path / "sweep.csv", seconds), rounds=5
    )
    assert len(result.rows) == 1000 and result.errors == 0
    median = statistics.median(seconds)
    benchmark.extra_info["plans_per_second"] = round(1000 / median)
    assert median < TARGET_SECONDS / 5, f"1,000 plans took {median:.2f} s with warm inventories"
