"""vramcalc.sweeps: case expansion, cases files, per-row errors, the inventory cache."""

import pytest

import vramcalc.estimate as estimate_module
from vramcalc.catalog import find_gpu
from vramcalc.errors import InvalidPlanError
from vramcalc.estimate import estimate
from vramcalc.sweeps import (
    EstimateCache,
    expand_cases,
    plan_from_case,
    read_cases,
    run_sweep,
)
from vramcalc.training_plan import TrainingPlan

DEFAULTS = {"model": None, "method": "lora", "rank": 8, "seq_len": 2048, "batch_size": 1}


def test_expand_is_the_cross_product_in_field_order_last_fastest():
    cases = expand_cases({"batch_size": [1, 4], "model": ["a", "b"], "rank": [8, 16, 64]}, DEFAULTS)
    assert len(cases) == 12
    assert [(c["model"], c["rank"], c["batch_size"]) for c in cases[:4]] == [
        ("a", 8, 1),
        ("a", 8, 4),
        ("a", 16, 1),
        ("a", 16, 4),
    ]
    assert all(c["method"] == "lora" and c["seq_len"] == 2048 for c in cases)


def test_expand_needs_a_model_unless_cases_are_given():
    with pytest.raises(InvalidPlanError, match="--model is required"):
        expand_cases({"rank": [8]}, DEFAULTS)


def test_case_rows_keep_their_cells_and_cross_the_axes_on_blank_ones():
    rows = [{"model": "a", "rank": "4"}, {"model": "b"}]
    cases = expand_cases({"rank": [8, 16], "seq_len": [512]}, DEFAULTS, rows)
    assert [(c["model"], c["rank"], c["seq_len"]) for c in cases] == [
        ("a", "4", 512),
        ("b", 8, 512),
        ("b", 16, 512),
    ]


def test_read_cases_accepts_dashes_and_ignores_result_columns(tmp_path):
    path = tmp_path / "cases.csv"
    path.write_text(
        "\ufeffModel,--seq-len,batch_size,Gradient-Checkpointing,device_total_gib,fits_T4,cost_usd_T4,error\n"
        "m1,512,2,true,1.5,True,3.2,\n"
        ",,,,,,,\n"
        "m2,,4,,,,,\n"
    )
    assert read_cases(path) == [
        {"model": "m1", "seq_len": "512", "batch_size": "2", "gradient_checkpointing": "true"},
        {"model": "m2", "batch_size": "4"},
    ]


def test_read_cases_needs_rows(tmp_path):
    path = tmp_path / "cases.csv"
    path.write_text("model,rank\n,\n")
    with pytest.raises(InvalidPlanError, match="no plan rows below the header"):
        read_cases(path)
    path.write_text("")
    with pytest.raises(InvalidPlanError, match="the file is empty"):
        read_cases(path)


def test_read_cases_sniffs_semicolons(tmp_path):
    path = tmp_path / "cases.csv"
    path.write_text("model;rank\nm;16\n")
    assert read_cases(path) == [{"model": "m", "rank": "16"}]


def test_read_cases_names_every_unknown_column(tmp_path):
    path = tmp_path / "cases.csv"
    path.write_text("model,rnk,sequence\nm,8,512\n")
    with pytest.raises(InvalidPlanError) as info:
        read_cases(path)
    text = str(info.value)
    assert "unknown column 'rnk'. Did you mean 'rank'?" in text
    assert "unknown column 'sequence'" in text
    assert "Columns are plan options: model, method" in text


def test_plan_from_case_parses_text_and_reports_every_problem():
    plan = plan_from_case(
        {
            "model": "m",
            "rank": "16",
            "alpha": "32",
            "gradient_checkpointing": "yes",
            "targets": "q_proj, v_proj",
            "seq_len": "1024.0",
            "gpu": "T4",
        }
    )
    assert (plan.rank, plan.alpha, plan.gradient_checkpointing, plan.targets, plan.seq_len) == (
        16,
        32.0,
        True,
        ("q_proj", "v_proj"),
        1024,
    )
    with pytest.raises(InvalidPlanError) as info:
        plan_from_case(
            {
                "model": "m",
                "rank": "eight",
                "double_quant": "maybe",
                "method": "qlorra",
                "seq_len": "0",
            }
        )
    assert info.value.problems[:2] == [
        "--rank 'eight' is not an integer.",
        "--double-quant 'maybe' is not true or false.",
    ]
    assert any(p.startswith("--method 'qlorra'") for p in info.value.problems)
    assert any(p.startswith("--seq-len must be a positive integer") for p in info.value.problems)


