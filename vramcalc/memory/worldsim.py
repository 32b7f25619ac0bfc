"""A multi-GPU plan's per-GPU peaks, from the world trace, per allocator mode; cached on disk.

``simulate_world`` is ``memory/slack.py::simulate_plan`` for ``num_gpus > 1`` plans that
``trace/worldtrace.py`` traces (FSDP1 ``fsdp`` / ``fsdp-grad-op``, with or without CPU
offload; DDP; DeepSpeed ZeRO-1/2/3 with or without ZeRO-Offload, ZeRO-3 with 16-bit, 4-bit or
int8 weights: DeepSpeed's own code, ``trace/zerotrace.py``): it returns the same
``AllocatorSimulation`` (peak allocated, peak reserved per allocator mode), so
``estimate_from_inventory(simulation=...)`` takes it as it takes a single-GPU one;
``seam_simulation`` is what the estimator's seam (``estimate.Prepared.simulation``) asks for
a multi-GPU plan: the world simulation, or ``SimulationError`` for a plan the world trace
cannot run (a ZeRO plan without deepspeed installed among them: ``pip install deepspeed``).
``world_device_total_bytes`` composes nvidia-smi's figure as the estimator does, with NCCL's
buffers by rule (``memory/nccl.py``) unless the plan ran in a simulated (fake) world.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any

from vramcalc.catalog import one_line
from vramcalc.errors import InvalidPlanError, SimulationError, VramcalcError
from vramcalc.memory.allocator import AllocatorConfig
from vramcalc.memory.nccl import nccl_buffer_bytes
from vramcalc.memory.overhead import runtime_bytes
from vramcalc.memory.slack import (
    ALLOCATOR_MODES,
    SIMULATED_STEPS,
    AllocatorSimulation,
    read_simulation,
    simulation_key,
    simulation_path,
    write_simulation,
)
from vramcalc.memory.worldreplay import replay
from vramcalc.trace.worldtrace import (
    WORLD_STRATEGIES,
    ZERO,
    check_world_plan,
    trace_world,
)
from vramcalc.training_plan import TrainingPlan

#: bump when the world trace or its replay changes what an FSDP / DDP simulation returns (6:
#: the cuBLAS workspace after its first matmul's output; 7: int8 weights as Int8Params, int8
#: with their CB, and MatMul8bitLt freeing its int32 result after its conversion)
WORLD_SIMULATION_VERSION = 7
#: the same for ZeRO plans, whose traces run DeepSpeed's code (1: first traced; 2: Trainer's two
#: parameter groups; 3: ZeRO-3 traces DeepSpeed's memory-efficient F.linear; 4: ZeRO-Offload
#: traced, host and device told apart by device; 5: 4-bit ZeRO-3 traced, loaded without
#: zero.Init, bitsandbytes' MatMul4Bit keeping a view of the gathered weight; 6: int8 ZeRO-3
#: traced (Int8Params' CB kept whole, Linear8bitLt dropping the gathered weight), peft's
#: lora.bnb forward reading lora_A.weight outside autocast, MatMul8bitLt freeing its int32
#: result after its conversion); apart, so that a ZeRO change does not throw away the FSDP /
#: DDP simulations cached on users' disks
ZERO_SIMULATION_VERSION = 6


def simulates_world(plan: TrainingPlan) -> bool:
    """Whether the world trace answers this multi-GPU plan: every strategy it knows, FSDP1,
    DDP, and ZeRO-1/2/3, ZeRO-Offload included (``offload_optimizer`` / ``offload_param``:
    DeepSpeed's host partitions are told from the fake GPU by device,
    ``trace/worldrecorder.py``), ZeRO-3 with 16-bit, 4-bit or int8 weights (k-bit ones load
    without ``zero.Init`` and are partitioned by ``deepspeed.initialize``:
    ``zerotrace.loads_in_zero_init``; int8 ones keep their whole weight in bitsandbytes'
    ``CB``: ``trace/worldlayers.py``)."""
    return plan.strategy in WORLD_STRATEGIES


def world_simulation_key(config_dict: dict, plan: TrainingPlan) -> str:
    """The single-GPU key (model, plan, libraries) + the world's fields, hashed."""
    world = {
        "single": simulation_key(config_dict, plan),
        "num_gpus": plan.num_gpus,
        "strategy": plan.strategy,
        "cpu_offload": plan.cpu_offload,
        "v": WORLD_SIMULATION_VERSION,
    }
    if plan.strategy in ZERO:  # DeepSpeed's code is what runs
        world["v"] = f"zero-{ZERO_SIMULATION_VERSION}"
        world["deepspeed"] = _deepspeed_version()
    return "world-" + hashlib.sha256(json.dumps(world, sort_keys=True).encode()).hexdigest()[:32]


