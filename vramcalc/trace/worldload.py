"""Loading of one rank of a fake world, as events bound to the traced model's parameters.

What the harness's ``build_model`` does on rank 0 (``harness/build.py``), laid out as
``memory/slack.py::load_events`` lays out the single-GPU load, with what differs:

* FSDP without k-bit weights: accelerate's ``cpu_ram_efficient_loading`` (with
  ``sync_module_states``): rank 0 loads on the CPU (no ``device_map``), peft's
  adapters too; nothing is on the GPU before FSDP moves each unit there
  (traced, ``memory/fsdpfake.py``). Every storage is host memory here.
* Otherwise a ``device_map`` load onto the GPU: transformers'
  ``caching_allocator_warmup`` (one tensor of the loaded size, freed; the weights of
  the model's tensor-parallel plan counted 1/N once ``torch.distributed`` is up:
  ``warmup_bytes``), parameters in
  the order ``convert_and_load_state_dict_in_model`` materializes them (checkpoint keys
  sorted by ``dot_natural_key``: layer indices numerically), k-bit weights staged in the load dtype and quantized
  (4-bit: packed data, absmax, code; double quantization: uint8 absmax, nested
  absmax, map copy, offset), adapters in fp32, then ``empty_cache`` (Trainer's
  ``accelerator.free_memory()`` at the start of its training loop).
* FSDP and ZeRO-3 with k-bit weights skip ``prepare_model_for_kbit_training`` (no fp32
  copies of the other parameters: ``skips_kbit_upcast``); the quantization state is never a
  parameter, so it stays whole on every GPU. ZeRO-3 with 4-bit weights loads this way too
  (transformers skips ``zero.Init`` for a quantized model: ``zerotrace.loads_in_zero_init``).
  DDP and ZeRO-1/2 with k-bit weights prepare as on one GPU.

Each parameter's storage is bound to the allocation that made it, so that when FSDP
flattens a unit and the original storage dies, its free is the load's handle.
"""

from __future__ import annotations

from typing import Any

from vramcalc.memory.distributed import skips_kbit_upcast
from vramcalc.memory.loading import LOAD_ITEMSIZE, checkpoint_key
from vramcalc.memory.weights import DYNAMIC_MAP_ENTRIES, NESTED_BLOCKSIZE, NF4_BLOCKSIZE
from vramcalc.trace.worldrecorder import WorldRecorder
from vramcalc.training_plan import TrainingPlan

SHARDED = ("fsdp", "fsdp-grad-op")


def loads_on_gpu(plan: TrainingPlan) -> bool:
    """Whether rank 0 loads onto the GPU (``device_map``) or on the CPU (FSDP, 16-bit), or
    partitioned by ``zero.Init`` (ZeRO-3: ``trace/zerotrace.py::load_zero3`` lays it out)."""
    return not (plan.strategy in (*SHARDED, "zero3") and not plan.is_kbit)


def _nbytes(tensor: Any) -> int:
    return int(tensor.numel() * tensor.element_size())


