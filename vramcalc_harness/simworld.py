"""A simulated world: rank 0 of an N-GPU FSDP / DDP / DeepSpeed ZeRO run, alone on one device.

Per-GPU memory of a multi-GPU plan needs one rank that allocates exactly
what it would among N. ``torch.distributed``'s ``fake`` backend
(``torch.testing._internal.distributed.fake_pg``) gives that: the process
joins a group of ``world_size`` N as rank 0, and every collective returns a
buffer of the right shape without moving data. So FSDP shards the model to
1/N, all-gathers each unit into full-size buffers and frees them, and
reduce-scatters gradients into 1/N shards -- every allocation of rank 0 --
while the other N-1 ranks never exist.

* On CUDA the case runs the real multi-GPU recipe: the same accelerate launch
  env as ``vramcalc_harness.agent`` gives its ranks (``vramcalc_harness.distributed.launch_env``),
  so Trainer (or the loop) wraps the model with accelerate's FSDP1
  (``FULL_SHARD`` / ``SHARD_GRAD_OP``, CPU offload, peft's auto wrap, 4-bit
  storage in the plan's dtype) or DDP, on the fake group.
* ZeRO-1/2/3 (CUDA only): accelerate's DeepSpeed launch env and the case's
  ``deepspeed.json`` (``distributed.deepspeed_config``), so Trainer hands the model
  to ``deepspeed.initialize``; DeepSpeed finds the fake group initialized and runs
  its collectives on it (ZeRO-3 loads under ``zero.Init``, each parameter
  partitioned to 1/N). The record keeps DeepSpeed's skipped steps
  (``deepspeed_skipped_steps``): a fake collective leaves its output as it was,
  and a step DeepSpeed skips for a non-finite gradient would not be the real one.
* On CPU (the tests) accelerate runs no FSDP (only DDP), and FSDP1 refuses a
  device without an accelerator; FSDP there is FSDP2's ``fully_shard`` on each
  decoder layer and the root, in the ``loop`` recipe.
* DDP's default all-reduce hook fails on the fake group (its future yields
  nothing); every DDP module built in a simulated world gets a pass-through
  hook that returns the bucket unchanged, which is the memory a real
  all-reduce leaves (in place, same buffer).

What a fake world cannot show is listed in every record it writes
(``SIMULATED_WORLD_LIMITS``); its tokens/s are not a speed measurement.
"""

from __future__ import annotations

import os
from typing import Any

from vramcalc.configs.sharding import ZERO_STAGE
from vramcalc_harness.distributed import (
    DEEPSPEED_STRATEGIES,
    launch_env,
    require_strategy_dependencies,
    start_process_group,
)
from vramcalc_harness.errors import HarnessError
from vramcalc_harness.scenario import Case

ENV_FLAG = "VRAMCALC_SIMULATED_WORLD"


def wrapper_name(case: Case, device: str) -> str:
    """What wraps the model in this simulated world (recorded as ``simulated_world_wrapper``)."""
    if case.plan.strategy == "ddp":
        return "DDP (accelerate) + pass-through comm hook"
    if case.plan.strategy in DEEPSPEED_STRATEGIES:
        stage = ZERO_STAGE[case.plan.strategy]
        return f"DeepSpeed ZeRO-{stage} (accelerate DeepSpeedPlugin, Trainer)"
    if device.startswith("cuda"):
        return "FSDP1 (accelerate FullyShardedDataParallel)"
    return "FSDP2 (torch fully_shard, CPU)"


def check_simulated_machine(case: Case, device: str) -> None:
    """``HarnessError`` when this machine cannot run the simulated-world case."""
    plan = case.plan
    if plan.strategy in DEEPSPEED_STRATEGIES:
        require_strategy_dependencies(plan)
        if not device.startswith("cuda"):
            raise HarnessError(
                f"simulate_world with strategy {plan.strategy} needs a CUDA GPU (DeepSpeed "
                "refuses the CPU through accelerate)."
            )
    if device == "cpu":
        if plan.cpu_offload:
            raise HarnessError("simulate_world with cpu_offload needs a CUDA GPU.")
        if plan.strategy != "ddp" and case.recipe != "loop":
            raise HarnessError(
                f"simulate_world on CPU runs strategy {plan.strategy} as FSDP2 fully_shard in "
                "recipe loop (accelerate runs no FSDP on CPU); use recipe loop or --device cuda."
            )
        if plan.is_kbit:
            raise HarnessError("simulate_world with k-bit weights needs a CUDA GPU.")


