"""Defaults that match what people run: gradient checkpointing on for k-bit base weights."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from vramcalc.cli import cli
from vramcalc.memory import GIB
from vramcalc.training_plan import TrainingPlan


@pytest.mark.parametrize(
    ("kwargs", "checkpointing"),
    [
        ({"method": "qlora"}, True),
        ({"method": "lora", "quant": "int8"}, True),
        ({"method": "qlora", "quant": "fp4"}, True),
        ({"method": "lora"}, False),
        ({"method": "full"}, False),
        ({"method": "qlora", "gradient_checkpointing": False}, False),
        ({"method": "lora", "gradient_checkpointing": True}, True),
    ],
)
def test_checkpointing_defaults_on_for_kbit_methods_only(kwargs, checkpointing):
    assert TrainingPlan("m", **kwargs).gradient_checkpointing is checkpointing


def test_plan_states_the_checkpointing_choice(tiny_llama_dir):
    run = CliRunner().invoke
    model = ["plan", "--model", str(tiny_llama_dir), "--seq-len", "256"]
    out = run(cli, [*model, "--method", "qlora", "--gpu", "L4"])
    assert out.exit_code == 0, out.output
    assert ", seq 256 x batch 1, gradient checkpointing on\n" in out.output
    assert (
        "  - gradient checkpointing on (use_reentrant=False): the default for k-bit base weights, "
        "as prepare_model_for_kbit_training(use_gradient_checkpointing=True) and the common "
        "QLoRA recipes; --no-gradient-checkpointing switches it off\n"
    ) in out.output
    off = run(
        cli,
        [*model, "--method", "qlora", "--no-gradient-checkpointing"],
    )
    assert ", gradient checkpointing off\n" in off.output
    assert (
        "  - gradient checkpointing off (--no-gradient-checkpointing; k-bit recipes" in off.output
    )
    lora = run(cli, [*model, "--json"])
    assert json.loads(lora.output)["plan"]["gradient_checkpointing"] is False
    assert "gradient checkpointing off (the default without k-bit base weights;" in "\n".join(
        json.loads(lora.output)["assumptions"]
    )


def test_the_mission_example_fits_a_24_gb_card():
    """``plan --model meta-llama/Llama-2-13b --method qlora --rank 16``: about 11 GiB reserved by
    torch, 12-13 GiB on the device with the driver reserve and the CUDA context; fits 24 GB."""
    out = CliRunner().invoke(
        cli,
        [
            "plan",
            "--model",
            "meta-llama/Llama-2-13b",
            "--method",
            "qlora",
            "--rank",
            "16",
            "--json",
        ],
    )
    data = json.loads(out.output)
    assert data["plan"]["gradient_checkpointing"] is True
    assert 10 * GIB < data["peak_reserved_bytes"] < 12 * GIB
    assert 11 * GIB < data["device_total_bytes"] < 14 * GIB
    assert {g["name"]: g["fits"] for g in data["gpus"]}["RTX-4090"] is True