def _quantize(
    recorder: WorldRecorder, param: Any, numel: int, plan: TrainingPlan, first: bool
) -> None:
    """Allocate one quantized weight (``param``, bound) and its state; staging freed.

    bitsandbytes 0.50.2 in the order it allocates (``Params4bit._quantize`` ->
    ``functional.quantize_4bit`` -> the CUDA ``quantize_4bit`` op: fp32 absmax, then the
    packed weight; ``get_4bit_type``: a new 16-entry code; with double quantization
    ``offset = absmax.mean()``, ``quantize_blockwise(absmax - offset, 256)``: the
    difference (a temporary), its fp32 absmax and uint8 output, a copy of the dynamic
    map (the map itself once per process); int8: ``Int8Params._quantize``).
    """
    staging = recorder.alloc_bytes(numel * LOAD_ITEMSIZE[plan.dtype])
    if plan.quant == "int8":
        fp16 = recorder.alloc_bytes(2 * numel)
        recorder.bind(param, recorder.alloc_bytes(numel), numel, recorder.layer)  # CB, int8
        param.CB = param.data  # Int8Params: data and CB one tensor (trace/worldlayers.py)
        rows = int(param.shape[0]) if param.dim() == 2 else 1
        recorder.alloc_bytes(4 * rows)  # SCB, fp32 per output row
        recorder.free_handle(fp16)
    else:
        blocks = -(-numel // NF4_BLOCKSIZE)
        absmax = recorder.alloc_bytes(4 * blocks)
        packed = _nbytes(param)
        recorder.bind(param, recorder.alloc_bytes(packed), packed, recorder.layer)
        recorder.alloc_bytes(16 * 4)  # the 4-bit code
        if plan.double_quant:
            recorder.alloc_bytes(4)  # offset = absmax.mean()
            centred = recorder.alloc_bytes(4 * blocks)  # absmax - offset
            if first:
                recorder.alloc_bytes(4 * DYNAMIC_MAP_ENTRIES)  # name2qmap["dynamic"]
            recorder.alloc_bytes(4 * -(-blocks // NESTED_BLOCKSIZE))  # second-level absmax
            recorder.alloc_bytes(blocks)  # absmax quantized to uint8
            recorder.alloc_bytes(4 * DYNAMIC_MAP_ENTRIES)  # code.to(copy=True)
            recorder.free_handle(centred)
            recorder.free_handle(absmax)
    recorder.free_handle(staging)


def warmup_bytes(
    model: Any,
    base: list[tuple[str, Any]],
    kbit_numel: dict[int, int],
    plan: TrainingPlan,
    copies: dict[int, int] | None = None,
) -> int:
    """The tensor ``caching_allocator_warmup`` allocates (and frees) before loading.

    transformers' ``get_total_byte_count``: every weight at its loaded size (4-bit: 0.5
    byte per parameter, int8: 1), and, once ``torch.distributed`` is initialized (every
    multi-GPU rank), the weights its tensor-parallel plan names (``model.tp_plan``, from
    ``config.base_model_tp_plan``: attention and MLP projections, the head, on some models
    the embedding) divided by the world size, even though nothing is tensor parallel;
    then ``torch.empty(byte_count // 2, dtype=float16)``. ``copies``: how many parameters of
    the model to load each traced parameter stands for (``id`` -> count; default 1: a model
    traced with fewer decoder layers than it has, ``trace/worldunroll.py``).
    """
    from transformers.distributed.tensor_parallel import _get_parameter_tp_plan

    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    tp_plan = getattr(base_model, "tp_plan", None) or {}
    load_size = LOAD_ITEMSIZE[plan.dtype]
    total = 0.0
    for name, p in base:
        if id(p) in kbit_numel:
            count: float = kbit_numel[id(p)] * (1 if plan.quant == "int8" else 0.5)
        else:
            count = p.numel() * load_size
        key = checkpoint_key(name)
        if tp_plan and _get_parameter_tp_plan(key, tp_plan, is_weight=True) is not None:
            count //= plan.num_gpus
        total += count * (copies or {}).get(id(p), 1)
    return int(total // 2) * 2


def load_world(
    recorder: WorldRecorder,
    model: Any,
    named: list[tuple[str, Any]],
    plan: TrainingPlan,
    layers: dict[int, int] | None = None,
    copies: dict[int, int] | None = None,
) -> None:
    """Rank 0's loading, k-bit preparation and adapters on ``recorder`` (module docstring);
    each parameter's events in its decoder layer (``layers``: ``id`` -> layer), the warmup
    sized for ``copies`` of each (``warmup_bytes``)."""
    from vramcalc.trace.emulation import Emulated4bit, Emulated8bit  # torch: only when a trace runs

    if not loads_on_gpu(plan):
        recorder.on_host([p for _, p in named])
        recorder.on_host(list(model.buffers()))
        return
    recorder.keep(model.buffers())
    kbit_numel = {
        id(m.weight): m.in_features * m.out_features
        for m in model.modules()
        if isinstance(m, (Emulated4bit, Emulated8bit))
    }
    base = [(n, p) for n, p in named if "lora_" not in n]
    adapters = [(n, p) for n, p in named if "lora_" in n]
    from transformers.core_model_loading import dot_natural_key

    load_size = LOAD_ITEMSIZE[plan.dtype]
    layer_of = layers or {}
    warmup = warmup_bytes(model, base, kbit_numel, plan, copies)
    recorder.free_handle(recorder.alloc_bytes(warmup))
    loaded: list[tuple[Any, int, int]] = []  # (param, handle, bytes as loaded)
    first = True
    for _, p in sorted(base, key=lambda item: dot_natural_key(checkpoint_key(item[0]))):
        with recorder.in_layer(layer_of.get(id(p), -1)):
            if id(p) in kbit_numel:
                _quantize(recorder, p, kbit_numel[id(p)], plan, first)
                first = False
            else:
                size = p.numel() * load_size
                loaded.append((p, recorder.alloc_bytes(size), size))
    if plan.is_kbit and not skips_kbit_upcast(plan):  # prepare_model_for_kbit_training
        upcast = []
        for p, handle, size in loaded:
            if _nbytes(p) != size:
                with recorder.in_layer(layer_of.get(id(p), -1)):
                    new = recorder.alloc_bytes(_nbytes(p))
                    recorder.free_handle(handle)
                handle, size = new, _nbytes(p)
            upcast.append((p, handle, size))
        loaded = upcast
        recorder.empty_cache()
    for p, handle, size in loaded:
        recorder.bind(p, handle, size, layer_of.get(id(p), -1))
    for _, p in adapters:
        with recorder.in_layer(layer_of.get(id(p), -1)):
            recorder.bind(p, recorder.alloc_bytes(_nbytes(p)), _nbytes(p), recorder.layer)
    recorder.empty_cache()
