"""Output people can read (items 4 and 5 of the first-run issue): GPUs that cannot run the
recipe, the condensed GPU list, one cost line per GPU, tables drawn by tabulate."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from vramcalc.catalog import find_gpu, load_gpus
from vramcalc.checks import recipe_blocker
from vramcalc.cli import cli
from vramcalc.render.tables import table
from vramcalc.sweeps import expand_cases, run_sweep
from vramcalc.training_plan import TrainingPlan

NO_BF16 = {"T4", "V100-16GB", "V100-32GB"}


def _run(*args: str):
    return CliRunner().invoke(cli, list(args))


def _plan(*args: str) -> dict:
    result = _run("plan", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- item 4: GPUs that cannot run the recipe -------------------------------------------------
def test_only_turing_and_volta_lack_bf16():
    assert {g.name for g in load_gpus() if not g.has_bf16} == NO_BF16


def test_a_bf16_plan_does_not_fit_a_card_without_bf16_and_says_why(tiny_llama_dir):
    model = ("--model", str(tiny_llama_dir), "--seq-len", "256")
    gpus = {g["name"]: g for g in _plan(*model)["gpus"]}
    t4 = gpus["T4"]
    assert t4["headroom_bytes"] > 0 and t4["fits"] is False
    assert t4["blocked_by"] == (
        "no bf16: T4 has no bf16 tensor cores, so the recipe's Trainer(bf16=True) cannot run "
        "there; plan it with --dtype fp16 (fp16 autocast with loss scaling)"
    )
    assert t4["tokens_per_second"] is None and gpus["L4"]["blocked_by"] is None
    fp16 = {g["name"]: g for g in _plan(*model, "--dtype", "fp16")["gpus"]}
    assert fp16["T4"]["fits"] is True and fp16["T4"]["blocked_by"] is None
    assert fp16["T4"]["tokens_per_second"] > 0


def test_the_sweep_never_picks_a_card_without_bf16_for_a_bf16_plan(tiny_llama_dir):
    cases = expand_cases(
        {"model": [str(tiny_llama_dir)], "dtype": ["bf16", "fp16"], "seq_len": [256]},
        {"method": "lora"},
    )
    bf16, fp16 = run_sweep(cases, list(load_gpus())).records()
    assert bf16["fits_T4"] is False and bf16["smallest_fitting_gpu"] == "A10G"
    assert fp16["fits_T4"] is True and fp16["smallest_fitting_gpu"] == "T4"


def test_fit_refuses_a_card_that_cannot_run_the_recipe(tiny_llama_dir):
    result = _run("fit", "--model", str(tiny_llama_dir), "--gpu", "V100-32GB", "--seq-len", "256")
    assert result.exit_code == 1
    assert result.output == (
        "Error: --gpu V100-32GB: V100-32GB has no bf16 tensor cores, so the recipe's "
        "Trainer(bf16=True) cannot run there; plan it with --dtype fp16 (fp16 autocast with loss "
        "scaling).\n"
    )
    assert recipe_blocker(TrainingPlan("m", dtype="fp16"), find_gpu("T4")) is None


def test_gpus_table_keeps_bf16_and_fp16_apart_and_explains_every_dash():
    result = _run("gpus")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.split()[0] in _names()}
    for gpu in load_gpus():
        bf16, fp16 = rows[gpu.name][3], rows[gpu.name][4]  # name, memory (2 words), bf16, fp16
        expected = "none" if not gpu.has_bf16 else _number(gpu.bf16_dense_tflops)
        assert (bf16, fp16) == (expected, _number(gpu.fp16_dense_tflops))
    assert rows["T4"][3:5] == ["none", "65"]
    assert lines[-2:] == [
        "bf16 'none': T4, V100-16GB, V100-32GB have no bf16 tensor cores; bf16 plans do not run "
        "there (plan them with --dtype fp16)",
        "memory: what nvidia-smi reports as total; TFLOP/s: dense tensor-core peaks",
    ]
    memory = [g.memory_bytes for g in sorted(load_gpus(), key=lambda g: g.memory_bytes)]
    assert [find_gpu(name).memory_bytes for name in rows] == memory


def _names() -> set[str]:
    return {g.name for g in load_gpus()}


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


# -- item 5: the plan report ------------------------------------------------------------------
def _gpu_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("GPU "))
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip() or line.split()[0] not in _names():
            break
        rows.append(line.split())
    return rows


def test_plan_lists_the_fitting_gpus_smallest_first_and_counts_the_rest():
    result = _run("plan", "--model", "meta-llama/Llama-3.1-8B", "--method", "lora")
    assert result.exit_code == 0, result.output
    rows = _gpu_rows(result.output)
    names = [row[0] for row in rows]
    assert all(row[3] == "yes" for row in rows)
    memory = [find_gpu(n).memory_bytes for n in names]
    assert memory == sorted(memory)
    data = _plan("--model", "meta-llama/Llama-3.1-8B", "--method", "lora")
    fitting = [g["name"] for g in data["gpus"] if g["fits"]]
    assert sorted(names) == sorted(fitting)
    too_small = sum(1 for g in data["gpus"] if g["headroom_bytes"] < 0)
    assert f"{too_small} more GPUs of the catalog do not fit (--all-gpus lists every GPU)" in (
        result.output.splitlines()
    )


def test_all_gpus_and_explicit_gpus_list_every_requested_card():
    everything = _run("plan", "--model", "facebook/opt-125m", "--all-gpus")
    assert len(_gpu_rows(everything.output)) == len(load_gpus())
    assert "more GPU" not in everything.output
    chosen = _run("plan", "--model", "meta-llama/Llama-2-70b-hf", "--gpu", "H100,T4")
    rows = _gpu_rows(chosen.output)
    assert [(r[0], r[3]) for r in rows] == [("T4", "no"), ("H100-80GB", "no")]
    assert "fits no GPU of the list: the largest, H100-80GB (79.65 GiB), is " in chosen.output


def test_every_dash_in_the_gpu_table_has_a_note():
    text = _run("plan", "--model", "facebook/opt-125m", "--all-gpus").output
    for row in _gpu_rows(text):
        if "-" in row:
            assert any(line.startswith(f"  {row[0]}: ") for line in text.splitlines()), row[0]


def test_cost_is_one_line_per_gpu_and_sources_only_with_verbose():
    args = ("plan", "--model", "facebook/opt-125m", "--gpu", "L4,H100", "--steps", "100")
    text = _run(*args).output
    block = text[text.index("run: 100 optimizer steps") :].splitlines()
    assert block[1].split()[0] == "GPU" and set(block[2]) <= {"-", " "}
    assert [line.split()[0] for line in block[3:]] == ["L4", "H100-80GB"]
    assert "price" not in text.lower().replace("$/gpu-h", "")
    verbose = _run(*args, "--verbose").output
    assert "  price L4: AWS EC2 on-demand Linux us-east-1" in verbose
    assert "rules and sources:" in verbose and "  calibration.cuda_runtime_bytes: " in verbose
    data = _plan(*args[1:])
    assert data["cost"]["gpus"][0]["price_source"].startswith("AWS EC2 on-demand")


# -- item 5: fit messages and tables ------------------------------------------------------------
def test_fit_at_batch_1_does_not_advise_a_smaller_batch():
    result = _run(
        "fit", "--model", "facebook/opt-6.7b", "--method", "full", "--gpu", "RTX-4090", "-b", "1"
    )
    assert result.exit_code == 3
    assert result.output.splitlines()[-1] == (
        "Try --method qlora, --gradient-checkpointing, a larger GPU."
    )


def test_headroom_percent_is_written_once():
    help_text = _run("fit", "--help").output
    assert "%%" not in help_text and "5%" in help_text
    error = _run("fit", "--model", "facebook/opt-125m", "--gpu", "L4", "--headroom", "50")
    assert error.output == (
        "Error: --headroom must be a fraction in [0, 1) or a percentage such as 5%, got '50' "
        "(did you mean 50%?).\n"
    )


def test_the_sweep_table_keeps_the_columns_that_define_a_row(tiny_llama_dir):
    result = _run("sweep", "--model", str(tiny_llama_dir), "--seq-len", "256", "-q")
    head = re.split(r"\s{2,}", result.stdout.splitlines()[0].strip())
    assert head[:7] == [
        "model",
        "method",
        "quant",
        "rank",
        "seq len",
        "batch size",
        "gradient checkpointing",
    ]


def test_one_table_helper_draws_text_and_markdown():
    rows = [["a|b", "1,024"], ["c", "5"]]
    assert table(rows, ["name", "n"], [False, True]).splitlines() == [
        "name        n",
        "------  -----",
        "a|b     1,024",
        "c           5",
    ]
    assert table(rows, ["name", "n"], [False, True], markdown=True).splitlines() == [
        "| name   |     n |",
        "|:-------|------:|",
        "| a\\|b   | 1,024 |",
        "| c      |     5 |",
    ]


def test_no_module_pads_tables_by_hand():
    package = Path(__file__).resolve().parents[2] / "vramcalc"
    for path in package.rglob("*.py"):
        text = path.read_text()
        assert ".ljust(" not in text and ".rjust(" not in text, path
        if path != package / "render" / "tables.py":
            assert "tabulate" not in text, path


def test_the_library_does_not_import_the_text_module():
    """planner, sweep, fit and cost compute; only render (and the CLI) write text."""
    import subprocess
    import sys

    code = (
        "import sys, vramcalc.planner, vramcalc.sweeps, vramcalc.fitting, vramcalc.speed.cost, "
        "vramcalc.render.export; print('vramcalc.render.tables' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"  # export writes .md through render
    code = code.replace(", vramcalc.render.export", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_accuracy_report_tables_are_github_markdown(tiny_llama_dir):
    from vramcalc.accuracy import build_report
    from vramcalc.estimate import estimate
    from vramcalc.render.accuracy import render_markdown

    plan = TrainingPlan(str(tiny_llama_dir), seq_len=256)
    est = estimate(plan)
    record = plan.to_dict() | {
        "split": "validation",
        "status": "ok",
        "case_id": "c1",
        "gpu_memory_bytes": 80 * 2**30,
        "device_total_bytes": est.device_total_bytes,
        "peak_reserved_bytes": est.peak_reserved_bytes,
        "peak_allocated_bytes": est.peak_allocated_bytes,
    }
    text = render_markdown(build_report([record], ["x.jsonl"]), [])
    start = text.index("| metric")
    assert text[start:].splitlines()[:5] == [
        "| metric                      |   n |   median abs |   p90 abs |   max abs |   worst under-estimate |",
        "|:----------------------------|----:|-------------:|----------:|----------:|-----------------------:|",
        "| lora · device_total_bytes   |   1 |       0.00 % |    0.00 % |    0.00 % |                 0.00 % |",
        "| lora · peak_reserved_bytes  |   1 |       0.00 % |    0.00 % |    0.00 % |                 0.00 % |",
        "| lora · peak_allocated_bytes |   1 |       0.00 % |    0.00 % |    0.00 % |                 0.00 % |",
    ]
    cases = text[text.index("| case_id") :].splitlines()
    assert cases[1].startswith("|:----") and cases[2].startswith("| c1 ")


def test_the_accuracy_report_shows_the_timeline_picture_it_is_given():
    from vramcalc.accuracy import build_report
    from vramcalc.render.accuracy import render_markdown

    report = build_report([], [])
    assert "timeline" not in render_markdown(report, [])
    text = render_markdown(report, [], "timeline_abc.png")
    assert "## Predicted vs measured memory timeline" in text
    assert text.rstrip().endswith("![predicted vs measured memory timeline](timeline_abc.png)")
