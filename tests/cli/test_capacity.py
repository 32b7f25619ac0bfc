"""``vramcalc sweep`` and ``vramcalc fit`` through CliRunner, checked against ``plan --json``."""

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from vramcalc.cli import cli


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return invoke


def plan_json(run, *args):
    result = run("plan", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("command", ["sweep", "fit"])
def test_help(run, command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output and "Example:" in result.output


def test_sweep_help_lists_every_plan_option(run):
    text = run("sweep", "--help").output
    for flag in (
        "--model",
        "--method",
        "--quant",
        "--double-quant",
        "--no-double-quant",
        "--rank",
        "--targets",
        "--seq-len",
        "--batch-size",
        "--gradient-checkpointing",
        "--optimizer",
        "--num-gpus",
        "--cpu-offload",
        "--cases",
        "--gpu",
        "--headroom",
        "--output",
        "--quiet",
    ):
        assert flag in text


@pytest.mark.parametrize("suffix", [".csv", ".xlsx"])
def test_sweep_file_equals_plan_json(run, tiny_llama_dir, tiny_opt_dir, tmp_path, suffix):
    out = tmp_path / f"sweep{suffix}"
    result = run(
        "sweep",
        "--model",
        f"{tiny_llama_dir},{tiny_opt_dir}",
        "--method",
        "lora,qlora",
        "--rank",
        "4,16",
        "--seq-len",
        "128",
        "--seq-len",
        "512",
        "-b",
        "1,3",
        "--gradient-checkpointing",
        "true,false",
        "--gpu",
        "T4,RTX-4090",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    assert "64 plans written to" in result.output
    frame = pd.read_csv(out) if suffix == ".csv" else pd.read_excel(out, sheet_name="details")
    assert len(frame) == 64 and frame["error"].isna().all()
    assert {
        "device_total_gib",
        "device_total_bytes",
        "activations_gib",
        "weights_bytes",
        "trainable_params",
        "fits_T4",
        "fits_RTX-4090",
    } <= set(frame.columns)
    for _, row in frame.iterrows():
        args = [
            "--model",
            row["model"],
            "--method",
            row["method"],
            "--rank",
            int(row["rank"]),
            "--seq-len",
            int(row["seq_len"]),
            "-b",
            int(row["batch_size"]),
            "--gpu",
            "T4,RTX-4090",
        ]
        args.append(
            "--gradient-checkpointing"
            if row["gradient_checkpointing"]
            else "--no-gradient-checkpointing"
        )
        expected = plan_json(run, *args)
        assert int(row["device_total_bytes"]) == expected["device_total_bytes"]
        assert int(row["peak_allocated_bytes"]) == expected["peak_allocated_bytes"]
        assert int(row["peak_reserved_bytes"]) == expected["peak_reserved_bytes"]
        for name, nbytes in expected["components"].items():
            assert int(row[f"{name}_bytes"]) == nbytes
            assert row[f"{name}_gib"] == pytest.approx(nbytes / 2**30, abs=5e-5)
        assert int(row["trainable_params"]) == expected["trainable_params"]
        assert [bool(row["fits_T4"]), bool(row["fits_RTX-4090"])] == [
            g["fits"] for g in expected["gpus"]
        ]
        for key, value in expected["plan"].items():
            if key == "targets":
                continue
            if value is None:  # unset options (modules_to_save, AdaLoRA's total_step, ...)
                assert row[key] is None or row[key] != row[key], key  # NaN in a frame
            else:
                assert row[key] == value, key


def test_sweep_cases_file(run, tiny_llama_dir, tmp_path):
    cases = tmp_path / "cases.csv"
    cases.write_text(
        "model,method,rank,seq-len,batch_size\n"
        f"{tiny_llama_dir},qlora,16,256,2\n"
        f"{tiny_llama_dir},full,,512,\n"
        f"{tiny_llama_dir},lorra,8,256,1\n"
    )
    out = tmp_path / "back.json"
    result = run("sweep", "--cases", cases, "--batch-size", "4", "--gpu", "T4", "-o", out)
    assert result.exit_code == 0, result.output
    assert "1 of 3 plans are invalid; see the error column." in result.output
    rows = json.loads(out.read_text())
    assert [(r["method"], r["rank"], r["seq_len"], r["batch_size"]) for r in rows[:2]] == [
        ("qlora", 16, 256, 2),
        ("full", None, 512, 4),  # full fine-tuning has no rank: blank, not the default 8
    ]
    expected = plan_json(
        run, "--model", tiny_llama_dir, "--method", "full", "--seq-len", "512", "-b", "4"
    )
    assert rows[1]["device_total_bytes"] == expected["device_total_bytes"]
    assert rows[2]["error"].startswith("--method 'lorra' is not one of full, lora, qlora, adalora.")
    assert rows[2]["device_total_bytes"] is None


def test_sweep_cases_unknown_column(run, tmp_path):
    cases = tmp_path / "cases.csv"
    cases.write_text("model,seqlen\nm,512\n")
    result = run("sweep", "--cases", cases)
    assert result.exit_code == 1
    assert result.output.startswith(
        f"Error: --cases {cases}: unknown column 'seqlen'. Did you mean 'seq_len'?"
    )


def test_sweep_stdout_table_and_markdown(run, tiny_llama_dir, tmp_path):
    result = run("sweep", "-m", tiny_llama_dir, "--rank", "4,8", "--gpu", "T4", "--quiet")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["model", "method", "quant", "rank"] and len(lines) == 4
    md = tmp_path / "t.md"
    assert (
        run("sweep", "-m", tiny_llama_dir, "--rank", "4,8", "--gpu", "T4", "-o", md).exit_code == 0
    )
    head = [c.strip() for c in md.read_text().splitlines()[0].split("|")]
    assert head[1:6] == ["model", "method", "quant", "rank", "alpha"]


def test_sweep_bad_values_fail_like_plan(run, tiny_llama_dir):
    result = run("sweep", "-m", tiny_llama_dir, "--method", "lora,qlorra")
    assert result.exit_code == 2
    assert "Invalid value for '--method': 'qlorra' is not one of" in result.output
    result = run("sweep", "-m", tiny_llama_dir, "--rank", "8,x")
    assert result.exit_code == 2 and "'x' is not a valid integer" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu", "RTX-9999"], "Error: --gpu 'RTX-9999' is not in the GPU catalog."),
        (["-o", "out.txt"], "Error: -o out.txt: unknown output format '.txt'"),
        (
            ["--headroom", "5"],
            "Error: --headroom must be a fraction in [0, 1) or a percentage such as 5%, got '5' (did you mean 5%?).",
        ),
    ],
)
def test_sweep_errors_are_one_line(run, tiny_llama_dir, args, message):
    result = run("sweep", "-m", tiny_llama_dir, *args)
    assert result.exit_code == 1 and result.output.startswith(message)
    assert result.output.count("\n") == 1


def test_sweep_unknown_model_on_the_command_line_is_an_error(run):
    result = run("sweep", "-m", "meta-llama/Llama-2-7b-hf,no-such/model-xyz")
    assert result.exit_code == 1
    assert result.output.startswith(
        "Error: --model 'no-such/model-xyz' is not in the bundled catalog"
    )


def test_sweep_needs_a_model(run):
    result = run("sweep", "--rank", "8")
    assert (
        result.exit_code == 1 and "Error: --model is required (or --cases FILE.csv" in result.output
    )


def test_sweep_bool_switches(run, tiny_llama_dir, tmp_path):
    out = tmp_path / "b.csv"
    result = run(
        "sweep",
        "-m",
        tiny_llama_dir,
        "--gradient-checkpointing",
        "--no-gradient-checkpointing",
        "--method",
        "qlora",
        "--no-double-quant",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert (
        list(frame["gradient_checkpointing"]) == [True, False] and not frame["double_quant"].any()
    )


def test_fit_finds_the_batch_boundary_like_plan(run, tiny_llama_dir):
    result = run(
        "fit",
        "-m",
        tiny_llama_dir,
        "--method",
        "qlora",
        "--gpu",
        "L4",
        "--seq-len",
        "1024",
        "--headroom",
        "5%",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["field"] == "batch_size" and data["found"] and not data["limit_reached"]
    batch = data["value"]
    budget = int(data["gpu_memory_bytes"] * 0.95)
    assert data["budget_bytes"] == budget
    at = plan_json(run, "-m", tiny_llama_dir, "--method", "qlora", "--seq-len", "1024", "-b", batch)
    above = plan_json(
        run, "-m", tiny_llama_dir, "--method", "qlora", "--seq-len", "1024", "-b", batch + 1
    )
    assert at["device_total_bytes"] <= budget < above["device_total_bytes"]
    assert data["at_value"]["device_total_bytes"] == at["device_total_bytes"]
    assert data["at_next_step"]["device_total_bytes"] == above["device_total_bytes"]
    assert data["plan"] == at["plan"]


def test_fit_sequence_length_with_batch_size(run, tiny_opt_dir):
    result = run(
        "fit", "-m", tiny_opt_dir, "--gpu", "L4", "-b", "64", "--seq-multiple", "16", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["field"] == "seq_len" and data["step"] == 16 and data["value"] % 16 == 0
    seq = data["value"]
    assert data["at_value"]["seq_len"] == seq and data["at_value"]["batch_size"] == 64
    if not data["limit_reached"]:
        above = plan_json(run, "-m", tiny_opt_dir, "--seq-len", seq + 16, "-b", "64")
        assert above["device_total_bytes"] > data["budget_bytes"]


def test_fit_human_output(run, tiny_llama_dir):
    result = run("fit", "-m", tiny_llama_dir, "--method", "qlora", "--gpu", "RTX-4090")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "on RTX-4090" in text and "headroom 5% → budget" in text
    assert (
        "largest batch size that fits:" in text
        and "does not fit" in text
        and "device total" in text
    )


def test_fit_nothing_fits_exits_3(run):
    result = run("fit", "-m", "meta-llama/Llama-2-70b-hf", "--method", "full", "--gpu", "RTX-4090")
    assert result.exit_code == 3
    assert "Does not fit even at batch size 1: device total" in result.output
    assert "Error" not in result.output
    data = json.loads(
        run(
            "fit",
            "-m",
            "meta-llama/Llama-2-70b-hf",
            "--method",
            "full",
            "--gpu",
            "RTX-4090",
            "--json",
        ).output
    )
    assert (
        data["found"] is False and data["value"] is None and data["at_next_step"]["batch_size"] == 1
    )


def test_fit_errors(run, tiny_llama_dir):
    result = run("fit", "-m", tiny_llama_dir, "--gpu", "RTX-9999")
    assert result.exit_code == 1 and result.output.startswith(
        "Error: --gpu 'RTX-9999' is not in the GPU catalog."
    )
    result = run("fit", "-m", "no-such/model-xyz", "--gpu", "T4")
    assert result.exit_code == 1 and result.output.startswith("Error: --model 'no-such/model-xyz'")
    result = run("fit", "-m", tiny_llama_dir, "--gpu", "T4", "--seq-len", "512", "-b", "2")
    assert result.exit_code == 2 and "not both" in result.output
    result = run("fit", "-m", tiny_llama_dir, "--gpu", "T4", "--headroom", "150%")
    assert result.exit_code == 1 and "Error: --headroom must be a fraction" in result.output


def test_sweep_speed_and_cost_columns_equal_plan_json(run, tiny_llama_dir, tmp_path):
    out = tmp_path / "cost.csv"
    args = ["--gpu", "A100-40GB,RTX-4090", "--dataset-tokens", "5000000", "--price-per-hour", "2.5"]
    result = run("sweep", "-m", tiny_llama_dir, "-b", "1,8", "--speed", *args, "-o", out)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    for _, row in frame.iterrows():
        expected = plan_json(run, "-m", tiny_llama_dir, "-b", int(row["batch_size"]), *args)
        for gpu in expected["gpus"]:
            assert row[f"tokens_per_second_{gpu['name']}"] == pytest.approx(
                gpu["tokens_per_second"]
            )
            assert row[f"mfu_{gpu['name']}"] == pytest.approx(gpu["mfu"])
        for priced in expected["cost"]["gpus"]:
            assert row[f"cost_usd_{priced['gpu']}"] == pytest.approx(priced["cost_usd"])
            assert row[f"gpu_hours_{priced['gpu']}"] == pytest.approx(priced["gpu_hours"])
        assert row["optimizer_steps"] == expected["cost"]["run"]["optimizer_steps"]


def test_sweep_run_length_errors(run, tiny_llama_dir):
    result = run("sweep", "-m", tiny_llama_dir, "--dataset-tokens", "100", "--steps", "5")
    assert result.exit_code == 1
    assert result.output.startswith("Error: --dataset-tokens and --steps both set the run length")


def test_sweep_over_gpu_counts_shows_speed_per_gpu_and_for_all(run, tiny_llama_dir, tmp_path):
    out = tmp_path / "gpus.csv"
    args = ["--gpu", "H100", "--strategy", "fsdp", "--seq-len", "256"]
    result = run("sweep", "-m", tiny_llama_dir, "--num-gpus", "1,4", "--speed", *args, "-o", out)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    for _, row in frame.iterrows():
        n = int(row["num_gpus"])
        expected = plan_json(run, "-m", tiny_llama_dir, "--num-gpus", n, *args)["gpus"][0]
        per_gpu = row["tokens_per_second_H100-80GB"]
        assert per_gpu == pytest.approx(expected["tokens_per_second"])
        assert row["tokens_per_second_all_gpus_H100-80GB"] == pytest.approx(n * per_gpu)
        assert row["mfu_H100-80GB"] == pytest.approx(expected["mfu"])
        measured = bool(row["speed_measured_H100-80GB"])
        assert measured is bool(expected["speed_measured"])  # as plan says
        assert measured is (n == 1)  # the constants were fitted on H100 too, but never 4 GPUs
    shown = run("sweep", "-m", tiny_llama_dir, "--num-gpus", "1,4", "--speed", *args).output
    assert "tokens/s all GPUs H100-80GB" in shown and "tokens/s H100-80GB" in shown
