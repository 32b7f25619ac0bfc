"""Multi-GPU cases: the accelerate / DeepSpeed configs they run under, and the launch env.

A case with ``num_gpus > 1`` runs one worker process per GPU. The launcher
writes the case's configs next to its log (``SCRATCH/launch/<case_id>/``):

* ``accelerate.yaml`` -- what ``accelerate config`` would write for the plan's
  ``strategy``: ``ddp`` -> ``distributed_type: MULTI_GPU``; ``fsdp`` /
  ``fsdp-grad-op`` -> ``FSDP`` (version 1, ``FULL_SHARD`` / ``SHARD_GRAD_OP``,
  ``TRANSFORMER_BASED_WRAP`` on the model's decoder layer class,
  ``use_orig_params``, ``cpu_ram_efficient_loading`` + ``sync_module_states``,
  ``offload_params`` = ``cpu_offload``); ``zero1/2/3`` -> ``DEEPSPEED`` with
* ``deepspeed.json`` -- ZeRO stage 1/2/3, batch geometry of the plan, bucket
  sizes as transformers / accelerate fill ``auto`` (``hidden_size``-based),
  ``offload_optimizer`` (+ ``offload_param`` for ZeRO-3) = ``cpu_offload``.

``vramcalc_harness.agent`` then does what ``accelerate launch`` does on one node --
turn the config into the env (``launch_env``, accelerate's own functions) and
run ``torch.distributed.run`` -- but also on CPU (gloo), which ``accelerate
launch --cpu`` cannot (it needs MPI for several CPU processes), so the CPU
tests exercise the same path as the GPUs. NVLink multicast stays off in every
launched process (``NVLS_OFF_ENV``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import yaml

from vramcalc.catalog import resolve_model
from vramcalc.configs.sharding import deepspeed_json
from vramcalc.training_plan import TrainingPlan
from vramcalc_harness.errors import HarnessError, MissingDependencyError
from vramcalc_harness.scenario import Case

FSDP_STRATEGIES = ("fsdp", "fsdp-grad-op")
DEEPSPEED_STRATEGIES = ("zero1", "zero2", "zero3")
SHARDED_WEIGHT_STRATEGIES = ("fsdp", "fsdp-grad-op", "zero3")
FSDP_SHARDING = {"fsdp": "FULL_SHARD", "fsdp-grad-op": "SHARD_GRAD_OP"}
NVLS_OFF_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
ACCELERATE_FILE = "accelerate.yaml"
DEEPSPEED_FILE = "deepspeed.json"
DEEPSPEED_INSTALL_HINT = (
    "install its wheel on the GPU machine (python3 -m pip install --no-index --no-deps "
    "--target /tmp/site .whl/deepspeed-*.whl && export PYTHONPATH=/tmp/site) or measure "
    "the plan with --strategy fsdp or ddp"
)


def is_distributed(plan: TrainingPlan) -> bool:
    return plan.num_gpus > 1


def shards_weights(plan: TrainingPlan) -> bool:
    """Whether the plan's weights are sharded across GPUs (FSDP, ZeRO-3)."""
    return is_distributed(plan) and plan.strategy in SHARDED_WEIGHT_STRATEGIES


def has_deepspeed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def require_strategy_dependencies(plan: TrainingPlan) -> None:
    """``MissingDependencyError`` when a ZeRO plan meets a machine without deepspeed."""
    if is_distributed(plan) and plan.strategy in DEEPSPEED_STRATEGIES and not has_deepspeed():
        raise MissingDependencyError(
            f"--strategy {plan.strategy} needs deepspeed, which is not installed; "
            f"{DEEPSPEED_INSTALL_HINT}."
        )


def check_machine(plan: TrainingPlan, device: str) -> None:
    """``HarnessError`` when this machine cannot run the multi-GPU plan at all (before any launch)."""
    require_strategy_dependencies(plan)
    if device == "cpu" and plan.strategy != "ddp":
        raise HarnessError(
            f"strategy {plan.strategy} needs CUDA GPUs (accelerate's FSDP plugin and DeepSpeed "
            "refuse the CPU); on CPU only ddp runs (gloo)."
        )
    if device == "cuda":
        import torch

        visible = torch.cuda.device_count()
        if visible < plan.num_gpus:
            raise HarnessError(
                f"num_gpus {plan.num_gpus}: only {visible} CUDA GPU{'s' if visible != 1 else ''} "
                "visible (CUDA_VISIBLE_DEVICES)."
            )


def decoder_layer_classes(plan: TrainingPlan) -> list[str]:
    """The model class's ``_no_split_modules`` (its decoder layer), for FSDP's auto wrap."""
    from transformers import AutoModelForCausalLM

    config = resolve_model(plan.model).config
    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError as err:
        raise HarnessError(
            f"{plan.model}: no AutoModelForCausalLM class for {type(config).__name__}."
        ) from err
    names = list(getattr(model_class, "_no_split_modules", None) or [])
    if not names:
        raise HarnessError(
            f"{plan.model}: {model_class.__name__} names no decoder layer (_no_split_modules); "
            "FSDP's transformer auto wrap needs one."
        )
    return names


def mixed_precision(plan: TrainingPlan, device: str) -> str:
    """accelerate's ``mixed_precision`` for the recipe: bf16 (fp16 for fp16 plans), 'no' on CPU."""
    if not device.startswith("cuda"):
        return "no"
    return "fp16" if plan.dtype == "fp16" else "bf16"


