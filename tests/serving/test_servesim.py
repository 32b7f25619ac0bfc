"""The serving simulation: generate traced on fake tensors, made whole (decoding steps,
rounds, layers), replayed through the caching-allocator model; and the estimate it answers.

The expanded run is checked against a run traced whole (every layer, step and round) on a
tiny llama: the same allocations in the same order, the same replayed peaks."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.conftest import TINY_LLAMA
from vramcalc.cli import cli
from vramcalc.memory.allocator import ALLOC, FREE, MIN_BLOCK_BYTES
from vramcalc.memory.overhead import load_calibration
from vramcalc.serve_plan import serve_plan
from vramcalc.serving.servecompare import serve_plan_of
from vramcalc.serving.servereplay import replay, simulate_serving, whole_run
from vramcalc.trace.steptrace import CUBLAS_WORKSPACE_BYTES

SEVEN_LAYERS = dict(TINY_LLAMA, num_hidden_layers=7)  # more than the 5 traced ones
NEW_TOKENS = 7  # more than the 5 traced steps


def _plan(mode: str, adapters: int = 1, cache: str = "dynamic", quant: str = "none"):
    return serve_plan(
        "tiny",
        quant=quant,
        adapters=adapters,
        rank=4,
        batch=2,
        prompt_tokens=16,
        new_tokens=NEW_TOKENS,
        mode=mode,
        cache=cache,
    )


def _allocs(run):
    """The allocation sizes in order, and where each FREE's allocation was made; a batch
    of consecutive FREEs as a set (Python drops a group of tensors in a varying order)."""
    events, _, _ = run
    made: dict[int, int] = {}
    out: list[object] = []
    frees: set[int] = set()
    for op, handle, nbytes in events:
        if op == FREE:
            frees.add(made[handle])
            continue
        if frees:
            out.append(frozenset(frees))
            frees = set()
        if op == ALLOC:
            made[handle] = len(made)
            out.append(nbytes)
    return out + ([frozenset(frees)] if frees else [])


def _traced_whole(config, plan):
    return whole_run(
        config, plan, traced_layers=99, traced_steps=plan.new_tokens, traced_timed_rounds=3
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "adapters", "quant"),
    [("unmerged", 1, "none"), ("merged", 1, "none"), ("none", 0, "none"), ("merged", 1, "nf4")],
)
def test_expanded_run_is_the_run_traced_whole(mode, adapters, quant):
    plan = _plan("unmerged" if mode == "none" else mode, adapters, quant=quant)
    fast = whole_run(SEVEN_LAYERS, plan)
    whole = _traced_whole(SEVEN_LAYERS, plan)
    assert _allocs(fast) == _allocs(whole)
    assert replay(*fast) == replay(*whole)


@pytest.mark.slow
def test_static_cache_expanded_run_has_the_same_peaks():
    """A static cache's last decoding step needs no padding of the attention mask
    (transformers ``prepare_padding_mask``: the cache is full): the expanded steps, copies of
    a traced one, keep that one small allocation (< 512 bytes) per full generate. The peaks
    are the same."""
    plan = _plan("multi", adapters=2, cache="static")
    fast = whole_run(SEVEN_LAYERS, plan)
    whole = _traced_whole(SEVEN_LAYERS, plan)
    assert replay(*fast) == replay(*whole)
    extra = len(fast[0]) - len(whole[0])
    assert extra == 2 * 4  # one ALLOC and its FREE in each of the 4 full generates


def _rounded(nbytes: int) -> int:
    return 0 if nbytes <= 0 else -(-nbytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES


def test_replayed_peak_allocated_is_the_events_live_maximum():
    """Peak allocated is the largest sum of live allocations, each rounded to 512 bytes as
    the caching allocator rounds it; reserved holds at least that."""
    plan = _plan("unmerged")
    events, markers, loading = whole_run(TINY_LLAMA, plan)
    live, size, peak = 0, {}, 0
    for op, handle, nbytes in events:
        if op == ALLOC:
            size[handle] = _rounded(nbytes)
            live += size[handle]
            peak = max(peak, live)
        elif op == FREE:
            live -= size.pop(handle)
    observed = replay(events, markers, loading)
    assert observed["peak_allocated_bytes"] == peak
    assert observed["peak_reserved_bytes"] >= peak
    assert sum(observed["phase_allocated_bytes"][p] > 0 for p in ("load", "adapters")) == 2


def test_the_run_holds_one_cublas_workspace_and_the_prompt_cache():
    """Without adapters, at the end of the last prefill the run holds the weights as loaded,
    one cuBLAS workspace (generate runs no autograd thread) and the prompt's KV cache."""
    plan = _plan("unmerged", adapters=0)
    events, markers, loading = whole_run(TINY_LLAMA, plan)
    workspaces = [n for op, _, n in events if op == ALLOC and n == CUBLAS_WORKSPACE_BYTES]
    assert len(workspaces) == 1
    kv_per_layer = 2 * plan.batch * 2 * plan.prompt_tokens * (64 // 4) * 2  # k+v, bf16
    prefill_peak = replay(events, markers, loading)["phase_allocated_bytes"]["prefill"]
    assert prefill_peak > CUBLAS_WORKSPACE_BYTES + TINY_LLAMA["num_hidden_layers"] * kv_per_layer


def test_estimate_answers_from_the_simulation(tiny_llama_dir):
    from vramcalc.serving.serve import prepare_serving
    from vramcalc.serving.serve_planner import serve_memory

    plan = serve_plan(
        str(tiny_llama_dir), adapters=1, rank=4, batch=2, prompt_tokens=16, new_tokens=8
    )
    model = prepare_serving(plan)
    simulated = serve_memory(model, plan, None, "simulate")
    approximate = serve_memory(model, plan, None, "approximate")
    sim = simulate_serving(model.spec.config_dict, plan)
    cal = load_calibration()
    assert simulated.allocator_model == "simulated"
    assert approximate.allocator_model == "approximate"
    assert simulated.peak_allocated_bytes == sim.peak_allocated_bytes
    assert simulated.peak_reserved_bytes == sim.peak_reserved_bytes
    assert simulated.device_total_bytes == (
        sim.peak_reserved_bytes + cal.cuda_runtime_bytes + cal.driver_reserved_bytes
    )
    assert sum(simulated.components.values()) == simulated.device_total_bytes
    assert sum(approximate.components.values()) == approximate.device_total_bytes
    assert approximate.components["trace_difference"] == 0
    assert any(a.startswith("APPROXIMATE") for a in approximate.assumptions)
    assert not any(a.startswith("APPROXIMATE") for a in simulated.assumptions)


def _after_inputs(run):
    """The run from the inputs on, as sizes and where each FREE's allocation was made
    (handles renumbered in order of allocation)."""
    events, markers, loading = run
    start = loading + dict(markers)["inputs"]
    return _allocs((events[start:], None, None))


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_merged_copies_are_loaded_before_one_decodes(quant):
    """Three adapters merged: three copies of the base, each loaded and merged as the harness
    makes its one (the dynamic map of a double-quantized 4-bit base is made once per process,
    the cuBLAS workspace shared), then the harness's run of one copy decoding its share of
    the batch: after the inputs, the one-copy plan's run allocation for allocation."""
    from vramcalc.serving.servereplay import replay

    plan = serve_plan(
        "tiny", quant=quant, adapters=3, rank=4, batch=6, prompt_tokens=16, new_tokens=7,
        mode="merged",
    )  # fmt: skip
    one = plan.one_copy()
    assert (len(one.adapters), one.batch, one.model_copies, plan.copy_batch) == (1, 2, 1, 2)
    copies, single = whole_run(TINY_LLAMA, plan), whole_run(TINY_LLAMA, one)
    loaded = replay(*single)["loaded_allocated_bytes"]
    dynamic_map = 1024 if quant == "nf4" else 0
    per_copy = loaded - CUBLAS_WORKSPACE_BYTES - dynamic_map
    assert replay(*copies)["loaded_allocated_bytes"] == loaded + 2 * per_copy
    assert _after_inputs(copies) == _after_inputs(single)


def test_merged_copies_are_simulated_and_say_how(tiny_llama_dir):
    from vramcalc.serving.serve import prepare_serving
    from vramcalc.serving.serve_planner import serve_memory

    plan = serve_plan(
        str(tiny_llama_dir), adapters=2, mode="merged", batch=2, prompt_tokens=16, new_tokens=8
    )
    memory = serve_memory(prepare_serving(plan), plan, None, "simulate")
    assert memory.allocator_model == "simulated"
    assert any("2 merged copies in one process" in a for a in memory.assumptions)


def test_a_record_of_one_merged_copy_compares_with_that_copy(tiny_llama_dir):
    """The harness measures one merged copy of a plan of several (``serve_limits``): the
    comparison estimates that copy, its adapter and share of the batch."""
    from vramcalc.serving.servecompare import compare_serve_records

    record = {
        "kind": "serve", "status": "ok", "model": str(tiny_llama_dir), "adapters": 3,
        "rank": 4, "mode": "merged", "batch": 6, "prompt_tokens": 16, "new_tokens": 8,
        "measured_model_copies": 1,
    }  # fmt: skip
    (row,) = compare_serve_records([record], ("approximate",))
    plan = row.estimates["approximate"]["serve_plan"]
    assert (len(plan["adapters"]), plan["batch"]) == (1, 2)


def _serve(*args: str):
    return CliRunner().invoke(cli, ["serve", *args])


def test_cli_marks_which_model_answered(tiny_llama_dir):
    args = [
        "--model",
        str(tiny_llama_dir),
        "--prompt-tokens",
        "16",
        "--new-tokens",
        "8",
        "--gpu",
        "H200",
    ]
    simulated = _serve(*args, "--allocator-model", "simulate", "--json")
    assert simulated.exit_code == 0, simulated.output
    assert json.loads(simulated.stdout)["allocator_model"] == "simulated"
    text = _serve(*args, "--allocator-model", "approximate")
    assert text.exit_code == 0, text.output
    assert "allocator model: APPROXIMATE" in text.output


def test_cli_rejects_an_unknown_allocator_model(tiny_llama_dir):
    result = _serve("--model", str(tiny_llama_dir), "--allocator-model", "guess")
    assert result.exit_code == 2
    assert "Error: Invalid value for '--allocator-model'" in result.output


def test_serve_plan_of_a_record():
    record = {
        "kind": "serve",
        "model": "meta-llama/Llama-3.2-1B",
        "quant": "int8",
        "adapters": 4,
        "rank": 16,
        "targets": ["q_proj", "v_proj"],
        "dora": True,
        "mode": "multi",
        "batch": 8,
        "context": 4096,
        "prompt_tokens": 3968,
        "new_tokens": 128,
        "cache": "static",
    }
    plan = serve_plan_of(record)
    assert (plan.quant, plan.mode, plan.batch, plan.cache) == ("int8", "multi", 8, "static")
    assert (plan.prompt_tokens, plan.new_tokens, len(plan.adapters)) == (3968, 128, 4)
    assert all(a.dora and a.rank == 16 and a.targets == ("q_proj", "v_proj") for a in plan.adapters)


@pytest.mark.parametrize(
    ("cache", "quant", "warned"),
    [("static", "none", True), ("static", "nf4", False), ("static", "int8", False),
     ("dynamic", "none", False)],
)  # fmt: skip
def test_a_compiled_static_cache_run_is_said_to_be_outside_the_simulation(
    tiny_llama_dir, cache, quant, warned
):
    """transformers compiles a static-cache decoding step (CUDA graphs) unless a bitsandbytes
    quantizer forbids it: the plan's warnings say the simulation does not model it."""
    from vramcalc.serving.serve import prepare_serving
    from vramcalc.serving.serve_planner import compiled_decoding, serve_warnings

    plan = serve_plan(
        str(tiny_llama_dir), quant=quant, cache=cache, adapters=1, batch=2, prompt_tokens=16,
        new_tokens=8,
    )  # fmt: skip
    said = [w for w in serve_warnings(prepare_serving(plan), plan) if "CUDA graphs" in w]
    assert compiled_decoding(plan) is warned
    assert len(said) == int(warned)


def test_servecompare_names_a_missing_file_and_exits_2(tmp_path, capsys):
    from vramcalc.serving.servecompare import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nothere.jsonl")])
    assert exit_info.value.code == 2
    assert "no such file: " + str(tmp_path / "nothere.jsonl") in capsys.readouterr().err


def test_the_speed_evidence_every_serve_table_prints_is_the_committed_reports():
    """``SPEED_EVIDENCE`` quotes reports/serve_speed.md: its record count and the median
    errors of prefill and decode tokens/s."""
    import re
    from pathlib import Path

    from vramcalc.serving.serve_speed import SPEED_EVIDENCE

    report = (Path(__file__).resolve().parents[2] / "reports" / "serve_speed.md").read_text()
    count = re.search(r"Measurements: (\d+) ok serving records", report).group(1)
    medians = {
        m: re.search(rf"\| {m} \| ([\d.]+) % \|", report).group(1)
        for m in ("prefill_tokens_per_second", "decode_tokens_per_second")
    }
    assert f"on {count} H100 serving runs" in SPEED_EVIDENCE
    assert f"median {medians['prefill_tokens_per_second']} % (prefill)" in SPEED_EVIDENCE
    assert f"and {medians['decode_tokens_per_second']} % (decode)" in SPEED_EVIDENCE


def test_speed_comparison_estimates_each_record_on_its_gpu():
    """A record's prefill and decode tokens/s against ``estimate_serve_speed`` for the plan it
    measured on the catalog GPU it names; a record without a speed is left out."""
    from vramcalc.catalog import find_gpu
    from vramcalc.serving.serve import prepare_serving
    from vramcalc.serving.serve_speed import estimate_serve_speed
    from vramcalc.serving.servecompare import compare_serve_speed, speed_markdown
    from vramcalc.speed.throughput import load_throughput_calibration

    record = {
        "kind": "serve", "status": "ok", "case_id": "c", "model": "meta-llama/Llama-3.2-1B",
        "gpu_name": "NVIDIA H100 80GB HBM3", "quant": "none", "mode": "unmerged",
        "adapters": 1, "rank": 16, "targets": ["q_proj", "v_proj"], "batch": 4, "cache": "dynamic",
        "prompt_tokens": 1920, "new_tokens": 128, "context": 2048,
        "prefill_tokens_per_second": 100_000.0, "decode_tokens_per_second": 80.0,
    }  # fmt: skip
    (row,) = compare_serve_speed([record, {**record, "decode_tokens_per_second": None}])
    plan = serve_plan_of(record)
    expected = estimate_serve_speed(
        prepare_serving(plan), plan, find_gpu(record["gpu_name"]), load_throughput_calibration()
    )
    assert row["estimate"]["decode_tokens_per_second"] == expected.decode_tokens_per_second
    assert row["prefill_tokens_per_second_error"] == pytest.approx(
        expected.prefill_tokens_per_second / 100_000.0 - 1
    )
    text = speed_markdown([row], ["x.jsonl"])
    assert "Measurements: 1 ok serving records from x.jsonl" in text
    assert "| c | meta-llama/Llama-3.2-1B | none | unmerged x1 | dynamic | 4 x 1920+128 |" in text
