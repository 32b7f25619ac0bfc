"""One answer everywhere: ``plan --json``, a one-row ``sweep`` and ``fit`` give identical bytes.

Every command goes through ``vramcalc.estimate.prepare``; this checks it from the outside,
over every catalog model and local configs whose activation, dropout and softcapping
differ from their architecture's defaults (the facts a caller used to forget to pass).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.conftest import TINY_LLAMA, TINY_OPT
from vramcalc.catalog import model_catalog, resolve_model
from vramcalc.cli import cli
from vramcalc.errors import InvalidPlanError
from vramcalc.estimate import estimate, prepare
from vramcalc.training_plan import TrainingPlan

TOTALS = ("device_total_bytes", "peak_reserved_bytes", "peak_allocated_bytes")
GPU = "H200"
SEQ = "512"


def _gemma2_softcap() -> dict:
    config = dict(resolve_model("google/gemma-2-2b").config_dict)
    config.update(attn_logit_softcapping=20.0, final_logit_softcapping=None, num_hidden_layers=2)
    return config


LOCAL = {
    "opt-dropout-0": {**TINY_OPT, "dropout": 0.0},
    "opt-dropout-0.3": {**TINY_OPT, "dropout": 0.3, "attention_dropout": 0.2},
    "llama-gelu": {**TINY_LLAMA, "hidden_act": "gelu"},
    "llama-relu": {**TINY_LLAMA, "hidden_act": "relu", "attention_dropout": 0.1},
    "gemma2-softcap": _gemma2_softcap(),
}


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.output


def _three_answers(model: str, tmp_path) -> tuple[dict, dict, dict]:
    code, out = _run(["fit", "--model", model, "--gpu", GPU, "--seq-len", SEQ, "--json"])
    assert code in (0, 3), out
    fitted = json.loads(out)
    probe = fitted["at_value"] or fitted["at_next_step"]
    batch = str(probe["batch_size"])
    code, out = _run(
        ["plan", "--model", model, "--gpu", GPU, "--seq-len", SEQ, "--batch-size", batch, "--json"]
    )
    assert code == 0, out
    planned = json.loads(out)
    path = tmp_path / "row.jsonl"
    args = ["sweep", "--model", model, "--gpu", GPU, "--seq-len", SEQ, "--batch-size", batch]
    code, out = _run([*args, "-q", "-o", str(path)])
    assert code == 0, out
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    return planned, row, probe


@pytest.mark.slow
@pytest.mark.parametrize("model", [e.name for e in model_catalog()] + sorted(LOCAL))
def test_plan_sweep_and_fit_give_identical_bytes(model, tmp_path):
    if model in LOCAL:
        (tmp_path / "config.json").write_text(json.dumps(LOCAL[model]))
        model = str(tmp_path)
    planned, row, probe = _three_answers(model, tmp_path)
    assert row["error"] is None
    for total in TOTALS:
        assert planned[total] == row[total] == probe[total], total
    assert planned["peak_phase"] == row["peak_phase"] == probe["peak_phase"]
    assert {f"{k}_bytes": v for k, v in planned["components"].items()} == {
        f"{k}_bytes": row[f"{k}_bytes"] for k in planned["components"]
    }


def test_config_facts_reach_the_estimate(tmp_path):
    """A non-default dropout changes the bytes, and every entry point sees the change."""
    totals = {}
    for name in ("opt-dropout-0", "opt-dropout-0.3"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(LOCAL[name]))
        plan = TrainingPlan(str(folder), method="full", seq_len=64)
        inventory = prepare(str(folder), plan).inventory
        assert (inventory.dropout, inventory.attention_dropout) == (
            (0.0, 0.0) if name == "opt-dropout-0" else (0.3, 0.2)
        )
        totals[name] = estimate(plan).peak_allocated_bytes
    assert totals["opt-dropout-0.3"] > totals["opt-dropout-0"]


def test_prepared_refuses_a_plan_that_needs_another_inventory(tiny_llama_dir):
    prepared = prepare(str(tiny_llama_dir), TrainingPlan(str(tiny_llama_dir), rank=8))
    assert prepared.estimate(TrainingPlan(str(tiny_llama_dir), rank=8, batch_size=4))
    with pytest.raises(ValueError, match="needs another inventory"):
        prepared.estimate(TrainingPlan(str(tiny_llama_dir), rank=16))


def test_prepare_is_memoized_and_sees_an_edited_local_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    plan = TrainingPlan(str(tmp_path))
    assert prepare(str(tmp_path), plan) is prepare(str(tmp_path), plan)
    (tmp_path / "config.json").write_text(json.dumps({**TINY_LLAMA, "num_hidden_layers": 3}))
    assert prepare(str(tmp_path), plan).inventory.num_layers == 3


def test_prepare_reports_a_bad_target_as_a_plan_error(tiny_llama_dir):
    with pytest.raises(InvalidPlanError, match="--targets nope"):
        prepare(str(tiny_llama_dir), TrainingPlan(str(tiny_llama_dir), targets=("nope",)))