# -- the configs -------------------------------------------------------------------------------
def accelerate_config(
    case: Case, device: str, deepspeed_config_file: str | None = None
) -> dict[str, Any]:
    """The ``accelerate config`` YAML (as a mapping) of a multi-GPU case."""
    plan = case.plan
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "num_machines": 1,
        "machine_rank": 0,
        "num_processes": plan.num_gpus,
        "gpu_ids": "all",
        "mixed_precision": mixed_precision(plan, device),
        "use_cpu": not device.startswith("cuda"),
        "downcast_bf16": "no",
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
    }
    if plan.strategy in FSDP_STRATEGIES:
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 1,
            "fsdp_sharding_strategy": FSDP_SHARDING[plan.strategy],
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": ",".join(decoder_layer_classes(plan)),
            "fsdp_use_orig_params": True,
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_sync_module_states": True,
            "fsdp_offload_params": plan.cpu_offload,
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_forward_prefetch": False,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_activation_checkpointing": False,  # the recipe's own checkpointing, if asked
        }
    elif plan.strategy in DEEPSPEED_STRATEGIES:
        if deepspeed_config_file is None:
            raise HarnessError("a ZeRO case needs the path of its deepspeed.json.")
        config["distributed_type"] = "DEEPSPEED"
        del config["mixed_precision"]  # accelerate refuses it next to a config file: "auto" there
        config["deepspeed_config"] = {
            "deepspeed_config_file": deepspeed_config_file,
            "zero3_init_flag": plan.strategy == "zero3",
        }
    return config


def hidden_size(plan: TrainingPlan) -> int:
    config = resolve_model(plan.model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


def deepspeed_config(case: Case) -> dict[str, Any]:
    """DeepSpeed JSON of a ZeRO case (``vramcalc.configs.sharding.deepspeed_json``, the one the
    estimator's trace runs), bucket sizes from the model's ``hidden_size``."""
    return deepspeed_json(case.plan, hidden_size(case.plan))


def write_launch_configs(case: Case, device: str, directory: str | Path) -> dict[str, Any]:
    """Write ``accelerate.yaml`` (+ ``deepspeed.json``) into ``directory``.

    Returns ``{"accelerate_config_file", "accelerate", "deepspeed"}``: the path
    and both mappings, which go into the record as ``distributed_config``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    deepspeed = None
    deepspeed_file = None
    if case.plan.strategy in DEEPSPEED_STRATEGIES:
        deepspeed = deepspeed_config(case)
        deepspeed_file = directory / DEEPSPEED_FILE
        deepspeed_file.write_text(json.dumps(deepspeed, indent=2) + "\n")
    accelerate = accelerate_config(case, device, str(deepspeed_file) if deepspeed_file else None)
    accelerate_file = directory / ACCELERATE_FILE
    accelerate_file.write_text(yaml.safe_dump(accelerate, sort_keys=False))
    return {
        "accelerate_config_file": str(accelerate_file),
        "accelerate": accelerate,
        "deepspeed": deepspeed,
    }


# -- the env the workers run in ----------------------------------------------------------------
def launch_env(accelerate_config_file: str | Path, worker_args: list[str]) -> dict[str, str]:
    """The env ``accelerate launch --config_file FILE -m vramcalc_harness.worker ARGS`` gives its workers.

    Made by accelerate's own parser and ``prepare_multi_gpu_env`` /
    ``prepare_deepspeed_cmd_env``, so the workers see exactly what accelerate
    would set (ACCELERATE_USE_FSDP, FSDP_*, ACCELERATE_DEEPSPEED_*, ...); plus
    ``ACCELERATE_USE_CPU`` for CPU runs and NVLink multicast off.
    """
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(
        [
            "--config_file",
            str(accelerate_config_file),
            "-m",
            "vramcalc_harness.worker",
            *worker_args,
        ]
    )
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) if defaults else []
        if mixed_precision_from_config:
            fields.append("mixed_precision")
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    if args.cpu or args.use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    env.update(NVLS_OFF_ENV)
    return {str(k): str(v) for k, v in env.items()}


# -- inside a worker ------------------------------------------------------------------------------
def rank_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the env torch.distributed.run sets; (0, 0, 1) alone."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
    )


def rank_result_path(result_path: str | Path, rank: int) -> Path:
    """Where rank ``rank`` writes its record: ``result.rank<rank>.json`` beside RESULT."""
    path = Path(result_path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def start_process_group(device: str) -> Any:
    """accelerate's ``PartialState``: the process group (NCCL, gloo on CPU), this rank's GPU.

    Called before anything touches CUDA, so every rank creates its context on
    its own GPU only, and before ``from_pretrained``, so transformers sees FSDP's
    CPU-RAM-efficient loading (rank 0 loads, the others build on meta).
    """
    from accelerate import PartialState

    return PartialState(cpu=not device.startswith("cuda"))


def fsdp_peft_wrap(model: Any, plugin: Any) -> None:
    """peft's FSDP auto wrap for adapter models: decoder layers + each trainable leaf module.

    FSDP1 flattens a unit's parameters into one tensor of one dtype; LoRA's
    fp32 adapters inside a bf16 decoder layer would break that, so (as peft's
    FSDP recipe does) every trainable leaf gets its own unit.
    """
    if plugin is None or not hasattr(model, "peft_config"):
        return
    from peft.utils.other import fsdp_auto_wrap_policy

    plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)


def zero3_loading_context(plan: TrainingPlan) -> Any:
    """An object to keep alive while a ZeRO-3 model loads, so it loads partitioned.

    transformers' ``HfDeepSpeedConfig`` of the case's DeepSpeed JSON (path in
    the launch env): ``from_pretrained`` then builds the model under
    ``deepspeed.zero.Init``, as the DeepSpeed docs prescribe outside Trainer.
    """
    if not (is_distributed(plan) and plan.strategy == "zero3"):
        return None
    from transformers.integrations import HfDeepSpeedConfig

    config_file = os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    return HfDeepSpeedConfig(json.loads(Path(config_file).read_text()))