def test_invalid_rows_get_an_error_and_the_sweep_goes_on(tiny_llama_dir):
    cases = expand_cases(
        {
            "model": [str(tiny_llama_dir), "no/such-model"],
            "method": ["full", "lora"],
            "quant": [None, "nf4"],
        },
        DEFAULTS,
    )
    result = run_sweep(cases, [find_gpu("T4")])
    errors = {(r.case["model"], r.case["method"], r.case["quant"]): r.error for r in result.rows}
    assert errors[(str(tiny_llama_dir), "lora", None)] is None
    assert "--method full trains every weight" in errors[(str(tiny_llama_dir), "full", "nf4")]
    assert "not in the bundled catalog" in errors[("no/such-model", "lora", None)]
    assert result.errors == 5
    records = result.records()
    bad = records[1]
    assert bad["error"] and bad["device_total_bytes"] is None and bad["fits_T4"] is None
    assert bad["model"] == str(tiny_llama_dir) and bad["quant"] == "nf4"


def test_records_equal_estimate_exactly(tiny_llama_dir, tiny_opt_dir):
    cases = expand_cases(
        {
            "model": [str(tiny_llama_dir), str(tiny_opt_dir)],
            "method": ["full", "qlora"],
            "rank": [4, 16],
            "seq_len": [128, 512],
            "batch_size": [1, 3],
        },
        DEFAULTS,
    )
    result = run_sweep(cases, [find_gpu("L4"), find_gpu("H100-80GB")], headroom=0.0)
    assert len(result.rows) == 32 and result.errors == 0
    for row, record in zip(result.rows, result.records(), strict=True):
        expected = estimate(row.plan)
        assert row.estimate == expected
        assert record["device_total_bytes"] == expected.device_total_bytes
        assert record["peak_allocated_bytes"] == expected.peak_allocated_bytes
        assert record["peak_reserved_bytes"] == expected.peak_reserved_bytes
        shown = expected.to_dict()["components"]
        for name, nbytes in expected.components.items():
            if name not in shown:  # a component this plan cannot have: no column, 0 bytes
                assert f"{name}_bytes" not in record and nbytes == 0
                continue
            assert record[f"{name}_bytes"] == nbytes
            assert record[f"{name}_gib"] == pytest.approx(nbytes / 2**30, abs=5e-5)
        assert record["trainable_params"] == expected.trainable_params
        assert record["fits_L4"] is (expected.device_total_bytes <= find_gpu("L4").memory_bytes)
        assert record["smallest_fitting_gpu"] == "L4"


def test_fits_columns_apply_the_headroom(tiny_llama_dir):
    cases = expand_cases({"model": [str(tiny_llama_dir)]}, DEFAULTS)
    total = run_sweep(cases, [find_gpu("L4")]).rows[0].estimate.device_total_bytes
    gpu = find_gpu("L4")
    just = 1 - total / gpu.memory_bytes  # the headroom at which it just fits
    assert run_sweep(cases, [gpu], headroom=just * 0.99).records()[0]["fits_L4"] is True
    assert (
        run_sweep(cases, [gpu], headroom=min(just * 1.01, 0.999)).records()[0]["fits_L4"] is False
    )


def test_inventory_is_built_once_per_model_rank_and_targets(
    tiny_llama_dir, tiny_opt_dir, monkeypatch
):
    calls = []
    real = estimate_module.inventory_for

    def counting(spec, plan):
        calls.append((spec.name, plan.method, plan.rank))
        return real(spec, plan)

    monkeypatch.setattr(estimate_module, "inventory_for", counting)
    cases = expand_cases(
        {
            "model": [str(tiny_llama_dir), str(tiny_opt_dir)],
            "method": ["full", "lora", "qlora"],
            "rank": [4, 8],
            "seq_len": [64, 128, 256],
            "batch_size": [1, 2, 4, 8],
        },
        DEFAULTS,
    )
    result = run_sweep(cases, [find_gpu("T4")])
    assert len(result.rows) == 144 and result.errors == 0
    # per model: one full inventory (rank does not matter) + one per LoRA rank (lora and qlora share it)
    assert len(calls) == 2 * (1 + 2)


