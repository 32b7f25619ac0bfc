"""Shared fixtures: tiny configs whose byte counts can be computed by hand."""

from __future__ import annotations

import json
import os

import pytest

from vramcalc.collector import tune

# Inventories built by tests go to a per-session temp cache, never ~/.cache.
os.environ.setdefault("VRAMCALC_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests about the rules, the CLI and the harness do not trace steps to simulate the caching
# allocator (seconds per plan); the allocator tests (test_allocator*, test_steptrace,
# test_slack_estimate, the report gate) ask for it explicitly.
os.environ.setdefault("VRAMCALC_ALLOCATOR_MODEL", "approximate")
# the collector's thresholds of a planning process, as the CLI and a report's workers set
# them (vramcalc/collector.py: a quarter of the CPU time of the allocator and serving tests)
tune()

TINY_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}

TINY_OPT = {
    "model_type": "opt",
    "architectures": ["OPTForCausalLM"],
    "hidden_size": 64,
    "ffn_dim": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "word_embed_proj_dim": 64,
    "do_layer_norm_before": True,
    "enable_bias": True,
}


def live_bytes(trace, marker: str) -> int:  # noqa: ANN001
    """Bytes of a trace's live allocations just before ``marker`` (a step or world trace)."""
    from vramcalc.memory.allocator import ALLOC, FREE

    stop, live = dict(trace.markers)[marker], {}
    for op, handle, nbytes in trace.events[:stop]:
        if op == ALLOC:
            live[handle] = nbytes
        elif op == FREE:
            live.pop(handle, None)
    return sum(live.values())


def pytest_terminal_summary(terminalreporter):  # noqa: ANN001, ANN201
    """The speed benchmarks' figures and targets (``speed_figure``), where CI logs keep them.
    They travel as each test report's ``user_properties``, so they reach this summary from
    pytest-xdist's workers too."""
    figures = [
        value
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if name == "speed_figure"
    ]
    if figures:
        terminalreporter.section("speed figures (targets in each line)")
        for line in sorted(figures):
            terminalreporter.write_line(line)
        if os.environ.get("PYTEST_XDIST_WORKER") is None and _parallel(terminalreporter.config):
            terminalreporter.write_line(
                "(measured beside the other tests' processes: for quiet figures run "
                "`python -m pytest -n 0 tests/test_bench_plan.py tests/test_bench_capacity.py`)"
            )


def _parallel(config) -> bool:  # noqa: ANN001
    """Whether pytest-xdist runs the tests in several processes."""
    return bool(getattr(config.option, "numprocesses", None))


@pytest.fixture
def speed_figure(request):  # noqa: ANN001, ANN201
    """``speed_figure(name, extra_info)``: a benchmark's figures, printed in the run's summary."""

    def show(name: str, extra: dict) -> None:
        line = f"{name}: " + ", ".join(f"{k}={v}" for k, v in extra.items())
        request.node.user_properties.append(("speed_figure", line))

    return show


@pytest.fixture(autouse=True, scope="session")
def _inventory_cache(tmp_path_factory):  # noqa: ANN001
    """One cache folder for the run, shared by pytest-xdist's workers (entries are written
    whole, then renamed into place), so that no recipe is traced twice."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        path = tmp_path_factory.mktemp("vramcalc-cache")
    else:  # every worker's base temp is a folder of the run's own
        path = tmp_path_factory.getbasetemp().parent / "vramcalc-cache"
        path.mkdir(exist_ok=True)
    os.environ["VRAMCALC_CACHE_DIR"] = str(path)


@pytest.fixture
def tiny_llama_dir(tmp_path):
    path = tmp_path / "tiny-llama"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return path


@pytest.fixture
def tiny_opt_dir(tmp_path):
    path = tmp_path / "tiny-opt"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(TINY_OPT))
    return path


#: the longest files (``--durations`` on a 2-core machine), run first: with ``--dist loadfile``
#: one worker starts the cold accuracy gate (its fixture about 6.6 of the suite's 8.6 minutes,
#: 2026-12-07, in two processes of its own) at once while the other takes the rest, instead of
#: the gate starting two thirds of the way through and running on alone at the end
LONGEST_FIRST = (
    "tests/test_accuracy.py",
    "tests/test_bench_plan.py",
    "tests/test_bench_capacity.py",
    "tests/harness/test_multigpu.py",
    "tests/harness/test_launcher.py",
)


def pytest_collection_modifyitems(session, config, items):  # noqa: ANN001, ANN201
    """Files of ``LONGEST_FIRST`` first, in that order; the rest keep their order."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
