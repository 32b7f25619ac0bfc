"""Per-GPU memory of a multi-GPU plan: rank 0 of the real recipe, traced on fake tensors.

What is traced
--------------
``trace_world`` does for one rank of an N-GPU FSDP / DDP / DeepSpeed ZeRO run what
``memory/steptrace.py`` does for one GPU. The simulated-world records (``data/measurements/h100_world_*.jsonl``)
were measured the same way: rank 0 of an N-rank world on torch's fake process group
(``harness/simworld.py``). In order:

1. the model the harness loads (``fakemodel.build_model``: transformers + peft on the
   meta device, k-bit layers emulated), k-bit weights as bitsandbytes stores them
   (``trace/worldlayers.py``: 4-bit ones packed, in the plan's dtype under FSDP,
   ``bnb_4bit_quant_storage``, and no fp32 upcast; int8 ones int8, with their ``CB``), as
   fake tensors;
2. loading (``memory/worldload.py``), laid out as rank 0 really does it: FSDP with 16-bit
   weights loads on the CPU (accelerate's ``cpu_ram_efficient_loading``: nothing on the
   GPU); otherwise a ``device_map`` load whose ``caching_allocator_warmup`` counts the
   weights of the model's tensor-parallel plan 1/N once ``torch.distributed`` is up,
   parameters in transformers' ``dot_natural_key`` order, 4-bit quantization in
   bitsandbytes' own allocation order; the quantization state stays whole on every GPU;
3. the wrap, traced: torch's own FSDP1 ``FullyShardedDataParallel`` with accelerate's
   arguments (``fsdp_kwargs``) and accelerate's fp32 upcast of trainable flat
   parameters; or DDP, whose C++ Reducer cannot run on fake tensors and is re-expressed
   in Python allocation for allocation (``memory/ddpreducer.py``); or DeepSpeed's own
   ``deepspeed.initialize`` with the harness's JSON (``trace/zerotrace.py``);
4. HF Trainer's steps (autocast forward, backward, FSDP's / torch's gradient clipping,
   the optimizer, ``model.zero_grad()``, the harness's synchronize at each step end;
   under DeepSpeed: no autocast, ``engine.backward`` / ``engine.step``).

DeepSpeed ZeRO-1/2/3 (``zero1``, ``zero2``, ``zero3``; deepspeed installed) runs its real
engine and ZeRO optimizers (``stage_1_and_2.py``, ``stage3.py`` with ``zero.Init`` at load
and its parameter coordinator) on a fake CUDA-like accelerator (``trace/zerofake.py``:
streams that tag allocations, ``record_stream``, host waits at ``synchronize`` and
``.item()``); ZeRO traces are not unrolled (every decoder layer is traced: ZeRO's flat
buffers and buckets are the whole model's). ZeRO-Offload (``cpu_offload``) traces with the
fake GPU on ``cpu:0``, so that DeepSpeed's host (``"cpu"``) partitions stay off the device
(``WorldRecorder.split_devices``); k-bit weights under ZeRO-3 load with a ``device_map``
(no ``zero.Init``) and are partitioned by ``deepspeed.initialize``, int8 ones as bitsandbytes'
``Int8Params`` whose ``CB`` keeps the whole weight (``trace/worldlayers.py``).

FSDP1 runs its real code on CPU fake tensors: ``memory/fsdpfake.py`` patches only the
places where a CPU run differs from a CUDA one (device handle and streams, storage
resizes, data pointers, and where FSDP tells host from device by ``tensor.device`` under
CPU offload). ``memory/worldrecorder.py`` records device allocations with their stream
(FSDP1's unshard / pre-unshard / post-backward streams), storage resizes (how FSDP frees
and re-allocates unsharded flat parameters), ``record_stream`` uses and host waits, and
keeps host memory (CPU loading, offloaded shards, pinned gradients, the optimizer on
them) out. ``memory/worldreplay.py`` replays the events through the caching-allocator
model with one pool per stream.

Why FSDP1 itself and not FSDP2 / ``torch.distributed._tools``
-------------------------------------------------------------
The measured recipe is accelerate's FSDP1 (``fsdp_version: 1``). FSDP2 allocates
differently: per-parameter DTensor shards instead of one flat parameter per unit, an
all-gather into one buffer then copied out per parameter, a copy-in buffer for
reduce-scatter, no ``use_orig_params`` views, no ``_mp_shard``, no rate limiter. Its
tracker (``fsdp2_mem_tracker.FSDPMemTracker``) hooks ``FSDPParamGroup`` only, so it
cannot see FSDP1; ``MemTracker`` / ``ModTracker`` categorise live storages per module
but keep neither the order of allocations and frees the caching allocator depends on
nor streams or storage resizes; ``RuntimeEstimator`` is about time. The trace uses their
machinery where it fits (``FakeTensorMode``, the fake process group,
``fake_collectives``' fake kernels for c10d ops) on the recipe that was measured;
``memory/fsdp2check.py`` runs ``FSDPMemTracker`` on an FSDP2 stand-in for comparison.

Modelled by rule, not traced
----------------------------
* NCCL's own buffers (``memory/nccl.py``, from NCCL's defaults; no measurement backs
  them yet: the fake world has none).
* DDP's Reducer (re-expressed from ``reducer.cpp``, above).
* Pinned host memory (CPU offload) is host memory: not on the GPU, not counted.

Not modelled
------------
* GPU timing: by default a block freed after ``record_stream`` on another stream is
  reusable at once (the GPU keeps up with the host); ``replay(..., gpu_bound=True)``
  holds it until a host wait passes it (FSDP's rate limiter, a synchronize).
* The other ranks (uneven last shards), real collectives' overlap, NVLink SHARP.
* A ZeRO plan where deepspeed is not installed: ``check_world_plan`` refuses it (no rule
  stands in for DeepSpeed's code).

Sources: DeepSpeed 0.19.8 (``trace/zerotrace.py``), torch 2.13 ``torch/distributed/fsdp/`` (``_init_utils``, ``_flat_param``,
``_runtime_utils``), ``torch/csrc/distributed/c10d/reducer.cpp``, accelerate 1.16
``accelerator.py::prepare_model`` and ``FullyShardedDataParallelPlugin`` (1.15's are the
same for these paths), transformers 5.17 ``trainer.py``, ``modeling_utils.py``
(``caching_allocator_warmup``), ``core_model_loading.py``, peft 0.21
``utils/other.py::fsdp_auto_wrap_policy``, bitsandbytes 0.50.2 ``functional.py``,
``backends/cuda/ops.py``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from vramcalc.errors import InvalidPlanError
from vramcalc.memory.allocator import ALLOC
from vramcalc.memory.distributed import skips_kbit_upcast
from vramcalc.trace.events import UnrollError, WorldTrace
from vramcalc.trace.fakemodel import build_model, frozen_heap, to_fake
from vramcalc.trace.fsdpfake import fsdp1_on_fake_device
from vramcalc.trace.layerprogress import announce_layers
from vramcalc.trace.steptrace import (
    backward,
    config_layers,
    decoder_layers,
    tag_layers,
    trainer_optimizer,
)
from vramcalc.trace.unroll import TRACED_LAYERS
from vramcalc.trace.worldload import load_world
from vramcalc.trace.worldrecorder import FAKE_GPU, WorldRecorder
from vramcalc.trace.worldrepeat import canonical_world, repeat_world_step
from vramcalc.trace.worldunroll import (
    ModelCopies,
    add_modules,
    fsdp_layer_tags,
    layer_maps,
    unroll_world,
)
from vramcalc.trace.zerofake import has_deepspeed, zero_on_fake_device
from vramcalc.trace.zerotrace import zero_steps
from vramcalc.training_plan import TrainingPlan

SHARDED = ("fsdp", "fsdp-grad-op")
ZERO = ("zero1", "zero2", "zero3")  # DeepSpeed's own code (trace/zerotrace.py)
WORLD_STRATEGIES = (*SHARDED, "ddp", *ZERO)
DEEPSPEED_HINT = "pip install deepspeed (vramcalc's zero extra: pip install 'vramcalc[zero]')"
BUCKET_CAP_MB = 25  # DistributedDataParallel's default, as accelerate passes it


def fake_world(world_size: int) -> Any:
    """Join torch's fake process group as rank 0 of ``world_size`` (left as it was after)."""
    import torch.distributed as dist
    import torch.distributed._tools.fake_collectives  # noqa: F401 - collectives' fake kernels
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if dist.get_backend() == "fake" and dist.get_world_size() == world_size:
            return contextlib.nullcontext()
        raise InvalidPlanError(
            ["a process group is already initialized: trace a world in a process of its own"]
        )
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    return contextlib.closing(_Destroy())