def world_env(world_size: int) -> dict[str, str]:
    """The env torch.distributed.run would give rank 0 of ``world_size`` processes on one node."""
    return {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",  # never connected to: the fake group has no rendezvous
        ENV_FLAG: str(world_size),
    }


def start_fake_world(world_size: int, device: str) -> None:
    """Join a fake process group as rank 0 of ``world_size``, then accelerate's state on it.

    Called before anything touches CUDA (as ``start_process_group``); accelerate
    finds the group initialized and keeps it.
    """
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    os.environ.update(world_env(world_size))
    if device.startswith("cuda"):
        torch.cuda.set_device(0)
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    install_ddp_passthrough()
    if device.startswith("cuda") or os.environ.get("ACCELERATE_USE_CPU"):
        start_process_group(device)


def passthrough_hook(state, bucket):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
    """A DDP comm hook that returns the bucket as it is (a real all-reduce works in place).

    Unannotated: DDP checks a hook's annotations against its own classes.
    """
    import torch

    future = torch.futures.Future()  # type: ignore[var-annotated]
    future.set_result(bucket.buffer())
    return future


def install_ddp_passthrough() -> None:
    """Make every ``DistributedDataParallel`` built from now on register ``passthrough_hook``."""
    from torch.nn.parallel import DistributedDataParallel

    if getattr(DistributedDataParallel, "_vramcalc_passthrough", False):
        return
    original_init = DistributedDataParallel.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.register_comm_hook(None, passthrough_hook)

    DistributedDataParallel.__init__ = init  # type: ignore[method-assign]
    DistributedDataParallel._vramcalc_passthrough = True  # type: ignore[attr-defined]


def fully_shard_model(model: Any, case: Case, layer_classes: list[str]) -> Any:
    """FSDP2 ``fully_shard`` on every decoder layer, then the root (the CPU stand-in for FSDP1).

    ``fsdp`` reshards after forward (FULL_SHARD), ``fsdp-grad-op`` keeps the
    gathered parameters until backward (SHARD_GRAD_OP).
    """
    from torch.distributed.fsdp import fully_shard

    reshard = case.plan.strategy == "fsdp"
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise HarnessError(f"no module of {layer_classes} in the model to shard.")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    return model


def _local_bytes(tensor: Any) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return int(local.numel() * local.element_size())


def state_bytes(model: Any, optimizer: Any) -> dict[str, int]:
    """This rank's parameter, gradient and optimizer-state bytes (local shards only)."""
    import torch

    params = list(model.parameters())
    inner = getattr(optimizer, "optimizer", optimizer)
    optimizer_bytes = sum(
        _local_bytes(value)
        for state in inner.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    )
    return {
        "rank_parameter_bytes": sum(_local_bytes(p) for p in params),
        "rank_gradient_bytes": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "rank_optimizer_state_bytes": optimizer_bytes,
    }


def simulated_launch_env(
    case: Case, device: str, accelerate_config_file: str | None
) -> dict[str, str]:
    """The env of a simulated-world worker: accelerate's launch env (as ``vramcalc_harness.agent``'s
    ranks get it) + rank 0's torch.distributed.run env. On CPU, FSDP gets no accelerate env:
    the loop shards with FSDP2 itself."""
    env: dict[str, str] = {}
    if accelerate_config_file is not None and uses_accelerate(case, device):
        env.update(launch_env(accelerate_config_file, ["run", "SPEC.json", "RESULT.json"]))
    env[ENV_FLAG] = str(case.plan.num_gpus)  # rank 0's env is set by the worker itself
    return env


def uses_accelerate(case: Case, device: str) -> bool:
    """Whether accelerate wraps the model (everything but FSDP on CPU)."""
    return device.startswith("cuda") or case.plan.strategy == "ddp"