def _deepspeed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return None


def cached_world_simulation(config_dict: dict, plan: TrainingPlan) -> AllocatorSimulation | None:
    """The cached world simulation of ``plan``, or None (no torch import)."""

    return read_simulation(simulation_path(world_simulation_key(config_dict, plan)))


def simulate_world(
    config_dict: dict, plan: TrainingPlan, use_cache: bool = True
) -> AllocatorSimulation:
    """Trace rank 0 of ``plan``'s world (``worldtrace.trace_world``: loading, the wrap,
    ``SIMULATED_STEPS`` steps) and replay it under each allocator mode; cached on disk.
    Raises ``InvalidPlanError`` for plans the world trace does not run (ZeRO, 1 GPU)."""
    import time

    if use_cache:
        hit = cached_world_simulation(config_dict, plan)
        if hit is not None:
            return hit
    started = time.perf_counter()
    trace = trace_world(config_dict, plan, steps=SIMULATED_STEPS)
    simulation = AllocatorSimulation({}, {}, 0.0)
    for mode in ALLOCATOR_MODES:
        result = replay(trace, AllocatorConfig(expandable_segments=mode == "expandable"))
        simulation = simulation.with_mode(
            mode, result.peak_allocated_bytes, result.peak_reserved_bytes
        )
    simulation = replace(simulation, trace_seconds=time.perf_counter() - started)
    if use_cache:
        write_simulation(simulation_path(world_simulation_key(config_dict, plan)), simulation)
    return simulation


def seam_simulation(model_name: str, config_dict: dict, plan: TrainingPlan) -> AllocatorSimulation:
    """A multi-GPU plan's simulation for the estimator: FSDP1 (``fsdp``, ``fsdp-grad-op``), DDP
    and ZeRO plans simulated (``simulate_world``); a plan the world trace refuses (FSDP cannot
    shard bitsandbytes' int8 weights; ZeRO without deepspeed installed) or fails on is a
    ``SimulationError`` naming ``--allocator-model approximate``: no answer is silently
    approximated."""
    way_out = "--allocator-model approximate gives the rule-based estimate instead"
    try:
        check_world_plan(plan)
    except InvalidPlanError as err:
        raise SimulationError(
            f"--model {model_name}: this {plan.num_gpus}-GPU {plan.strategy} plan cannot be "
            f"simulated ({'; '.join(err.problems)}); {way_out}"
        ) from err
    try:
        return simulate_world(config_dict, plan)
    except VramcalcError:
        raise
    except Exception as err:
        raise SimulationError(
            f"--model {model_name}: rank 0 of this {plan.num_gpus}-GPU {plan.strategy} run "
            f"could not be traced on fake tensors ({type(err).__name__}: {one_line(err)}); "
            f"{way_out}"
        ) from err


def world_device_total_bytes(
    simulation: AllocatorSimulation,
    plan: TrainingPlan,
    calibration: Any,
    eager_attention: bool = False,
    simulated_world: bool = False,
) -> dict[str, int]:
    """Per-GPU device total as ``estimate_from_inventory`` composes it: peak reserved +
    CUDA context and kernels + the driver's reserve + NCCL's buffers (by rule; 0 in a
    simulated world, which has no NCCL communicator). Returns the parts and the total."""

    parts = {
        "peak_reserved": simulation.peak_reserved_bytes[plan.allocator],
        "cuda_context": runtime_bytes(plan, eager_attention, calibration),
        "driver_reserved": calibration.driver_reserved_bytes,
        "nccl": 0 if simulated_world else nccl_buffer_bytes(plan.num_gpus),
    }
    parts["device_total"] = sum(parts.values())
    return parts
