"""vramcalc.render.export: every format written, read back with pandas, equal to the estimates."""

import json

import openpyxl
import pandas as pd
import pytest

from vramcalc.catalog import find_gpu
from vramcalc.errors import VramcalcError
from vramcalc.render.capacity import header, render_sweep, summary_columns
from vramcalc.render.export import ExportError, output_format, write_sweep
from vramcalc.sweeps import expand_cases, run_sweep

DEFAULTS = {"model": None, "method": "lora", "seq_len": 256, "batch_size": 1}


@pytest.fixture
def result(tiny_llama_dir, tiny_opt_dir):
    cases = expand_cases(
        {
            "model": [str(tiny_llama_dir), str(tiny_opt_dir)],
            "method": ["full", "qlora"],
            "quant": [None, "nf4"],
            "batch_size": [1, 2],
        },
        DEFAULTS,
    )
    return run_sweep(cases, [find_gpu("L4"), find_gpu("H100-80GB")], headroom=0.05)


def _valid(result):
    return [
        (row, rec) for row, rec in zip(result.rows, result.records(), strict=True) if not row.error
    ]


def test_output_format_by_extension():
    assert output_format("a/b.XLSX") == ".xlsx" and output_format("x.md") == ".md"
    with pytest.raises(
        ExportError, match=r"-o out.txt: unknown output format '.txt'; use one of .csv, .xlsx"
    ):
        output_format("out.txt")
    assert issubclass(ExportError, VramcalcError)


def test_header_names_units():
    assert header("device_total_gib") == "device total (GiB)"
    assert header("weights_bytes") == "weights (bytes)"
    assert header("fits_RTX-4090") == "fits RTX-4090"
    assert header("seq_len") == "seq len"
    assert header("price_per_hour_usd") == "price per hour (USD)"
    assert header("cost_usd_RTX-4090") == "cost RTX-4090 (USD)"
    assert header("tokens_per_second_T4") == "tokens/s T4"
    assert header("step_seconds_H100-80GB") == "step H100-80GB (s)"


def test_csv_round_trip(result, tmp_path):
    path = tmp_path / "sweep.csv"
    write_sweep(result, path)
    frame = pd.read_csv(path)
    assert list(frame.columns) == result.columns and len(frame) == len(result.rows) == 16
    assert frame["error"].notna().sum() == result.errors == 4
    for index, (row, _) in enumerate(zip(result.rows, result.records(), strict=True)):
        got = frame.iloc[index]
        if row.error:
            assert got["error"] == row.error and pd.isna(got["device_total_bytes"])
            continue
        est = row.estimate
        assert int(got["device_total_bytes"]) == est.device_total_bytes
        assert int(got["peak_allocated_bytes"]) == est.peak_allocated_bytes
        for name, nbytes in est.to_dict()["components"].items():
            assert int(got[f"{name}_bytes"]) == nbytes
        assert got["device_total_gib"] == pytest.approx(est.device_total_bytes / 2**30, abs=5e-5)
        assert int(got["trainable_params"]) == est.trainable_params
        assert (got["model"], got["method"], int(got["batch_size"])) == (
            est.model_name,
            est.plan.method,
            est.plan.batch_size,
        )
        assert bool(got["fits_L4"]) is (
            est.device_total_bytes <= int(find_gpu("L4").memory_bytes * 0.95)
        )


def test_json_and_jsonl_round_trip(result, tmp_path):
    write_sweep(result, tmp_path / "s.json")
    write_sweep(result, tmp_path / "s.jsonl")
    records = json.loads((tmp_path / "s.json").read_text())
    assert records == result.records()
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert lines == records
    frame = pd.read_json(tmp_path / "s.jsonl", lines=True)
    assert len(frame) == 16


def test_xlsx_sheets_values_and_formatting(result, tmp_path):
    path = tmp_path / "sweep.xlsx"
    write_sweep(result, path)
    details = pd.read_excel(path, sheet_name="details")
    assert list(details.columns) == result.columns and len(details) == 16
    for index, (row, record) in enumerate(zip(result.rows, result.records(), strict=True)):
        if row.error:
            assert details["error"][index] == row.error
            continue
        assert int(details["device_total_bytes"][index]) == row.estimate.device_total_bytes
        assert details["device_total_gib"][index] == pytest.approx(record["device_total_gib"])
        assert bool(details["fits_H100-80GB"][index]) is record["fits_H100-80GB"]

    summary = pd.read_excel(path, sheet_name="summary")
    records = result.records()
    assert list(summary.columns) == [header(c) for c in summary_columns(result, records)]
    assert "device total (GiB)" in summary.columns and "fits L4" in summary.columns
    assert "error" in summary.columns and "total params" not in summary.columns

    gpus = pd.read_excel(path, sheet_name="gpus")
    assert list(gpus["gpu"]) == ["L4", "H100-80GB"] and gpus["headroom"][0] == pytest.approx(0.05)

    book = openpyxl.load_workbook(path)
    assert book.sheetnames == ["summary", "details", "gpus"]
    sheet = book["summary"]
    assert sheet.freeze_panes == "B2" and sheet.auto_filter.ref
    heads = {cell.value: cell.column_letter for cell in sheet[1]}
    assert sheet[f"{heads['device total (GiB)']}2"].number_format == "0.00"
    assert sheet[f"{heads['trainable params']}2"].number_format == "#,##0"
    rules = {str(r.sqref): [rule.formula for rule in r.rules] for r in sheet.conditional_formatting}
    fits_range = next(ref for ref in rules if ref.startswith(heads["fits L4"]))
    assert sorted(rules[fits_range]) == [["FALSE"], ["TRUE"]]
    assert book["details"][f"{heads['model']}1"].value == "model"


def test_markdown_is_a_gfm_table(result):
    text = render_sweep(result, markdown=True)
    lines = text.splitlines()
    assert len(lines) == 2 + 16
    assert [c.strip() for c in lines[0].split("|")][1:9] == [
        "model",
        "method",
        "quant",
        "rank",
        "seq len",
        "batch size",
        "gradient checkpointing",
        "trainable params",
    ]
    assert set(lines[1]) <= set("|-:") and lines[1].count("|") == lines[0].count("|")
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines[2:])
    assert "--method full trains every weight" in text


def test_text_table_shows_varying_columns(result, tiny_llama_dir):
    text = render_sweep(result)
    first, rule = text.splitlines()[:2]
    assert first.split()[:3] == ["model", "method", "quant"] and set(rule) <= {"-", " "}
    assert "seq len" in first  # constant across the sweep, but it defines the rows
    assert "alpha" not in first and "optimizer" not in first  # constant, not defining
    one = run_sweep(expand_cases({"model": [str(tiny_llama_dir)]}, DEFAULTS), [find_gpu("L4")])
    assert "yes" in render_sweep(one).splitlines()[2]


def test_many_gpus_collapse_to_the_smallest_fitting_one_in_tables(tiny_llama_dir):
    from vramcalc.catalog import load_gpus

    one = run_sweep(expand_cases({"model": [str(tiny_llama_dir)]}, DEFAULTS), list(load_gpus()))
    head = render_sweep(one).splitlines()[0]
    assert "fits" not in head and "smallest fitting gpu" in head
    assert render_sweep(one).splitlines()[2].split()[-1] == "A10G"  # T4: no bf16
