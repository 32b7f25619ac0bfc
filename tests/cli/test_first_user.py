"""Issue 22, what a first user trips over: each item as the CLI answers it (exact text, exit
codes), never a traceback."""

from __future__ import annotations

import csv
import json
import logging
import warnings

import pytest
from click.testing import CliRunner

from tests.conftest import TINY_LLAMA
from vramcalc.cli import cli
from vramcalc.cli.quiet import libraries_quiet

AXOLOTL = "base_model: {model}\nadapter: lora\nlora_r: 16\nsequence_len: 256\nmicro_batch_size: 2\n"


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def _json(*args: str) -> dict:
    result = _invoke("plan", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- 1. tracebacks and silent acceptance -------------------------------------------------------
@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig", "utf-32"])
def test_a_from_file_with_a_byte_order_mark_plans_as_utf8_does(tmp_path, tiny_llama_dir, encoding):
    text = AXOLOTL.format(model=tiny_llama_dir)
    plain, marked = tmp_path / "plain.yml", tmp_path / "marked.yml"
    plain.write_bytes(text.encode("utf-8"))
    marked.write_bytes(
        text.encode(encoding) if encoding != "utf-16-be" else b"\xfe\xff" + text.encode(encoding)
    )
    assert marked.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff", b"\xef\xbb")
    by_mark, by_utf8 = _json("--from", str(marked)), _json("--from", str(plain))
    assert by_mark["device_total_bytes"] == by_utf8["device_total_bytes"]
    assert by_mark["plan"] == by_utf8["plan"] and by_mark["plan"]["rank"] == 16


def test_a_latin1_from_file_is_one_error_line(tmp_path, tiny_llama_dir):
    path = tmp_path / "latin.yml"
    path.write_bytes(("# café\n" + AXOLOTL.format(model=tiny_llama_dir)).encode("latin-1"))
    result = _invoke("plan", "--from", str(path))
    assert result.exit_code == 1
    assert result.output == (
        f"Error: --from '{path}': not UTF-8 text (byte 0xe9 on line 1); save it as UTF-8 "
        "(or UTF-16 with a byte-order mark).\n"
    )


def test_utf16_without_a_mark_is_one_error_line(tmp_path, tiny_llama_dir):
    path = tmp_path / "nomark.yml"
    path.write_bytes(AXOLOTL.format(model=tiny_llama_dir).encode("utf-16-le"))
    result = _invoke("plan", "--from", str(path))
    assert result.exit_code == 1
    assert result.output == (
        f"Error: --from '{path}': not UTF-8 text (it holds NUL bytes: UTF-16 without a "
        "byte-order mark?); save it as UTF-8.\n"
    )


def test_a_utf16_model_config_is_read(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes(json.dumps(TINY_LLAMA).encode("utf-16"))
    assert _json("--model", str(folder), "--seq-len", "256")["total_params"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--seq-len", "99999999999999999999"],
            "Error: --seq-len 99999999999999999999 is past any physical meaning: more than "
            "int64 counts (9,223,372,036,854,775,807).\n",
        ),
        (
            ["--batch-size", str(10**12)],
            "Error: the plan needs 1.7 EiB per GPU, past any physical meaning (more than 1 PiB, "
            "over 5,000 times the largest GPU's memory); check --seq-len 256, --batch-size "
            "1000000000000 and --rank 8.\n",
        ),
        (
            ["--seq-len", str(2**40), "--batch-size", str(2**30)],
            "Error: --seq-len x --batch-size x --grad-accum x --num-gpus = "
            "1,180,591,620,717,411,303,424 tokens per optimizer step, past any physical "
            "meaning: more than int64 counts.\n",
        ),
        (
            ["--dataset-tokens", str(10**30)],
            "Error: --dataset-tokens 1000000000000000000000000000000 is past any physical "
            "meaning: more than int64 counts (9,223,372,036,854,775,807).\n",
        ),
    ],
)
def test_values_past_physical_meaning_are_one_error_line(tiny_llama_dir, args, message):
    base = {"--seq-len": "256"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    flat = [part for pair in base.items() for part in pair]
    result = _invoke("plan", "--model", str(tiny_llama_dir), *flat)
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.output == message


def test_a_huge_batch_is_refused_before_any_simulation(tiny_llama_dir, monkeypatch):
    import vramcalc.memory.slack

    def never(*args, **kwargs):
        raise AssertionError("a plan of exabytes was simulated")

    monkeypatch.setattr(vramcalc.memory.slack, "simulate_plan", never)
    result = _invoke(
        "plan", "--model", str(tiny_llama_dir), "--batch-size", str(10**12),
        "--allocator-model", "simulate",
    )  # fmt: skip
    assert result.exit_code == 1 and result.output.startswith("Error: the plan needs ")


def test_a_million_micro_batches_plan_in_seconds(tiny_llama_dir):
    data = _json("--model", str(tiny_llama_dir), "--seq-len", "256", "--grad-accum", str(10**6))
    assert data["plan"]["grad_accum"] == 10**6


def test_a_config_missing_sizes_warns_naming_each_default(tmp_path):
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    result = _invoke("plan", "--model", str(folder), "--seq-len", "256", "--json")
    assert result.exit_code == 0, result.output
    warning = (
        f"--model {folder}: its config has no num_hidden_layers, num_attention_heads, "
        "vocab_size, intermediate_size; transformers' llama defaults fill them in "
        "(num_hidden_layers=32, num_attention_heads=32, vocab_size=32,000, "
        "intermediate_size=11,008), so this is the plan of that model. Add the model's own "
        "values to its config.json."
    )
    assert result.stderr.splitlines() == [f"Warning: {warning}"]
    assert json.loads(result.stdout)["warnings"] == [warning]


def test_no_catalog_model_has_defaulted_sizes():
    from vramcalc.catalog import defaulted_sizes, model_catalog, resolve

    assert {e.name: defaulted_sizes(resolve(e.name).config_dict) for e in model_catalog()} == {
        e.name: () for e in model_catalog()
    }


# -- 2. one headroom, one parser ---------------------------------------------------------------
HEADROOM_COMMANDS = {
    "plan": ["plan"],
    "fit": ["fit", "--gpu", "L4"],
    "advise": ["advise", "--gpu", "L4"],
    "serve": ["serve"],
}


@pytest.mark.parametrize("command", sorted(HEADROOM_COMMANDS))
def test_every_command_has_one_headroom_and_one_parser(tiny_llama_dir, command):
    base = [*HEADROOM_COMMANDS[command], "--model", str(tiny_llama_dir)]
    base += ["--seq-len", "256"] if command != "serve" else []

    def headroom(*flags: str):
        result = _invoke(*base, *flags, "--json")
        return result.exit_code, (
            json.loads(result.stdout)["headroom"] if not result.exit_code else result.output
        )

    assert headroom() == headroom("--headroom", "5%") == headroom("--headroom", "0.05") == (0, 0.05)
    assert headroom("--headroom", "150%") == (
        1,
        "Error: --headroom must be a fraction in [0, 1) or a percentage such as 5%, got '150%'.\n",
    )
    assert headroom("--headroom", "5") == (
        1,
        "Error: --headroom must be a fraction in [0, 1) or a percentage such as 5%, got '5' "
        "(did you mean 5%?).\n",
    )


def test_a_small_margin_is_in_mib_never_minus_zero():
    from vramcalc.render.tables import margin

    assert margin(-1.4 * 2**20) == "-1 MiB" and margin(-0.3 * 2**20) == "0 MiB"
    assert margin(1.4 * 2**20) == "1 MiB" and margin(0.2 * 2**30) == "0.20 GiB"


# -- 3. components a reader can trust ----------------------------------------------------------
def test_no_trace_difference_row_anywhere(tiny_llama_dir, tmp_path):
    text = _invoke("plan", "--model", str(tiny_llama_dir), "--seq-len", "256", "-v").output
    assert "traced step beyond the rules" not in text
    data = _json("--model", str(tiny_llama_dir), "--seq-len", "256")
    assert "trace_difference" not in data["components"]
    assert sum(data["components"].values()) == data["device_total_bytes"]
    out = tmp_path / "s.csv"
    result = _invoke(
        "sweep", "--model", str(tiny_llama_dir), "--seq-len", "256", "-q", "-o", str(out)
    )
    assert result.exit_code == 0, result.output
    assert not [c for c in next(csv.reader(out.open())) if "trace_difference" in c]


@pytest.mark.parametrize("batch", ["1", "8"])
def test_momentary_components_are_explained_where_they_appear(tiny_llama_dir, batch):
    model = ["--model", str(tiny_llama_dir), "--seq-len", "256", "--batch-size", batch]
    text = _invoke("plan", *model).output
    rows = [line.split("  ")[0] for line in text.splitlines()]
    assert "logits + loss" in rows and "step temporaries" in rows  # at any batch, 0 or not
    assert "logits + loss (the head's output, the loss, their gradients) live from the head" in text
    assert "step temporaries (a layer's intermediate results" in text


# -- 4. output that fits the plan ----------------------------------------------------------------
def test_json_shows_the_resolved_targets(tiny_llama_dir):
    plan = _json("--model", str(tiny_llama_dir), "--seq-len", "256")["plan"]
    assert plan["targets"] == ["q_proj", "v_proj"]


def test_method_specific_fields_only_for_their_method(tiny_llama_dir):
    model = ["--model", str(tiny_llama_dir), "--seq-len", "256"]
    adalora = ("init_rank", "target_rank", "tinit", "tfinal", "delta_t", "total_step")
    full = _json(*model, "--method", "full")
    assert not {"rank", "alpha", "dropout", "targets", "dora", "double_quant", *adalora} & set(
        full["plan"]
    )
    assert "rank_allocator" not in full["components"] and "nccl" not in full["components"]
    lora = _json(*model)["plan"]
    assert lora["rank"] == 8 and "double_quant" not in lora and not set(adalora) & set(lora)
    qlora = _json(*model, "--method", "qlora")["plan"]
    assert qlora["double_quant"] is True
    ada = _json(*model, "--method", "adalora")
    assert ada["plan"]["init_rank"] == 12 and "rank" not in ada["plan"]
    assert "rank_allocator" in ada["components"]


def test_a_sweep_has_adalora_columns_only_with_an_adalora_row(tiny_llama_dir, tmp_path):
    def header(*args: str) -> list[str]:
        out = tmp_path / "s.csv"
        result = _invoke("sweep", "--model", str(tiny_llama_dir), "--seq-len", "256", *args,
                         "-q", "-o", str(out))  # fmt: skip
        assert result.exit_code == 0, result.output
        return next(csv.reader(out.open()))

    lora = header("--method", "lora,full")
    assert "init_rank" not in lora and "rank_allocator_bytes" not in lora
    assert "double_quant" not in lora and "rank" in lora
    mixed = header("--method", "lora,adalora")
    assert "init_rank" in mixed and "rank_allocator_bytes" in mixed
    assert len(mixed) - len(lora) >= 7


# -- 5. quiet libraries ------------------------------------------------------------------------
def _hear_transformers(monkeypatch) -> None:
    """transformers' logger does not propagate (it has its own stderr handler, set up when it
    is first used): let caplog hear it."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.get_logger("transformers")  # configured now, not inside the test
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)


def test_libraries_quiet_silences_library_logs_and_warnings(caplog, monkeypatch):
    _hear_transformers(monkeypatch)
    logger = logging.getLogger("transformers.generation.configuration_utils")
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with libraries_quiet():
            logger.warning("The following generation flags are not valid")
            warnings.warn("torch chatter", UserWarning, stacklevel=1)
        assert caught == [] and "generation flags" not in caplog.text
        with libraries_quiet(quiet=False):
            logger.warning("The following generation flags are not valid")
        assert "generation flags" in caplog.text


def test_plan_prints_library_chatter_only_with_verbose(
    tiny_llama_dir, monkeypatch, caplog, request
):
    import vramcalc.api

    # an inventory built earlier in this process quieted bitsandbytes for library callers
    bnb, level = logging.getLogger("bitsandbytes"), logging.getLogger("bitsandbytes").level
    bnb.setLevel(logging.NOTSET)
    request.addfinalizer(lambda: bnb.setLevel(level))

    real = vramcalc.api.plan

    def chatty(*args, **kwargs):
        logging.getLogger("transformers.generation").warning("generation flags are not valid")
        logging.getLogger("bitsandbytes.cextension").warning("kernels package not found")
        warnings.warn("a library warning", UserWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(vramcalc.api, "plan", chatty)
    _hear_transformers(monkeypatch)
    model = ["--model", str(tiny_llama_dir), "--seq-len", "256"]
    before = logging.getLogger("transformers").level
    for flags, heard in (([], False), (["--verbose"], True), (["-v"], True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = _invoke("plan", *model, *flags)
        assert result.exit_code == 0 and result.stderr == ""
        assert ("generation flags" in caplog.text) is heard
        assert ("kernels package" in caplog.text) is heard
        assert bool([w for w in caught if "a library warning" in str(w.message)]) is heard
    assert logging.getLogger("transformers").level == before  # restored afterwards


# -- 6. the reports are what the code writes ----------------------------------------------------


# -- a step of many micro-batches is simulated as one of MAX_SIMULATED_MICRO_BATCHES ------------
def test_many_micro_batches_share_the_simulation_of_the_cap(tiny_llama_dir):
    from vramcalc.memory import slack
    from vramcalc.training_plan import TrainingPlan

    plan = TrainingPlan(model=str(tiny_llama_dir), method="lora", grad_accum=10**9)
    capped = plan.with_(grad_accum=slack.MAX_SIMULATED_MICRO_BATCHES)
    assert slack.simulated_plan(plan) == capped
    assert slack.simulation_key(TINY_LLAMA, plan) == slack.simulation_key(TINY_LLAMA, capped)
    assert slack.simulated_plan(plan.with_(grad_accum=3)).grad_accum == 3


@pytest.mark.slow
def test_the_peak_of_more_micro_batches_than_the_cap_is_the_caps(tiny_llama_dir, monkeypatch):
    """What the cap rests on: 12 micro-batches simulated in full peak as 8 do, byte for byte."""
    from vramcalc.memory import slack
    from vramcalc.training_plan import TrainingPlan

    monkeypatch.setattr(slack, "MAX_SIMULATED_MICRO_BATCHES", 100)
    plan = TrainingPlan(model=str(tiny_llama_dir), method="lora", seq_len=64, batch_size=2)
    peaks = {
        n: slack.simulate_plan(TINY_LLAMA, plan.with_(grad_accum=n), use_cache=False)
        for n in (8, 12)
    }
    assert peaks[8].peak_allocated_bytes == peaks[12].peak_allocated_bytes
    assert peaks[8].peak_reserved_bytes == peaks[12].peak_reserved_bytes
