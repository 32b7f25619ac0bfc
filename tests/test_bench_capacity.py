"""Speed targets of a sweep, every row simulated (issue 18): a 1,000-row sweep of about 100
distinct memory plans x 10 GPUs takes <= 60 s cold and <= 3 s warm on a 2-core machine.

The grid: 2 catalog models (Llama-2-7b, Mistral-7B) x lora/qlora x 5 LoRA ranks x 5 sequence
lengths at batch 4 = 100 plans, each on 10 GPUs (the ``gpu`` column of the cases: one row per
plan and GPU), written to CSV.

* ``cold``: an empty disk cache and nothing memoized in the process: the four recipes
  (model x method) are traced inside the timing, each plan's run is instantiated from its
  recipe, unrolled and replayed through the allocator model; only the one-off
  torch/transformers import is outside (a warm-up sweep in another cache).
* ``warm``: the disk cache is filled (a user's second sweep): every row reads its cached
  simulation.

Figures are recorded in ``extra_info`` (seconds, rows per second); benchmarks time, they do
not assert a time.
"""

import statistics
import time

import pytest

from vramcalc.cli.capacity import plan_defaults
from vramcalc.estimate import forget_prepared
from vramcalc.render.export import write_sweep
from vramcalc.sweeps import expand_cases, run_sweep

AXES = {
    "model": ["meta-llama/Llama-2-7b-hf", "mistralai/Mistral-7B-v0.1"],
    "method": ["lora", "qlora"],
    "rank": [8, 16, 32, 64, 128],
    "seq_len": [256, 512, 1024, 2048, 4096],
    "batch_size": [4],
}
GPUS = (
    "RTX-4090", "L4", "A10G", "A100-40GB", "A100-80GB", "L40S", "A6000", "H100-80GB", "H200",
    "RTX-5090",
)  # fmt: skip


@pytest.fixture(scope="module")
def cases():
    plans = expand_cases(AXES, plan_defaults())
    assert len(plans) == 100
    out = [{**plan, "gpu": gpu} for plan in plans for gpu in GPUS]
    assert len(out) == 1000
    return out


@pytest.fixture(autouse=True)
def _simulated(monkeypatch):
    monkeypatch.setenv("VRAMCALC_ALLOCATOR_MODEL", "simulate")


def _forget_everything() -> None:
    """Nothing memoized in the process: inventories, recipe traces, op profiles."""
    from vramcalc.speed import opprofile
    from vramcalc.trace import recipe

    forget_prepared()
    recipe._MEMO.clear()
    opprofile._cached.cache_clear()


def _timed_sweep(cases, path, seconds):
    start = time.perf_counter()
    result = run_sweep(cases, [])
    write_sweep(result, path)
    seconds.append(time.perf_counter() - start)
    return result


@pytest.fixture(scope="module")
def sweep_cache(tmp_path_factory):
    """The disk cache the cold sweep fills and the warm sweep reads (one cold sweep a run)."""
    return tmp_path_factory.mktemp("sweep-cache")


@pytest.mark.benchmark(group="sweep-1000-simulated")
def test_thousand_rows_cold(benchmark, cases, tmp_path, monkeypatch, sweep_cache, speed_figure):
    if not benchmark.disabled:  # timed (no pytest-xdist): the one-off imports outside it
        monkeypatch.setenv("VRAMCALC_CACHE_DIR", str(tmp_path / "warmup"))
        run_sweep(cases[:10], [])
    seconds: list[float] = []

    def fresh():
        _forget_everything()
        assert not any(sweep_cache.iterdir())  # one round, from an empty cache
        monkeypatch.setenv("VRAMCALC_CACHE_DIR", str(sweep_cache))
        return (cases, tmp_path / "sweep.csv", seconds), {}

    result = benchmark.pedantic(_timed_sweep, setup=fresh, rounds=1, warmup_rounds=0)
    assert len(result.rows) == 1000 and result.errors == 0 and result.approximated == 0
    assert {row.estimate.allocator_model for row in result.rows} == {"simulated"}
    benchmark.extra_info["seconds"] = round(seconds[-1], 2)
    benchmark.extra_info["target_seconds"] = 60
    speed_figure("1,000-row sweep, cold", benchmark.extra_info)


@pytest.mark.benchmark(group="sweep-1000-simulated")
def test_thousand_rows_warm(benchmark, cases, tmp_path, monkeypatch, sweep_cache, speed_figure):
    monkeypatch.setenv("VRAMCALC_CACHE_DIR", str(sweep_cache))
    run_sweep(cases, [])  # the disk cache full (the cold benchmark filled it when it ran)
    seconds: list[float] = []
    result = benchmark.pedantic(
        _timed_sweep, args=(cases, tmp_path / "sweep.csv", seconds), rounds=3
    )
    assert len(result.rows) == 1000 and result.errors == 0 and result.approximated == 0
    benchmark.extra_info["seconds"] = round(statistics.median(seconds), 2)
    benchmark.extra_info["target_seconds"] = 3
    speed_figure("1,000-row sweep, warm", benchmark.extra_info)
