"""Building the real model on CPU: checkpoint once, load, adapters, exact parameter counts."""

from __future__ import annotations

import os
import re
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from vramcalc.training_plan import TrainingPlan
from vramcalc_harness import build
from vramcalc_harness.build import (
    build_model,
    checkpoint_dir,
    count_parameters,
    has_bitsandbytes,
    make_room,
    prepare_checkpoint,
    quantization_config,
    require_dependencies,
)
from vramcalc_harness.errors import HarnessError, MissingDependencyError

FIXTURES = Path(__file__).parent / "cases"
TINY_LLAMA = str(FIXTURES / "tiny-llama")
TINY_OPT = str(FIXTURES / "tiny-opt")
# tiny llama: hidden 64, 4 heads of 16, 2 kv heads (k/v out 32), mlp 128, 2 layers, vocab 256
TINY_LLAMA_PARAMS = 2 * 256 * 64 + 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("scratch")


def test_checkpoint_is_saved_once_and_reused(scratch):
    plan = TrainingPlan(model=TINY_LLAMA)
    path = prepare_checkpoint(plan, scratch, "cpu")
    assert path == checkpoint_dir(plan, scratch)
    assert re.fullmatch(r".*harness--cases--tiny-llama-[0-9a-f]{8}", path.parent.name)
    assert path.name == "bf16"
    weights = next(path.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    assert prepare_checkpoint(plan, scratch, "cpu") == path
    assert weights.stat().st_mtime_ns == stamp
    assert checkpoint_dir(plan.with_(dtype="fp32"), scratch).name == "fp32"


def test_lora_trainable_count_is_peft_count_and_exact(scratch):
    plan = TrainingPlan(model=TINY_LLAMA, method="lora", rank=8, targets=("q_proj", "v_proj"))
    built = build_model(plan, prepare_checkpoint(plan, scratch, "cpu"), "cpu")
    assert (built.trainable_params, built.total_params) == built.model.get_nb_trainable_parameters()
    # q: 8*(64+64), v: 8*(64+32), two layers
    assert built.trainable_params == 2 * (8 * (64 + 64) + 8 * (64 + 32)) == 3584
    assert built.total_params == TINY_LLAMA_PARAMS + 3584
    assert built.lora_targets_used == ("q_proj", "v_proj")
    assert next(built.model.parameters()).dtype == torch.bfloat16
    assert built.model.config.use_cache is False


def test_dora_and_modules_to_save_reach_peft_and_match_the_inventory(scratch):
    """The harness builds what the plan says (a harness that dropped use_dora measured plain
    LoRA under a DoRA label): the trainable count equals the estimator's inventory."""
    from vramcalc.estimate import prepare

    for extra in ({"dora": True}, {"modules_to_save": ("lm_head",)}):
        plan = TrainingPlan(
            model=TINY_LLAMA, method="lora", rank=8, targets=("q_proj", "v_proj"), **extra
        )
        built = build_model(plan, prepare_checkpoint(plan, scratch, "cpu"), "cpu")
        assert built.trainable_params == prepare(plan.model, plan).inventory.trainable_params
        assert built.trainable_params > 3584  # more than plain LoRA's


def test_all_linear_and_peft_default_targets(scratch):
    plan = TrainingPlan(model=TINY_LLAMA, method="lora", rank=8, targets=("all-linear",))
    built = build_model(plan, prepare_checkpoint(plan, scratch, "cpu"), "cpu")
    per_layer = 8 * (64 + 64) * 2 + 8 * (64 + 32) * 2 + 8 * (64 + 128) * 3
    assert built.trainable_params == 2 * per_layer == 16384
    assert built.lora_targets_used == (
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    )

    opt = TrainingPlan(model=TINY_OPT, method="lora", rank=4, alpha=16)
    built = build_model(opt, prepare_checkpoint(opt, scratch, "cpu"), "cpu")
    assert built.lora_targets_used == ("q_proj", "v_proj")  # peft's default for opt
    assert built.trainable_params == 2 * 2 * 4 * (64 + 64) == 2048
    assert built.model.peft_config["default"].lora_alpha == 16


def test_full_fine_tuning_trains_every_parameter(scratch):
    plan = TrainingPlan(model=TINY_LLAMA, method="full", dtype="fp32")
    built = build_model(plan, prepare_checkpoint(plan, scratch, "cpu"), "cpu")
    assert built.trainable_params == built.total_params == TINY_LLAMA_PARAMS
    assert built.lora_targets_used is None
    assert next(built.model.parameters()).dtype == torch.float32


def test_count_parameters_counts_packed_4bit_twice_like_peft():
    class Params4bit(torch.nn.Parameter):  # the name is what peft (and we) look at
        pass

    module = torch.nn.Module()
    module.packed = Params4bit(torch.zeros(10, dtype=torch.uint8), requires_grad=False)
    module.dense = torch.nn.Parameter(torch.zeros(3))
    assert count_parameters(module) == (3, 10 * 2 + 3)


def test_quantization_configs_follow_the_plan():
    assert quantization_config(TrainingPlan(model="m")) is None
    int8 = quantization_config(TrainingPlan(model="m", quant="int8"))
    assert int8.load_in_8bit and not int8.load_in_4bit
    nf4 = quantization_config(TrainingPlan(model="m", method="qlora"))
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4"
    assert nf4.bnb_4bit_use_double_quant is True
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
    fp4 = quantization_config(
        TrainingPlan(model="m", method="qlora", quant="fp4", double_quant=False)
    )
    assert fp4.bnb_4bit_quant_type == "fp4" and fp4.bnb_4bit_use_double_quant is False


@pytest.mark.skipif(has_bitsandbytes(), reason="bitsandbytes is installed here")
def test_kbit_or_bnb_optimizer_without_bitsandbytes_is_a_clear_error():
    require_dependencies(TrainingPlan(model="m"))  # nothing needed
    with pytest.raises(
        MissingDependencyError, match=r"--quant nf4 needs bitsandbytes, which is not installed"
    ):
        require_dependencies(TrainingPlan(model="m", method="qlora"))
    with pytest.raises(
        MissingDependencyError, match=r"--quant int8 and --optimizer paged_adamw_32bit need"
    ):
        require_dependencies(TrainingPlan(model="m", quant="int8", optimizer="paged_adamw_32bit"))


def test_make_room_evicts_least_recently_used_checkpoints(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    dirs = []
    for i, name in enumerate(("old", "mid", "new")):
        path = root / name / "bf16"
        path.mkdir(parents=True)
        (path / build.MARKER).write_text("{}")
        os.utime(path / build.MARKER, (1000 + i, 1000 + i))
        dirs.append(path)
    usage = namedtuple("usage", "total used free")
    free = {"bytes": 0}

    def fake_disk_usage(_path):
        present = sum(d.exists() for d in dirs)
        return usage(100, 0, free["bytes"] + (3 - present) * 10 * 2**30)

    monkeypatch.setattr(build.shutil, "disk_usage", fake_disk_usage)
    removed = make_room(root, need_bytes=5 * 2**30, keep=dirs[2])
    assert removed == [dirs[0]]
    assert not dirs[0].exists() and dirs[1].exists() and dirs[2].exists()
    with pytest.raises(HarnessError, match="not enough disk"):
        make_room(root, need_bytes=100 * 2**30, keep=dirs[2])


def test_sparse_checkpoint_is_save_pretrained_shaped_all_zero_and_takes_no_disk(tmp_path, scratch):
    """A model too large for the disk: the same files and tensors, every byte a hole."""
    from safetensors import safe_open

    plan = TrainingPlan(model=TINY_LLAMA)
    usage = namedtuple("usage", "total used free")
    real = build.shutil.disk_usage
    calls = {"n": 0}

    def short_disk(path):  # only the sparse decision sees a full disk
        calls["n"] += 1
        return usage(100, 100, 0) if calls["n"] == 1 else real(path)

    build_sparse = tmp_path / "sparse"
    build.shutil.disk_usage = short_disk
    try:
        path = prepare_checkpoint(plan, build_sparse, "cpu", sparse_when_short=True)
    finally:
        build.shutil.disk_usage = real
    assert build.checkpoint_weights(path) == "zeros"
    normal = prepare_checkpoint(plan, scratch, "cpu")
    assert build.checkpoint_weights(normal) == "random"

    def tensors(folder):
        out = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is no dict
                    out[key] = handle.get_tensor(key)
        return out

    sparse, saved = tensors(path), tensors(normal)
    assert {k: (v.shape, v.dtype) for k, v in sparse.items()} == {
        k: (v.shape, v.dtype) for k, v in saved.items()
    }
    assert all(not v.any() for v in sparse.values())
    shard = next(path.glob("*.safetensors"))
    assert shard.stat().st_blocks * 512 < shard.stat().st_size / 4  # a hole, not zeros written
    # the normal loading path reads it: same parameters, all zero
    built = build_model(plan.with_(method="full"), path, "cpu")
    assert built.total_params == TINY_LLAMA_PARAMS
    assert all(not p.any() for p in built.model.parameters())
    # with room on the disk the flag changes nothing
    assert build.checkpoint_weights(prepare_checkpoint(plan, tmp_path / "roomy", "cpu", True)) == (
        "random"
    )
