"""Loading of one rank of a fake world, as events bound to the traced model's parameters.

What the harness's ``build_model`` does on rank 0 (``harness/build.py``), laid out as
``memory/slack.py::load_events`` lays out the single-GPU load, with what differs:

* FSDP without k-bit weights: accelerate's ``cpu_ram_efficient_loading`` (with
  ``sync_module_states``): rank 0 loads on the CPU (no ``device_map``), peft's
  adapters too; nothing is on the GPU before FSDP moves each unit there
  (traced, ``memory/fsdpfake.py``). Every storage is host memory here.
* Otherwise a ``device_map`` load onto the GPU: transformers'
  ``caching_allocator_warmup`` (one tensor of the loaded size, freed), parameters in
  checkpoint-key order, k-bit weights staged in the load dtype and quantized
  (4-bit: packed data, absmax, code; double quantization: uint8 absmax, nested
  absmax, map copy, offset), adapters in fp32, then ``empty_cache`` (Trainer's
  ``accelerator.free_memory()`` at the start of its training loop).
* FSDP with k-bit weights skips ``prepare_model_for_kbit_training`` (no fp32 copies
  of the other parameters); the quantization state is never a parameter, so it stays
  whole on every GPU. DDP with k-bit weights prepares as on one GPU.

Each parameter's storage is bound to the allocation that made it, so that when FSDP
flattens a unit and the original storage dies, its free is the load's handle.
"""

from __future__ import annotations

from typing import Any

from vramcalc.memory.slack import LOAD_ITEMSIZE, _checkpoint_key
from vramcalc.memory.weights import DYNAMIC_MAP_ENTRIES, NESTED_BLOCKSIZE, NF4_BLOCKSIZE
from vramcalc.memory.worldrecorder import WorldRecorder
from vramcalc.plan import TrainingPlan

SHARDED = ("fsdp", "fsdp-grad-op")


def loads_on_gpu(plan: TrainingPlan) -> bool:
    """Whether rank 0 loads onto the GPU (``device_map``) or on the CPU (FSDP, 16-bit)."""
    return not (plan.strategy in SHARDED and not plan.is_kbit)


def _nbytes(tensor: Any) -> int:
    return int(tensor.numel() * tensor.element_size())


def _quantize(
    recorder: WorldRecorder, param: Any, numel: int, plan: TrainingPlan
) -> None:
    """Allocate one quantized weight (``param``, bound) and its state; staging freed."""
    staging = recorder.alloc_bytes(numel * LOAD_ITEMSIZE[plan.dtype])
    if plan.quant == "int8":
        fp16 = recorder.alloc_bytes(2 * numel)
        recorder.bind(param, recorder.alloc_bytes(numel), numel)  # CB, int8
        rows = int(param.shape[0]) if param.dim() == 2 else 1
        recorder.alloc_bytes(4 * rows)  # SCB, fp32 per output row
        recorder.free_handle(fp16)
    else:
        blocks = -(-numel // NF4_BLOCKSIZE)
        packed = _nbytes(param)
        recorder.bind(param, recorder.alloc_bytes(packed), packed)
        absmax = recorder.alloc_bytes(4 * blocks)
        recorder.alloc_bytes(16 * 4)  # the 4-bit code
        if plan.double_quant:
            recorder.alloc_bytes(blocks)  # absmax quantized to uint8
            recorder.alloc_bytes(4 * -(-blocks // NESTED_BLOCKSIZE))  # second-level absmax
            recorder.alloc_bytes(4 * DYNAMIC_MAP_ENTRIES)  # dynamic map copy
            recorder.alloc_bytes(4)  # offset
            recorder.free_handle(absmax)
    recorder.free_handle(staging)


def load_world(
    recorder: WorldRecorder, model: Any, named: list[tuple[str, Any]], plan: TrainingPlan
) -> None:
    """Rank 0's loading, k-bit preparation and adapters on ``recorder`` (module docstring)."""
    from vramcalc.memory.emulation import Emulated4bit, Emulated8bit

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
    load_size = LOAD_ITEMSIZE[plan.dtype]
    warmup = 0
    for _, p in base:
        if id(p) in kbit_numel:
            warmup += int(kbit_numel[id(p)] * (1 if plan.quant == "int8" else 0.5))
        else:
            warmup += p.numel() * load_size
    recorder.free_handle(recorder.alloc_bytes(warmup // 2 * 2))
    loaded: list[tuple[Any, int, int]] = []  # (param, handle, bytes as loaded)
    for _, p in sorted(base, key=lambda item: _checkpoint_key(item[0])):
        if id(p) in kbit_numel:
            _quantize(recorder, p, kbit_numel[id(p)], plan)
        else:
            size = p.numel() * load_size
            loaded.append((p, recorder.alloc_bytes(size), size))
    if plan.is_kbit and plan.strategy not in SHARDED:  # prepare_model_for_kbit_training
        upcast = []
        for p, handle, size in loaded:
            if _nbytes(p) != size:
                new = recorder.alloc_bytes(_nbytes(p))
                recorder.free_handle(handle)
                handle, size = new, _nbytes(p)
            upcast.append((p, handle, size))
        loaded = upcast
        recorder.empty_cache()
    for p, handle, size in loaded:
        recorder.bind(p, handle, size)
    for _, p in adapters:
        recorder.bind(p, recorder.alloc_bytes(_nbytes(p)), _nbytes(p))
    recorder.empty_cache()