class _Destroy:
    def close(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()


def check_world_plan(plan: TrainingPlan) -> None:
    """``InvalidPlanError`` for a plan the fake world cannot trace."""
    problems = []
    if plan.num_gpus < 2:
        problems.append("num_gpus: a world needs 2 or more GPUs")
    if plan.strategy not in WORLD_STRATEGIES:
        problems.append(f"strategy {plan.strategy}: traced are {', '.join(WORLD_STRATEGIES)}")
    if plan.strategy in ZERO and not has_deepspeed():
        problems.append(
            f"strategy {plan.strategy} runs DeepSpeed's own ZeRO code, and deepspeed is not "
            f"installed: {DEEPSPEED_HINT}"
        )
    if plan.strategy in SHARDED and plan.quant == "int8":
        problems.append("quant int8 cannot be sharded by FSDP (bitsandbytes' Int8Params)")
    if problems:
        raise InvalidPlanError(problems)


# -- the model ---------------------------------------------------------------------------------
def build_world_model(config_dict: dict[str, Any], plan: TrainingPlan, num_layers: int | None):  # type: ignore[no-untyped-def]
    """The harness's model on the meta device, k-bit weights as bitsandbytes stores them
    (``trace/worldlayers.py``): 4-bit ones packed (``(numel + 1) // (2 * itemsize)`` rows of 1)
    in the plan's dtype under FSDP and ZeRO-3 (``bnb_4bit_quant_storage``:
    ``skips_kbit_upcast``), uint8 otherwise; int8 ones as ``Int8Params``, int8 ``(out, in)``."""
    import torch

    from vramcalc.trace.worldlayers import int8_params, pack_4bit  # torch: only when a trace runs

    model = build_model(config_dict, plan, num_layers)
    if plan.quant == "int8":
        int8_params(model)
    elif plan.is_kbit:
        if skips_kbit_upcast(plan):  # FSDP, ZeRO-3: bnb_4bit_quant_storage = the plan's dtype
            storage = torch.float16 if plan.dtype == "fp16" else torch.bfloat16
        else:
            storage = torch.uint8
        pack_4bit(model, storage)
    return model


# -- the wrappers ------------------------------------------------------------------------------
def layer_classes(model: Any) -> set[type]:
    """The decoder layer classes to wrap: the model's ``_no_split_modules`` that it has
    (accelerate ``set_auto_wrap_policy``; peft ``fsdp_auto_wrap_policy``)."""
    names: list[str] = []
    for module in model.modules():
        names.extend(getattr(module, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in set(names)}


def fsdp_kwargs(model: Any, plan: TrainingPlan) -> dict[str, Any]:
    """``FullyShardedDataParallel`` arguments as accelerate 1.15 builds them from the
    harness's config (``harness/distributed.py``: FULL_SHARD / SHARD_GRAD_OP, transformer
    layer wrap, use_orig_params, cpu_ram_efficient_loading + sync_module_states,
    BACKWARD_PRE, no forward prefetch) and transformers' Trainer (peft's wrap policy;
    QLoRA: mixed precision in the quant storage dtype)."""
    import torch
    from torch.distributed.fsdp import (
        BackwardPrefetch,
        CPUOffload,
        MixedPrecision,
        ShardingStrategy,
    )
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if plan.uses_adapters:
        policy = _peft_policy(model)
    else:
        policy = functools.partial(
            transformer_auto_wrap_policy, transformer_layer_cls=layer_classes(model)
        )
    dtype = torch.float16 if plan.dtype == "fp16" else torch.bfloat16
    return {
        "sharding_strategy": ShardingStrategy.FULL_SHARD
        if plan.strategy == "fsdp"
        else ShardingStrategy.SHARD_GRAD_OP,
        "cpu_offload": CPUOffload(offload_params=plan.cpu_offload),
        "auto_wrap_policy": policy,
        "mixed_precision": MixedPrecision(
            param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=dtype
        ),
        "sync_module_states": True,
        "backward_prefetch": BackwardPrefetch.BACKWARD_PRE,
        "forward_prefetch": False,
        "use_orig_params": True,
        "limit_all_gathers": True,
        "device_id": torch.device("cpu"),  # the fake device (memory/fsdpfake.py)
    }


def _peft_policy(model: Any) -> Any:
    import os

    from peft.utils.other import fsdp_auto_wrap_policy

    names = ",".join(sorted(c.__name__ for c in layer_classes(model)))
    previous = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = names  # what accelerate's launch env sets
    try:
        return fsdp_auto_wrap_policy(model)
    finally:
        if previous is None:
            os.environ.pop("FSDP_TRANSFORMER_CLS_TO_WRAP", None)
        else:
            os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = previous


def wrap_fsdp(model: Any, plan: TrainingPlan, recorder: Any = None) -> Any:
    """FSDP1 as accelerate's ``prepare_model``: wrap, then upcast every trainable flat
    parameter that is not fp32 (mixed precision on: "follow DeepSpeed's strategy"), each
    unit's in its decoder layer on ``recorder`` (a ``WorldRecorder``; None: untagged)."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wrapped = FSDP(model, **fsdp_kwargs(model, plan))
    for module in FSDP.fsdp_modules(wrapped):
        if not module._has_params:
            continue
        param = module._flat_param
        if param.dtype != torch.float32 and param.requires_grad:
            layer = recorder.layer_of(module._fsdp_wrapped_module) if recorder else -1
            with recorder.in_layer(layer) if recorder else contextlib.nullcontext():
                param.data = param.data.to(torch.float32)
            module._handle._orig_param_dtype = torch.float32
    return wrapped


def wrap_ddp(model: Any, plan: TrainingPlan, model_tensors: Any = None) -> Any:
    """DDP as accelerate builds it from Trainer's kwargs handler (``find_unused_parameters``
    unless a ``PreTrainedModel`` with checkpointing; 25 MB buckets; gradients not bucket
    views; buffers broadcast), its Reducer re-expressed in Python (``memory/ddpreducer.py``),
    sized for the tensors ``model_tensors`` says the model's stand for (default: themselves)."""
    from transformers import PreTrainedModel

    from vramcalc.trace.ddpreducer import DDPLike, as_described  # torch: only when a trace runs

    find_unused = not (isinstance(model, PreTrainedModel) and plan.gradient_checkpointing)
    return DDPLike(
        model,
        find_unused_parameters=find_unused,
        bucket_cap_mb=BUCKET_CAP_MB,
        model_tensors=model_tensors or as_described,
    )


# -- the trace ---------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    import logging
    import warnings

    level = logging.getLogger("torch.distributed").level
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.getLogger("torch.distributed").setLevel(level)


def trace_world(
    config_dict: dict[str, Any],
    plan: TrainingPlan,
    steps: int = 3,
    num_layers: int | None = None,
    unroll: bool = True,
) -> WorldTrace:
    """Rank 0's allocations over loading, the wrap and ``steps`` Trainer steps of ``plan``
    (``num_layers`` decoder layers, default all).

    With ``unroll``, a model of more than ``unroll.TRACED_LAYERS`` layers is traced with that
    many and unrolled to all of them, and under FSDP two steps are traced and the second
    repeated (``trace/worldunroll.py``; DDP rebuilds its buckets in the second step, so its
    steps are traced); where the trace does not have that shape, all of it is traced. A
    ZeRO plan is traced with every layer, two steps and the second repeated."""
    check_world_plan(plan)
    return canonical_world(_unrolled(config_dict, plan, steps, num_layers, unroll))


def _unrolled(
    config_dict: dict[str, Any],
    plan: TrainingPlan,
    steps: int,
    num_layers: int | None,
    unroll: bool,
) -> WorldTrace:
    total = num_layers or config_layers(config_dict)
    if not unroll:
        return _trace(config_dict, plan, steps, num_layers, None)
    if plan.strategy in ZERO:  # every layer (ZeRO's flat buffers are the whole model's)
        if steps > 2:  # the second step repeated
            try:
                return repeat_world_step(_trace(config_dict, plan, 2, num_layers, None), steps - 2)
            except UnrollError:
                pass
        return _trace(config_dict, plan, steps, num_layers, None)
    layers = min(total, TRACED_LAYERS)
    if plan.strategy in SHARDED and steps > 2:
        small = _trace(config_dict, plan, 2, layers, total)
        try:
            return _all_layers(repeat_world_step(small, steps - 2), total)
        except UnrollError:
            pass
    small = _trace(config_dict, plan, steps, layers, total)
    try:
        return _all_layers(small, total)
    except UnrollError:
        return _trace(config_dict, plan, steps, num_layers, None)


def _all_layers(trace: WorldTrace, num_layers: int) -> WorldTrace:
    return unroll_world(trace, num_layers) if num_layers > trace.num_layers else trace


@frozen_heap()
def _trace(
    config_dict: dict[str, Any],
    plan: TrainingPlan,
    steps: int,
    num_layers: int | None,
    model_layers: int | None,
) -> WorldTrace:
    """Trace a model of ``num_layers`` decoder layers (default: the config's), every event
    tagged with its layer; sized for ``model_layers`` where a size is the whole model's."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vramcalc.trace.emulation import (  # torch: only when a trace runs
        cuda_functions,
        gpu_code_paths,
    )

    sharded, zero = plan.strategy in SHARDED, plan.strategy in ZERO
    with quiet():
        model = build_world_model(config_dict, plan, num_layers)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # ZeRO-Offload: the fake GPU is cpu:0, DeepSpeed's "cpu" the host (worldrecorder)
    split_devices = zero and plan.cpu_offload
    named = to_fake(model, mode, FAKE_GPU if split_devices else None)
    config = model.config
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads)
    recorder = WorldRecorder(plan, (plan.batch_size, plan.seq_len, heads, head_dim))
    recorder.split_devices = split_devices
    vocab = int(config.vocab_size)
    num_decoder_layers = len(decoder_layers(model))
    tensor_layers, recorder.module_layers = layer_maps(model)
    recorder.layer_modules = {id(layer) for layer in decoder_layers(model)}
    copies = ModelCopies(tensor_layers, model_layers or num_decoder_layers, num_decoder_layers)
    recorder.layer_repeats = copies.layer_repeats()
    recorder.mark("load")
    load_world(recorder, model, named, plan, tensor_layers, copies.copies())
    with (
        fake_world(plan.num_gpus),
        mode,
        quiet(),
        gpu_code_paths(),
        cuda_functions(),
        zero_on_fake_device(recorder, plan.num_gpus) if zero else fsdp1_on_fake_device(recorder),
        fsdp_layer_tags(recorder) if sharded else contextlib.nullcontext(),
        announce_layers(model, recorder, plan, model_layers or num_decoder_layers, steps),
        recorder.mode,
    ):
        if zero:
            wrapper = zero_steps(model, plan, recorder, steps)
            return _world_trace(recorder, num_decoder_layers, wrapper)
        recorder.mark("wrap")
        if sharded:
            wrapped = wrap_fsdp(model, plan, recorder)
            wrapper = "FSDP1 (torch FullyShardedDataParallel, accelerate's arguments)"
        else:
            wrapped = wrap_ddp(model, plan, copies.describe)
            wrapper = "DDP (torch Reducer re-expressed in Python) + pass-through comm hook"
        add_modules(recorder, wrapped)
        nodes = tag_layers(wrapped, recorder)  # forward hooks on each layer's unit
        wrapped.register_forward_pre_hook(lambda module, args: setattr(recorder, "layer", -1))
        params = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = trainer_optimizer(params, plan)
        wrapped.zero_grad()
        for step in range(steps):
            recorder.mark(f"step{step}")
            for micro in range(plan.grad_accum):
                last = micro == plan.grad_accum - 1
                with contextlib.nullcontext() if last else wrapped.no_sync():
                    ids = torch.randint(0, vocab, (plan.batch_size, plan.seq_len))
                    labels = ids.clone()
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = wrapped(input_ids=ids, labels=labels).loss
                    del ids, labels
                    if plan.grad_accum > 1:
                        loss = loss / plan.grad_accum
                    recorder.node_streams.hook(loss)  # nodes made on a side stream run there
                    backward(recorder, loss, nodes, f"step{step}_backward{micro}")
                    recorder.node_streams.clear()
                    del loss
            recorder.mark(f"step{step}_optimizer")
            with recorder.scope("host") if plan.cpu_offload else contextlib.nullcontext():
                if sharded:
                    wrapped.clip_grad_norm_(1.0)
                elif params:
                    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                optimizer.step()
            wrapped.zero_grad()
            recorder.sync()  # the harness synchronizes at every step end (on_step_end)
        recorder.mark("end")
        recorder.stopped = True  # what is freed after the last step cannot raise a peak
        del optimizer, params, wrapped
    return _world_trace(recorder, num_decoder_layers, wrapper)


def _world_trace(recorder: WorldRecorder, num_decoder_layers: int, wrapper: str) -> WorldTrace:
    return WorldTrace(
        tuple(recorder.events),
        tuple(recorder.streams),
        tuple(recorder.markers),
        tuple(recorder.sync_points),
        num_decoder_layers,
        wrapper,
        tuple(recorder.labels.get(h, "") if op == ALLOC else "" for op, h, _ in recorder.events),
        frozenset(recorder.cross_stream),
        tuple(recorder.tags),
    )
