"""The CLI through click's CliRunner: output, JSON schema, errors and exit codes."""

import json

import pytest
from click.testing import CliRunner

from vramcalc.cli import cli


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, list(args), catch_exceptions=False)

    return invoke


def test_the_group_has_help(run):
    """Each command's help: tests/cli/test_commands.py, generated from the group."""
    result = run("--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output and len(result.output) > 200


def test_plan_help_teaches_the_options(run):
    text = run("plan", "--help").output
    for flag in (
        "--model",
        "--method",
        "--quant",
        "--double-quant",
        "--dtype",
        "--rank",
        "--alpha",
        "--dropout",
        "--targets",
        "--seq-len",
        "--batch-size",
        "--grad-accum",
        "--gradient-checkpointing",
        "--optimizer",
        "--attn",
        "--gpu",
        "--json",
        "--num-gpus",
        "--strategy",
    ):
        assert flag in text
    assert "vramcalc plan --model meta-llama/Llama-2-13b --method qlora" in text


def test_plan_human_output(run, tiny_llama_dir):
    result = run("plan", "--model", str(tiny_llama_dir), "--method", "lora", "--gpu", "H100-80GB")
    assert result.exit_code == 0, result.output
    out = result.output
    for text in (
        "base weights",
        "LoRA adapters",
        "peak allocated",
        "peak reserved",
        "device total",
        "GiB",
        "assumptions:",
        "H100-80GB",
        "yes",
    ):
        assert text in out


def test_plan_json_schema_and_components_sum(run, tiny_llama_dir):
    result = run(
        "plan", "--model", str(tiny_llama_dir), "--method", "qlora", "--rank", "4", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in (
        "peak_allocated_bytes",
        "peak_reserved_bytes",
        "device_total_bytes",
        "trainable_params",
        "total_params",
        "components",
        "plan",
        "assumptions",
        "gpus",
    ):
        assert key in data
    for component in (
        "weights",
        "adapters",
        "gradients",
        "optimizer_states",
        "activations",
        "logits",
        "cuda_context",
    ):
        assert component in data["components"]
    assert sum(data["components"].values()) == data["device_total_bytes"]
    assert data["peak_allocated_bytes"] <= data["peak_reserved_bytes"] <= data["device_total_bytes"]
    assert data["plan"]["quant"] == "nf4" and data["plan"]["double_quant"] is True
    assert data["plan"]["rank"] == 4 and data["plan"]["alpha"] == 4.0
    assert data["trainable_params"] == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert all({"name", "memory_bytes", "fits", "headroom_bytes"} <= g.keys() for g in data["gpus"])


def test_catalog_alias_resolves(run):
    result = run(
        "plan", "--model", "meta-llama/Llama-2-13b", "--method", "qlora", "--rank", "16", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "meta-llama/Llama-2-13b-hf" and data["model_source"] == "catalog"
    # 40 layers x (q, v) x 16 x (5120 + 5120)
    assert data["trainable_params"] == 40 * 2 * 16 * 10240


def test_models_and_gpus_list(run):
    models = run("models").output
    assert "meta-llama/Llama-2-7b-hf" in models and "6,738,415,616" in models
    gpus = json.loads(run("gpus", "--json").output)
    assert any(g["name"] == "H100-80GB" and g["memory_bytes"] == 81559 * 2**20 for g in gpus)


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--model", "meta-llama/Llama-2-13", "--method", "qlora"],
            "Error: --model 'meta-llama/Llama-2-13' is not in the bundled catalog",
        ),
        (["--model", "llama-2-7b"], "Did you mean"),
        (["--model", "TINY", "--rank", "0"], "Error: --rank must be a positive integer, got 0."),
        (
            ["--model", "TINY", "--seq-len", "-5"],
            "Error: --seq-len must be a positive integer, got -5.",
        ),
        (
            ["--model", "TINY", "--batch-size", "0"],
            "Error: --batch-size must be a positive integer, got 0.",
        ),
        (
            ["--model", "TINY", "--method", "qlora", "--quant", "none"],
            "Error: --method qlora needs 4-bit base weights",
        ),
        (
            ["--model", "TINY", "--targets", "q_proj,qproj"],
            "Error: --targets qproj: the model has no linear module of that name; its linear modules are "
            "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
        ),
        (
            ["--model", "TINY", "--gpu", "H100-80"],
            "Error: --gpu 'H100-80' is not in the GPU catalog. Did you mean",
        ),
        (["--model", "TINY", "--optimizer", "adamw"], "Did you mean 'adamw_8bit'"),
    ],
)
def test_bad_input_is_one_error_line(run, tiny_llama_dir, args, message):
    args = [str(tiny_llama_dir) if a == "TINY" else a for a in args]
    result = run("plan", *args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.count("Error:") == 1


def test_malformed_config_file(run, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    result = run("plan", "--model", str(bad))
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: --model: {bad} is not valid JSON")
    no_type = tmp_path / "x.json"
    no_type.write_text('{"hidden_size": 4}')
    result = run("plan", "--model", str(no_type))
    assert "is not a transformers config (no 'model_type' field)" in result.output


def test_missing_config_path(run, tmp_path):
    result = run("plan", "--model", str(tmp_path / "nope" / "config.json"))
    assert result.exit_code == 1 and "does not exist" in result.output


def test_the_plan_options_default_to_the_plans_own_defaults():
    """One place for the defaults: the options of plan (and sweep, fit, advise) default to
    TrainingPlan's, which the library (vramcalc.sweep) uses without the CLI."""
    from vramcalc.cli.capacity import plan_defaults
    from vramcalc.training_plan import ADALORA_FIELDS, PLAN_DEFAULTS, PLAN_FIELDS

    assert plan_defaults() == PLAN_DEFAULTS
    assert list(PLAN_DEFAULTS) == list(PLAN_FIELDS)
    assert PLAN_FIELDS[-len(ADALORA_FIELDS) :] == ADALORA_FIELDS
