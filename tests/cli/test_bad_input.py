"""Bad input never ends in a traceback, and a sweep never loses its rows.

Each bad input gives one ``Error: ...`` line (exit 1) or a row in the sweep's error
column; suspicious but valid plans give one ``Warning: ...`` line on stderr each.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.conftest import TINY_LLAMA, TINY_OPT
from vramcalc.cli import cli

BERT = {
    "model_type": "bert",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 100,
}


def _config(tmp_path, name: str, config: dict) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


BAD_CONFIGS = [
    (
        "wrong-type",
        {**TINY_LLAMA, "hidden_size": "big"},
        "Field 'hidden_size' expected int, got str (value: 'big')",
    ),
    (
        "heads",
        {**TINY_LLAMA, "hidden_size": 66},
        "The hidden size (66) is not a multiple of the number of attention heads (4).",
    ),
    (
        "negative-layers",
        {**TINY_LLAMA, "num_hidden_layers": -2},
        "num_hidden_layers must be a positive integer, got -2.",
    ),
    (
        "several-sizes",
        {**TINY_OPT, "num_hidden_layers": 0, "ffn_dim": -1},
        "num_hidden_layers must be a positive integer, got 0; "
        "intermediate_size must be a positive integer, got -1.",
    ),
    (
        "unknown-type",
        {**TINY_LLAMA, "model_type": "llamax"},
        "model_type 'llamax' is not an architecture this transformers",
    ),
    (
        "bert",
        BERT,
        "'bert' is an encoder (masked-LM or encoder-decoder) architecture, not a causal LM; "
        "vramcalc estimates decoder-only causal-LM fine-tuning (AutoModelForCausalLM). "
        "Run 'vramcalc models' for the catalog.",
    ),
]


@pytest.mark.parametrize(
    ("name", "config", "message"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS]
)
@pytest.mark.parametrize("command", ["plan", "fit"])
def test_a_broken_local_config_is_one_error_line(tmp_path, name, config, message, command):
    model = _config(tmp_path, name, config)
    args = ["--gpu", "H100-80GB"] if command == "fit" else []
    result = _invoke(command, "--model", model, *args)
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    (line,) = result.output.splitlines()
    assert line.startswith(f"Error: --model {model}: ")
    assert message in line


def test_an_unknown_model_type_is_short_and_points_to_the_catalog(tmp_path):
    model = _config(tmp_path, "x", {**TINY_LLAMA, "model_type": "llamax"})
    result = _invoke("plan", "--model", model)
    assert result.output.startswith(f"Error: --model {model}: model_type 'llamax' is not an ")
    assert "Did you mean 'llama'" in result.output
    assert result.output.endswith("Run 'vramcalc models' for the bundled catalog.\n")
    assert len(result.output) < 400


def test_sweep_output_into_a_missing_folder_fails_before_computing(tmp_path, monkeypatch):
    import vramcalc.sweeps

    def never(*args, **kwargs):
        raise AssertionError("the sweep ran")

    monkeypatch.setattr(vramcalc.sweeps, "run_sweep", never)
    missing = tmp_path / "no" / "such" / "plans.csv"
    result = _invoke("sweep", "--model", "facebook/opt-125m", "-o", str(missing))
    assert result.exit_code == 1
    assert result.output == (
        f"Error: -o {missing}: the folder {missing.parent} does not exist; create it first.\n"
    )


def test_a_broken_model_in_a_sweep_gets_error_rows_and_the_others_are_written(tmp_path):
    good = _config(tmp_path, "good", TINY_LLAMA)
    bad = _config(tmp_path, "bad", {**TINY_LLAMA, "hidden_size": "big"})
    out = tmp_path / "plans.jsonl"
    result = _invoke("sweep", "--model", f"{good},{bad}", "--rank", "4,8", "-q", "-o", str(out))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["model"], r["rank"], r["error"] is None) for r in rows] == [
        (good, 4, True),
        (good, 8, True),
        (bad, 4, False),
        (bad, 8, False),
    ]
    assert rows[2]["error"] == (
        f"--model {bad}: Field 'hidden_size' expected int, got str (value: 'big')"
    )
    assert "2 of 4 plans are invalid; see the error column." in result.output


def test_a_broken_model_in_a_cases_file_gets_an_error_row(tmp_path):
    good = _config(tmp_path, "good", TINY_OPT)
    bert = _config(tmp_path, "bert", BERT)
    cases = tmp_path / "cases.csv"
    cases.write_text(f"model,seq_len\n{good},128\n{bert},128\n{good},256\n")
    out = tmp_path / "out.csv"
    result = _invoke("sweep", "--cases", str(cases), "-q", "-o", str(out))
    assert result.exit_code == 0, result.output
    import csv

    rows = list(csv.DictReader(out.open()))
    assert [bool(r["error"]) for r in rows] == [False, True, False]
    assert "'bert' is an encoder" in rows[1]["error"]


def test_a_typo_in_sweep_models_still_stops_the_sweep():
    result = _invoke("sweep", "--model", "facebook/opt-125m,facebook/opt-125", "-q")
    assert result.exit_code == 1
    assert result.output.startswith("Error: --model 'facebook/opt-125' is not in the bundled ")


@pytest.mark.parametrize(
    ("args", "warning"),
    [
        (
            ["--seq-len", "1024"],
            "Warning: --seq-len 1024 is beyond the model's max_position_embeddings (512); the "
            "estimate assumes the run works at that length anyway (e.g. with RoPE scaling).",
        ),
        (
            ["--rank", "40"],
            "Warning: --rank 40 is above the smallest targeted dimension (v_proj: 32); the update "
            "of that layer cannot have a higher rank, so the extra rank adds parameters and "
            "memory but no capacity.",
        ),
        (
            ["--method", "full", "--rank", "16", "--targets", "q_proj"],
            "Warning: --rank, --targets only apply to LoRA; --method full trains every weight "
            "and ignores them.",
        ),
        (
            ["--strategy", "fsdp"],
            "Warning: --strategy fsdp has no effect on one GPU (--num-gpus 1): the plan is "
            "estimated as single-GPU training.",
        ),
    ],
)
def test_suspicious_plans_warn_on_one_stderr_line_and_go_on(tiny_llama_dir, args, warning):
    result = _invoke("plan", "--model", str(tiny_llama_dir), "--seq-len", "256", *args, "--json")
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [warning]
    assert json.loads(result.stdout)["warnings"] == [warning.removeprefix("Warning: ")]


def test_a_plain_plan_has_no_warnings(tiny_llama_dir):
    result = _invoke("plan", "--model", str(tiny_llama_dir), "--seq-len", "256")
    assert result.exit_code == 0 and result.stderr == ""


def test_sweep_warns_once_per_distinct_warning(tiny_llama_dir):
    result = _invoke("sweep", "--model", str(tiny_llama_dir), "--rank", "8,40,64", "-q")
    assert result.exit_code == 0
    assert [line for line in result.stderr.splitlines() if "--rank" in line] == [
        "Warning: --rank 40 is above the smallest targeted dimension (v_proj: 32); the update "
        "of that layer cannot have a higher rank, so the extra rank adds parameters and memory "
        "but no capacity. (1 of 3 plans)",
        "Warning: --rank 64 is above the smallest targeted dimension (v_proj: 32); the update "
        "of that layer cannot have a higher rank, so the extra rank adds parameters and memory "
        "but no capacity. (1 of 3 plans)",
    ]


# -- names and targets (item 6) ----------------------------------------------------------------
def test_a_gpu_family_name_suggests_its_members(tiny_llama_dir):
    result = _invoke("plan", "--model", str(tiny_llama_dir), "--gpu", "a100")
    assert result.exit_code == 1
    assert result.output == (
        "Error: --gpu 'a100' is not in the GPU catalog. Did you mean 'A100-40GB', 'A100-80GB'? "
        "Run 'vramcalc gpus' for the list.\n"
    )


def test_a_legacy_hub_name_is_a_hub_id():
    result = _invoke("plan", "--model", "gpt2")
    assert result.exit_code == 1
    assert result.output == (
        "Error: --model 'gpt2' is not in the bundled catalog and the hub is not used offline "
        "(HF_HUB_OFFLINE/VRAMCALC_OFFLINE). Run 'vramcalc models' for the catalog, or pass a "
        "local directory or config.json path.\n"
    )
    spaced = _invoke("plan", "--model", "not a model")
    assert "and it is not a hub id (org/name, or a legacy name such as gpt2)." in spaced.output


def test_the_output_head_is_a_lora_target(tiny_llama_dir):
    result = _invoke(
        "plan", "--model", str(tiny_llama_dir), "--seq-len", "256", "--targets", "lm_head", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["trainable_params"] == 8 * (64 + 256)  # r x (hidden + vocab)
    (approx,) = [a for a in data["assumptions"] if a.startswith("APPROXIMATE activations")]
    assert "LoRA on the output head (lm_head) is not modelled" in approx
    bad = _invoke("plan", "--model", str(tiny_llama_dir), "--targets", "lm_haed")
    assert bad.output.startswith("Error: --targets lm_haed: the model has no linear module")


def test_several_plan_problems_read_as_sentences():
    result = _invoke("plan", "--model", "facebook/opt-125m", "--rank", "0", "--seq-len", "-1")
    assert result.exit_code == 1
    assert result.output == (
        "Error: --rank must be a positive integer, got 0. "
        "--seq-len must be a positive integer, got -1.\n"
    )