def test_cache_remembers_failures(tiny_llama_dir):
    cache = EstimateCache()
    plan = TrainingPlan(str(tiny_llama_dir), targets=("nope",))
    for _ in range(2):
        with pytest.raises(
            InvalidPlanError, match="--targets nope: the model has no linear module"
        ):
            cache.estimate(plan)
    assert len(cache._prepared) == 1


def test_row_gpu_cells_add_fits_columns(tiny_llama_dir):
    rows = [
        {"model": str(tiny_llama_dir), "gpu": "RTX-4090"},
        {"model": str(tiny_llama_dir), "gpu": "no-such-gpu"},
    ]
    result = run_sweep(expand_cases({}, DEFAULTS, rows), [find_gpu("T4")])
    assert [g.name for g in result.gpus] == ["T4", "RTX-4090"]
    good, bad = result.records()
    assert good["gpu"] == "RTX-4090" and good["fits"] is True and good["fits_RTX-4090"] is True
    assert "--gpu 'no-such-gpu' is not in the GPU catalog" in bad["error"]


def test_speed_and_cost_columns_equal_the_cost_module(tiny_llama_dir):
    from vramcalc.planner import plan_result
    from vramcalc.speed.cost import RunLength
    from vramcalc.sweeps import SpeedAndCost

    gpus = [find_gpu("T4"), find_gpu("A100-40GB"), find_gpu("H100-80GB")]
    extras = SpeedAndCost(
        speed=True, run=RunLength(dataset_tokens=10_000_000), price_per_hour_usd=None
    )
    cases = expand_cases({"model": [str(tiny_llama_dir)], "batch_size": [1, 4]}, DEFAULTS)
    result = run_sweep(cases, gpus, extras=extras)
    columns = result.columns
    assert columns.index("tokens_per_second_T4") > columns.index("fits_H100-80GB")
    assert {"optimizer_steps", "cost_usd_A100-40GB", "wall_hours_H100-80GB", "mfu_T4"} <= set(
        columns
    )
    for row, record in zip(result.rows, result.records(), strict=True):
        expected = plan_result(row.plan, gpus, RunLength(dataset_tokens=10_000_000))
        for fit in expected.fits:
            speed = fit.throughput.tokens_per_second if fit.throughput else None
            assert record[f"tokens_per_second_{fit.gpu.name}"] == speed
        assert record["tokens_per_second_T4"] is None  # bf16 on a T4: no estimate, no crash
        priced = {c.gpu_name: c for c in expected.cost.rows}
        assert record["cost_usd_A100-40GB"] == pytest.approx(priced["A100-40GB"].cost_usd)
        assert record["optimizer_steps"] == RunLength(dataset_tokens=10_000_000).optimizer_steps(
            row.plan
        )


def test_cost_only_on_gpus_the_plan_fits(tiny_llama_dir):
    from dataclasses import replace

    from vramcalc.speed.cost import RunLength
    from vramcalc.sweeps import SpeedAndCost

    cases = expand_cases({"model": [str(tiny_llama_dir)]}, DEFAULTS)
    tiny_gpu = replace(find_gpu("A100-40GB"), name="tiny", memory_bytes=2**20)
    result = run_sweep(
        cases, [tiny_gpu, find_gpu("H100-80GB")], extras=SpeedAndCost(run=RunLength(steps=100))
    )
    record = result.records()[0]
    assert record["fits_tiny"] is False and record["cost_usd_tiny"] is None
    assert record["cost_usd_H100-80GB"] > 0 and record["optimizer_steps"] == 100
    assert "tokens_per_second_tiny" not in record  # speed not asked for
    with pytest.raises(InvalidPlanError, match="--price-per-hour must be a positive number"):
        SpeedAndCost(price_per_hour_usd=-1)
