"""Multi-GPU cases without running them: the generated configs, the launch env, the merge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vramcalc.training_plan import TrainingPlan
from vramcalc_harness.distributed import (
    NVLS_OFF_ENV,
    accelerate_config,
    deepspeed_config,
    has_deepspeed,
    launch_env,
    rank_result_path,
    write_launch_configs,
)
from vramcalc_harness.errors import HarnessError, MissingDependencyError
from vramcalc_harness.record import (
    MISSING_RANK_ERROR,
    PER_RANK_FIELDS,
    RECORD_FIELDS,
    merge_rank_records,
)
from vramcalc_harness.scenario import Case

TINY_LLAMA = str(Path(__file__).parent / "cases" / "tiny-llama")


def two_gpu_case(strategy: str = "ddp", **plan: object) -> Case:
    fields = {"model": TINY_LLAMA, "num_gpus": 2, "strategy": strategy, **plan}
    return Case(TrainingPlan(**fields), steps=2, warmup_steps=1)  # type: ignore[arg-type]


COMMON = {
    "compute_environment": "LOCAL_MACHINE",
    "num_machines": 1,
    "machine_rank": 0,
    "num_processes": 2,
    "gpu_ids": "all",
    "mixed_precision": "bf16",
    "use_cpu": False,
    "downcast_bf16": "no",
    "rdzv_backend": "static",
    "same_network": True,
    "main_training_function": "main",
}


# -- accelerate config -------------------------------------------------------------------------
def test_ddp_is_multi_gpu_with_bf16_and_on_cpu_no_mixed_precision():
    assert accelerate_config(two_gpu_case("ddp"), "cuda") == {
        **COMMON,
        "distributed_type": "MULTI_GPU",
    }
    cpu = accelerate_config(two_gpu_case("ddp", dtype="fp16"), "cpu")
    assert (cpu["mixed_precision"], cpu["use_cpu"]) == ("no", True)
    assert accelerate_config(two_gpu_case("ddp", dtype="fp16"), "cuda")["mixed_precision"] == "fp16"


@pytest.mark.parametrize(
    ("strategy", "offload", "sharding"),
    [("fsdp", False, "FULL_SHARD"), ("fsdp-grad-op", True, "SHARD_GRAD_OP")],
)
def test_fsdp_wraps_the_decoder_layer_with_orig_params_and_cpu_ram_efficient_loading(
    strategy, offload, sharding
):
    config = accelerate_config(two_gpu_case(strategy, cpu_offload=offload), "cuda")
    assert config == {
        **COMMON,
        "distributed_type": "FSDP",
        "fsdp_config": {
            "fsdp_version": 1,
            "fsdp_sharding_strategy": sharding,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
            "fsdp_use_orig_params": True,
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_sync_module_states": True,
            "fsdp_offload_params": offload,
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_forward_prefetch": False,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_activation_checkpointing": False,
        },
    }


def test_fsdp_layer_class_comes_from_the_model_class(tiny_opt_dir):
    config = accelerate_config(two_gpu_case("fsdp", model=str(tiny_opt_dir)), "cuda")
    assert config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "OPTDecoderLayer"


def test_zero_points_at_its_deepspeed_json_and_leaves_precision_to_it():
    config = accelerate_config(two_gpu_case("zero3"), "cuda", "/x/deepspeed.json")
    expected = {**COMMON, "distributed_type": "DEEPSPEED"}
    del expected["mixed_precision"]  # accelerate refuses it beside a config file
    expected["deepspeed_config"] = {
        "deepspeed_config_file": "/x/deepspeed.json",
        "zero3_init_flag": True,
    }
    assert config == expected
    assert accelerate_config(two_gpu_case("zero1"), "cuda", "/x/ds.json")["deepspeed_config"] == {
        "deepspeed_config_file": "/x/ds.json",
        "zero3_init_flag": False,
    }
    with pytest.raises(HarnessError, match="needs the path of its deepspeed.json"):
        accelerate_config(two_gpu_case("zero2"), "cuda")


# -- DeepSpeed JSON ------------------------------------------------------------------------------
def test_deepspeed_json_of_each_stage():
    base = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 16,  # 4 x 2 x 2 GPUs
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }
    # what transformers / accelerate fill for "auto" from hidden_size (64 in the tiny llama)
    zero = {"contiguous_gradients": True, "reduce_bucket_size": 64 * 64}
    geometry = {"batch_size": 4, "grad_accum": 2}
    assert deepspeed_config(two_gpu_case("zero1", **geometry)) == {
        **base,
        "zero_optimization": {"stage": 1, **zero},
    }
    assert deepspeed_config(two_gpu_case("zero2", cpu_offload=True, **geometry)) == {
        **base,
        "zero_optimization": {
            "stage": 2,
            **zero,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
        },
    }
    assert deepspeed_config(two_gpu_case("zero3", cpu_offload=True, **geometry)) == {
        **base,
        "zero_optimization": {
            "stage": 3,
            **zero,
            "stage3_prefetch_bucket_size": 3686,  # int(0.9 * 64 * 64)
            "stage3_param_persistence_threshold": 640,
            "stage3_gather_16bit_weights_on_model_save": False,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu", "pin_memory": True},
        },
    }
    fp16 = deepspeed_config(two_gpu_case("zero2", dtype="fp16"))
    assert (fp16["bf16"], fp16["fp16"]) == ({"enabled": False}, {"enabled": True})
    assert "auto" not in json.dumps(fp16)  # ZeRO-3 loading reads it before anything fills autos


def test_written_files_read_back_as_generated(tmp_path):
    case = two_gpu_case("zero3")
    launch = write_launch_configs(case, "cuda", tmp_path / "launch")
    assert launch["accelerate_config_file"] == str(tmp_path / "launch" / "accelerate.yaml")
    assert (
        yaml.safe_load(Path(launch["accelerate_config_file"]).read_text()) == launch["accelerate"]
    )
    ds_file = launch["accelerate"]["deepspeed_config"]["deepspeed_config_file"]
    assert ds_file == str(tmp_path / "launch" / "deepspeed.json")
    assert json.loads(Path(ds_file).read_text()) == launch["deepspeed"] == deepspeed_config(case)
    fsdp = write_launch_configs(two_gpu_case("fsdp"), "cuda", tmp_path / "fsdp")
    assert fsdp["deepspeed"] is None and not (tmp_path / "fsdp" / "deepspeed.json").exists()


# -- the env accelerate would give the workers -------------------------------------------------------
def test_launch_env_is_what_accelerate_launch_sets(tmp_path, monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    args = ["run", "spec.json", "result.json"]
    fsdp = write_launch_configs(two_gpu_case("fsdp", cpu_offload=True), "cuda", tmp_path / "f")
    env = launch_env(fsdp["accelerate_config_file"], args)
    assert {k: env[k] for k in NVLS_OFF_ENV} == NVLS_OFF_ENV
    assert {
        k: env[k]
        for k in (
            "ACCELERATE_USE_FSDP",
            "FSDP_VERSION",
            "FSDP_SHARDING_STRATEGY",
            "FSDP_AUTO_WRAP_POLICY",
            "FSDP_TRANSFORMER_CLS_TO_WRAP",
            "FSDP_USE_ORIG_PARAMS",
            "FSDP_CPU_RAM_EFFICIENT_LOADING",
            "FSDP_SYNC_MODULE_STATES",
            "FSDP_OFFLOAD_PARAMS",
            "ACCELERATE_MIXED_PRECISION",
        )
    } == {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "1",
        "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
        "FSDP_USE_ORIG_PARAMS": "true",
        "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
        "FSDP_SYNC_MODULE_STATES": "true",
        "FSDP_OFFLOAD_PARAMS": "true",
        "ACCELERATE_MIXED_PRECISION": "bf16",
    }
    assert "ACCELERATE_USE_CPU" not in env
    ddp = write_launch_configs(two_gpu_case("ddp"), "cpu", tmp_path / "d")
    env = launch_env(ddp["accelerate_config_file"], args)
    assert "ACCELERATE_USE_FSDP" not in env and env["ACCELERATE_USE_CPU"] == "true"
    zero = write_launch_configs(two_gpu_case("zero3"), "cuda", tmp_path / "z")
    env = launch_env(zero["accelerate_config_file"], args)
    assert (
        env["ACCELERATE_USE_DEEPSPEED"],
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"],
        env["ACCELERATE_DEEPSPEED_ZERO3_INIT"],
    ) == ("true", str(tmp_path / "z" / "deepspeed.json"), "true")


# -- QLoRA under sharding ---------------------------------------------------------------------------
def test_sharded_4bit_weights_are_stored_in_the_plan_dtype():
    import torch

    from vramcalc_harness.build import quantization_config

    for strategy in ("fsdp", "fsdp-grad-op", "zero3"):
        config = quantization_config(two_gpu_case(strategy, method="qlora").plan)
        assert config.bnb_4bit_quant_storage == torch.bfloat16, strategy
    fp16 = quantization_config(two_gpu_case("fsdp", method="qlora", dtype="fp16").plan)
    assert fp16.bnb_4bit_quant_storage == torch.float16
    for plan in (two_gpu_case("ddp", method="qlora").plan, TrainingPlan("m", method="qlora")):
        assert quantization_config(plan).bnb_4bit_quant_storage == torch.uint8  # bnb's default


# -- what cannot run here is an error record, not a launch ---------------------------------------
def test_cases_this_machine_cannot_run_are_errors_before_anything_starts(tmp_path, monkeypatch):
    from vramcalc_harness.distributed import check_machine
    from vramcalc_harness.launcher import measure_case

    with pytest.raises(HarnessError, match="strategy fsdp needs CUDA GPUs"):
        check_machine(two_gpu_case("fsdp").plan, "cpu")
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(HarnessError, match=r"num_gpus 2: only 1 CUDA GPU visible"):
        check_machine(two_gpu_case("ddp").plan, "cuda")
    if has_deepspeed():
        return
    with pytest.raises(MissingDependencyError, match="--strategy zero3 needs deepspeed"):
        check_machine(two_gpu_case("zero3").plan, "cuda")
    started = time.perf_counter()
    record = measure_case(two_gpu_case("zero2"), "cpu", 60, tmp_path, {"hostname": "h"})
    assert time.perf_counter() - started < 5  # nothing was launched
    assert record["status"] == "error"
    assert record["error"].startswith("--strategy zero2 needs deepspeed, which is not installed;")
    assert (record["num_gpus"], record["strategy"], record["hostname"]) == (2, "zero2", "h")


# -- one record from the ranks' records ----------------------------------------------------------------
def rank_record(rank: int, status: str = "ok", **figures: object) -> dict[str, object]:
    from vramcalc_harness.record import make_record

    case = two_gpu_case("fsdp")
    measurement = {
        "peak_allocated_bytes": 100 + rank,
        "peak_reserved_bytes": 200 + 10 * rank,
        "device_total_bytes": 300 - rank,
        "loaded_allocated_bytes": 50,
        "tokens_per_second": 1000.0 + rank,
        "step_seconds": 0.5 + rank / 10,
        "step_seconds_measured": [0.5, 0.6 - rank / 10],
        "trainable_params": 3584,
        "total_params": 9999,
        "compute_dtype_used": "bf16",
        "host_peak_rss_bytes": 7,
        **figures,
    }
    if status != "ok":
        measurement["tokens_per_second"] = measurement["step_seconds"] = None
    error = None if status == "ok" else f"{status} on rank {rank}"
    record = make_record(case, "cuda", status, measurement, {"gpu_name": "H200"}, error)
    record.update(rank=rank, local_rank=rank, world_size=2)
    return record


def test_merge_takes_the_max_per_gpu_and_the_sum_over_gpus():
    case = two_gpu_case("fsdp")
    config = {"accelerate": {"distributed_type": "FSDP"}, "deepspeed": None}
    merged = merge_rank_records(
        case, "cuda", [rank_record(1), rank_record(0)], {"hostname": "h"}, None, config
    )
    assert list(merged) == list(RECORD_FIELDS)
    assert (merged["status"], merged["error"]) == ("ok", None)
    assert (merged["num_gpus"], merged["strategy"], merged["cpu_offload"]) == (2, "fsdp", False)
    assert merged["peak_allocated_bytes"] == 101
    assert merged["peak_reserved_bytes"] == 210
    assert merged["device_total_bytes"] == 300
    assert merged["total_device_bytes_all_gpus"] == 300 + 299
    assert merged["tokens_per_second_all_gpus"] == 2001.0
    assert merged["tokens_per_second"] == 1000.5  # per GPU, as the estimator's
    assert merged["step_seconds"] == 0.6
    assert merged["step_seconds_measured"] == [0.5, 0.6]
    assert (merged["trainable_params"], merged["gpu_name"], merged["hostname"]) == (
        3584,
        "H200",
        "h",
    )
    assert [r["rank"] for r in merged["per_rank"]] == [0, 1]
    assert list(merged["per_rank"][1]) == list(PER_RANK_FIELDS)
    assert merged["per_rank"][1]["peak_allocated_bytes"] == 101
    assert merged["distributed_config"] == config


def test_an_oom_on_any_rank_makes_the_case_oom():
    case = two_gpu_case("fsdp")
    hung = rank_record(0, "error")
    merged = merge_rank_records(
        case, "cuda", [hung, rank_record(1, "oom")], None, ("error", "agent exit 1")
    )
    assert (merged["status"], merged["error"]) == ("oom", "rank 1: oom on rank 1")
    assert merged["tokens_per_second"] is None and merged["tokens_per_second_all_gpus"] is None
    assert merged["peak_allocated_bytes"] == 101  # the peaks up to the failure are kept
    merged = merge_rank_records(case, "cuda", [rank_record(1, "oom")], None, ("error", "x"))
    assert merged["status"] == "oom"
    assert merged["per_rank"][0] == {
        **dict.fromkeys(PER_RANK_FIELDS),
        "rank": 0,
        "local_rank": 0,
        "error": MISSING_RANK_ERROR,
    }


def test_missing_ranks_take_the_launch_failure_and_complete_ranks_are_ok():
    case = two_gpu_case("ddp")
    timeout = ("timeout", "measuring: no result after 5 s; worker killed.")
    assert merge_rank_records(case, "cuda", [], None, timeout)["status"] == "timeout"
    merged = merge_rank_records(case, "cuda", [rank_record(0)], None, None)
    assert (merged["status"], merged["error"]) == ("error", f"ranks [1]: {MISSING_RANK_ERROR}.")
    assert merged["total_device_bytes_all_gpus"] is None  # no partial totals
    # every rank measured; the agent failing at teardown changes nothing
    both = [rank_record(0), rank_record(1)]
    assert merge_rank_records(case, "cuda", both, None, ("error", "exit 1"))["status"] == "ok"


def test_single_gpu_records_have_their_own_figures_as_totals():
    from vramcalc_harness.record import make_record

    record = make_record(
        Case(TrainingPlan(model="m")),
        "cuda",
        "ok",
        {"tokens_per_second": 5.0, "device_total_bytes": 9},
    )
    assert (record["tokens_per_second_all_gpus"], record["total_device_bytes_all_gpus"]) == (5.0, 9)
    assert record["per_rank"] is None and record["distributed_config"] is None


# -- inside a rank ---------------------------------------------------------------------------------------
def test_each_rank_writes_its_own_file_and_uses_its_own_gpu(monkeypatch):
    from vramcalc_harness.trackers import _visible_device_entry

    assert rank_result_path("/t/result.json", 1) == Path("/t/result.rank1.json")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert _visible_device_entry() == "6"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _visible_device_entry() == "1"


def test_simulated_failures_happen_on_the_last_rank_only(monkeypatch):
    import torch

    from vramcalc_harness.step import simulate_failure

    case = Case(TrainingPlan(model="m", num_gpus=2), simulate="oom")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    simulate_failure(case)  # rank 0 goes on (and would wait in a collective)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(torch.OutOfMemoryError):
        simulate_failure(case)


def test_agent_starts_one_worker_per_gpu_on_its_own_port():
    from vramcalc_harness.agent import main, torchrun_args

    assert torchrun_args(2, ["run", "s", "r"]) == [
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "0",
        "--module",
        "vramcalc_harness.worker",
        "run",
        "s",
        "r",
    ]
    assert main(["too", "few"]) == 2


# -- a timeout kills every rank ------------------------------------------------------------------------
def test_killing_the_tree_reaches_ranks_in_sessions_of_their_own():
    """torch.distributed.run puts each rank in its own session: the agent's group is not enough."""
    import psutil

    from vramcalc_harness.processes import kill_process_tree

    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["--no-python", "sleep", "600"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        sleepers: list[int] = []
        while len(sleepers) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            below = psutil.Process(proc.pid).children(recursive=True)
            sleepers = [child.pid for child in below if child.name() == "sleep"]
        assert len(sleepers) == 2
        assert all(os.getsid(pid) == pid for pid in sleepers)  # not in the agent's group
        killed = kill_process_tree(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert set(sleepers) <= set(killed)
    time.sleep(0.2)
    for pid in sleepers:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


# -- what accelerate builds from that env (FSDP needs a GPU to run, not to be configured) ---------------
def test_accelerate_builds_the_fsdp_plugin_the_plan_asks_for(tmp_path, monkeypatch):
    import accelerate.utils.dataclasses as accelerate_dataclasses
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import ShardingStrategy

    case = two_gpu_case("fsdp-grad-op", cpu_offload=True)
    launch = write_launch_configs(case, "cuda", tmp_path)
    env = launch_env(launch["accelerate_config_file"], ["run", "s", "r"])
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(accelerate_dataclasses, "is_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1
    assert plugin.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    assert plugin.cpu_offload.offload_params is True
    assert (plugin.use_orig_params, plugin.sync_module_states) == (True, True)
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.activation_checkpointing is False


def test_adapters_get_fsdp_units_of_their_own(monkeypatch):
    """peft's policy: decoder layers, plus every trainable leaf (one dtype per flat parameter)."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from vramcalc_harness.distributed import fsdp_peft_wrap

    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer")
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    plugin = SimpleNamespace(auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    fsdp_peft_wrap(model, plugin)

    def wraps(module: object) -> bool:
        return plugin.auto_wrap_policy(module, recurse=False, nonwrapped_numel=0)

    layer = model.base_model.model.model.layers[0]
    assert wraps(layer) and wraps(layer.self_attn.q_proj.lora_A["default"])
    assert not wraps(layer.self_attn.q_proj.base_layer) and not wraps(layer.self_attn.k_proj)
    untouched = SimpleNamespace(auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    fsdp_peft_wrap(base.model, untouched)  # not a peft model: accelerate's own policy stays
    assert untouched.auto_wrap_policy == "TRANSFORMER_BASED_WRAP"
