"""``--from FILE``: configs written in each tool's documented format give the same plan and
the same bytes as the equivalent flags; tool defaults, provenance and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vramcalc.cli import cli
from vramcalc.configs import detect_format, read_plan_file

CONFIGS = Path(__file__).parent
BYTES = ("peak_allocated_bytes", "peak_reserved_bytes", "device_total_bytes", "components", "plan")

EQUIVALENT = {
    "axolotl/qlora.yml": "--model Qwen/Qwen2.5-0.5B --method qlora --rank 32 --alpha 16 --dropout 0.05 "
    "--targets all-linear --seq-len 1024 --batch-size 2 --grad-accum 4 --optimizer adamw_8bit "
    "--gradient-checkpointing --attn flash_attention_2",
    "axolotl/lora-8bit.yml": "--model meta-llama/Llama-3.2-1B --method lora --quant int8 --rank 16 --alpha 32 "
    "--dropout 0.05 --targets q_proj,v_proj --modules-to-save lm_head --seq-len 512 --batch-size 4 "
    "--grad-accum 2 --optimizer paged_adamw_8bit --no-gradient-checkpointing",
    "axolotl/full-defaults.yml": "--model TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T --method full "
    "--seq-len 512 --attn flash_attention_2 --no-gradient-checkpointing",
    "axolotl/zero3.yml": "--model Qwen/Qwen2.5-0.5B --method full --seq-len 512 --batch-size 2 --grad-accum 2 "
    "--gradient-checkpointing --num-gpus 4 --strategy zero3 --cpu-offload",
    "llama-factory/qlora_sft.yaml": "--model Qwen/Qwen2.5-0.5B --method qlora --rank 8 --alpha 16 "
    "--targets all-linear --seq-len 1024 --batch-size 1 --grad-accum 8 --gradient-checkpointing",
    "llama-factory/lora_defaults.yaml": "--model meta-llama/Llama-3.2-1B --method lora --rank 8 --alpha 16 "
    "--targets all-linear --seq-len 2048 --batch-size 8 --gradient-checkpointing",
    "trl/sft_peft_4bit.yaml": "--model Qwen/Qwen2.5-0.5B --method qlora --rank 32 --alpha 16 --dropout 0.05 "
    "--targets all-linear --double-quant --dtype bf16 --seq-len 1024 --batch-size 2 --grad-accum 8 "
    "--gradient-checkpointing",
    "trl/sft_full_defaults.yaml": "--model Qwen/Qwen2.5-0.5B --method full --dtype fp32 --seq-len 1024 "
    "--batch-size 8 --gradient-checkpointing",
    "trl/sft_nested.json": "--model meta-llama/Llama-3.2-1B --method lora --rank 16 --alpha 32 --dropout 0.05 "
    "--targets q_proj,k_proj,v_proj,o_proj --seq-len 2048 --batch-size 1 --grad-accum 4 "
    "--optimizer adamw_torch --gradient-checkpointing --dtype bf16",
    "trainer/qlora.json": "--model meta-llama/Llama-3.2-1B --method qlora --rank 16 --alpha 32 --dropout 0.05 "
    "--targets all-linear --double-quant --seq-len 1024 --batch-size 4 --grad-accum 4 "
    "--gradient-checkpointing --optimizer paged_adamw_8bit --dtype bf16",
}
# files that need a flag the file cannot give (the number of GPUs, or Trainer's sequence length)
WITH_FLAGS = {
    "llama-factory/full_ds3.yaml": (
        "--num-gpus 2",
        "--model Qwen/Qwen2.5-0.5B --method full --dtype fp32 --seq-len 512 --batch-size 1 --grad-accum 2 "
        "--gradient-checkpointing --attn flash_attention_2 --num-gpus 2 --strategy zero3",
    ),
    "trainer/flat_full.yaml": (
        "--seq-len 512",
        "--model Qwen/Qwen2.5-0.5B --method full --seq-len 512 --batch-size 8 --no-gradient-checkpointing",
    ),
    "trainer/fsdp.yaml": (
        "--num-gpus 2",
        "--model meta-llama/Llama-3.2-1B --method lora --rank 8 --alpha 8 --targets q_proj,v_proj "
        "--seq-len 1024 --batch-size 2 --no-gradient-checkpointing --num-gpus 2 --strategy fsdp",
    ),
}


def _json(args: str) -> dict:
    result = CliRunner().invoke(cli, ["plan", *args.split(), "--gpu", "H100-80GB", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", sorted(EQUIVALENT) + sorted(WITH_FLAGS))
def test_from_file_gives_the_bytes_of_the_equivalent_flags(name):
    extra, flags = WITH_FLAGS.get(name, ("", EQUIVALENT.get(name)))
    from_file = _json(f"--from {CONFIGS / name} {extra}")
    by_flags = _json(flags)
    assert {k: from_file[k] for k in BYTES} == {k: by_flags[k] for k in BYTES}
    assert from_file["from_file"]["format"] == name.split("/")[0]
    assert by_flags["from_file"] is None


def test_every_tool_has_three_configs():
    for tool in ("axolotl", "llama-factory", "trl", "trainer"):
        assert len([n for n in [*EQUIVALENT, *WITH_FLAGS] if n.startswith(tool + "/")]) >= 3


def test_every_key_is_used_or_ignored_with_a_reason():
    for name in [*EQUIVALENT, *WITH_FLAGS]:
        flags = (
            {"num_gpus": 2} if name in ("llama-factory/full_ds3.yaml", "trainer/fsdp.yaml") else {}
        )
        source = read_plan_file(CONFIGS / name, flags)
        import yaml

        keys = set(yaml.safe_load((CONFIGS / name).read_text()))
        top = {k.split(".")[0] for k in (*source.used_keys, *source.ignored_keys)}
        assert keys <= top, (name, keys - top)
        assert all(source.ignored_keys.values())


def test_tool_defaults_win_and_say_so():
    lf = read_plan_file(CONFIGS / "llama-factory/lora_defaults.yaml")
    assert lf.sources["batch_size"].origin == "tool default"
    assert "per_device_train_batch_size=8" in lf.sources["batch_size"].note
    assert lf.sources["alpha"].value == 16.0 and "lora_rank * 2" in lf.sources["alpha"].note
    assert lf.sources["gradient_checkpointing"].origin == "tool default"
    ax = read_plan_file(CONFIGS / "axolotl/full-defaults.yml")
    assert ax.plan.seq_len == 512 and "sequence_len=512" in ax.sources["seq_len"].note
    assert ax.sources["gradient_checkpointing"].value is False
    trl = read_plan_file(CONFIGS / "trl/sft_full_defaults.yaml")
    assert trl.plan.dtype == "fp32" and "model_config.py" in trl.sources["dtype"].note
    assert trl.plan.seq_len == 1024 and trl.plan.gradient_checkpointing is True
    assert trl.sources["model"].origin == "file" and trl.sources["allocator"].origin == "ours"


def test_flags_override_the_file_and_are_marked():
    source = read_plan_file(CONFIGS / "axolotl/qlora.yml", {"rank": 8, "seq_len": 256})
    assert source.plan.rank == 8 and source.plan.seq_len == 256
    assert source.sources["rank"].origin == "flag" and source.sources["rank"].key == "--rank"
    assert source.plan.alpha == 16.0  # the file's alpha stays


def test_deepspeed_json_next_to_the_file_sets_stage_offload_and_world_size():
    source = read_plan_file(CONFIGS / "axolotl/zero3.yml")
    assert (source.plan.strategy, source.plan.cpu_offload, source.plan.num_gpus) == (
        "zero3",
        True,
        4,
    )
    assert "train_batch_size 16" in source.sources["num_gpus"].note


def _error(args: list[str]) -> str:
    result = CliRunner().invoke(cli, ["plan", *args])
    assert result.exit_code != 0
    return result.output


def test_sharding_without_a_world_size_asks_for_num_gpus():
    out = _error(["--from", str(CONFIGS / "llama-factory/full_ds3.yaml")])
    assert "Error: llama-factory key 'deepspeed'" in out and "pass --num-gpus N" in out


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "base_model: Qwen/Qwen2.5-0.5B\nadapter: lora\nload_in_4bit: true\n",
            "Error: axolotl key 'load_in_4bit': load_in_4bit: true with adapter: lora is contradictory",
        ),
        (
            "base_model: Qwen/Qwen2.5-0.5B\nadapter: qlora\n",
            "Error: axolotl key 'adapter': adapter: qlora needs load_in_4bit",
        ),
        (
            "base_model: Qwen/Qwen2.5-0.5B\nload_in_8bit: true\n",
            "Error: axolotl key 'load_in_8bit'",
        ),
        (
            "base_model: no-such/model-xyz\n",
            "Error: axolotl key 'base_model': --model 'no-such/model-xyz'",
        ),
        (
            "base_model: Qwen/Qwen2.5-0.5B\noptimizer: lion_8bit\n",
            "Error: axolotl key 'optimizer': optimizer 'lion_8bit'",
        ),
        (
            "model_name_or_path: Qwen/Qwen2.5-0.5B\nfinetuning_type: full\nquantization_bit: 4\n",
            "Error: llama-factory key 'quantization_bit'",
        ),
        (
            "model_name_or_path: Qwen/Qwen2.5-0.5B\nfinetuning_type: oft\n",
            "Error: llama-factory key 'finetuning_type'",
        ),
        (
            "model_name_or_path: Qwen/Qwen2.5-0.5B\nmax_length: 512\nload_in_4bit: true\n",
            "Error: trl key 'load_in_4bit'",
        ),
        (
            "model: Qwen/Qwen2.5-0.5B\ntraining_args: {per_device_train_batch_size: 0}\n",
            "Error: trainer key 'training_args.per_device_train_batch_size'",
        ),
        ("learning_rate: 0.1\n", "Error: --from"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_bad_files_get_one_error_naming_the_key(tmp_path, text, expected):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    out = _error(["--from", str(path)])
    assert expected in out, out
    assert "Traceback" not in out


def test_unknown_format_lists_what_is_understood():
    with pytest.raises(Exception, match="unknown format"):
        detect_format({"foo": 1})


def test_plan_without_model_or_file_is_a_usage_error():
    result = CliRunner().invoke(cli, ["plan"])
    assert (
        result.exit_code == 2
        and "Missing option '-m' / '--model' (or give --from FILE)." in result.output
    )


def test_plan_text_shows_the_provenance():
    result = CliRunner().invoke(
        cli, ["plan", "--from", str(CONFIGS / "trl/sft_full_defaults.yaml"), "--gpu", "H200"]
    )
    assert result.exit_code == 0, result.output
    assert "plan read from" in result.output and "(TRL config)" in result.output
    assert "tool default" in result.output and "keys ignored" in result.output


def test_sweep_and_fit_take_from():
    args = ["--from", str(CONFIGS / "axolotl/qlora.yml"), "--gpu", "RTX-4090"]
    sweep = CliRunner().invoke(cli, ["sweep", *args, "--rank", "8,16", "-q"])
    assert sweep.exit_code == 0, sweep.output
    assert sweep.stdout.count("Qwen/Qwen2.5-0.5B") == 2
    fit = CliRunner().invoke(cli, ["fit", *args, "--json"])
    assert fit.exit_code == 0, fit.output
    assert json.loads(fit.stdout)["plan"]["rank"] == 32


def test_plan_states_that_the_file_set_checkpointing(tmp_path):
    from click.testing import CliRunner

    from vramcalc.cli import cli

    path = tmp_path / "axo.yml"
    path.write_text(
        "base_model: Qwen/Qwen2.5-0.5B\nadapter: qlora\nload_in_4bit: true\n"
        "gradient_checkpointing: false\n"
    )
    result = CliRunner().invoke(cli, ["plan", "--from", str(path), "--gpu", "H200"])
    assert result.exit_code == 0, result.output
    assert (
        f"  - gradient checkpointing off, as {path}: gradient_checkpointing sets it; "
        "--gradient-checkpointing overrides the file"
    ) in result.output
    assert "k-bit recipes usually keep it on" not in result.output
