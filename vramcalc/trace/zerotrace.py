"""Rank 0 of a DeepSpeed ZeRO world: ``deepspeed.initialize`` and Trainer's steps, on fake tensors.

What runs is DeepSpeed's own code (``DeepSpeedEngine``; ZeRO-1/2: ``DeepSpeedZeroOptimizer``,
``runtime/zero/stage_1_and_2.py``; ZeRO-3: ``DeepSpeedZeroOptimizer_Stage3``, ``zero.Init``'s
partitioned parameters and the parameter coordinator) with the JSON the harness writes
(``configs/sharding.py::deepspeed_json``, the one the harness writes), on the fake
accelerator of ``trace/zerofake.py``, as HF Trainer drives it through accelerate:

0. ZeRO-3 with 16-bit weights only, the load (``load_zero3``): transformers builds the
   model inside ``zero.Init`` (each module's weights made on the GPU and partitioned at
   once), loads the checkpoint module by module into gathered weights, and peft adds its
   fp32 adapters whole on the GPU (ZeRO-1/2, and ZeRO-3 with 4-bit weights, load with a
   ``device_map``, ``trace/worldload.py``: ``loads_in_zero_init``);
1. Trainer builds its optimizer on the trainable parameters (``deepspeed_init`` ->
   ``create_optimizer``: torch's AdamW, ``steptrace.trainer_optimizer``, on two parameter
   groups, with and without weight decay: ``trainer_param_groups``; ZeRO flattens each group
   apart, an ``empty_cache`` before each) and accelerate's
   ``_prepare_deepspeed`` hands model and optimizer to ``deepspeed.initialize``. ZeRO-1/2:
   the engine casts every floating parameter to the 16-bit dtype (peft's fp32 adapters too),
   and ZeRO flattens the trainable ones into one aligned bf16 buffer, keeps an fp32 master
   copy of rank 0's partition and points the optimizer at it. ZeRO-3: no cast (the model
   is zero.Init's), the adapters are partitioned, rank 0's partitions flattened;
2. per micro-batch: the forward with no autocast (accelerate turns ``native_amp`` off under
   DeepSpeed), ``engine.backward(loss)`` (ZeRO's gradient hooks fill its reduce buckets and
   keep rank 0's partition; ZeRO-3 gathers each module's weights around its forward and
   backward, prefetching from the second step, its linears through ``zero.Init``'s
   ``F.linear``: ``memory_efficient_linear``), ``set_gradient_accumulation_boundary`` as
   accelerate's ``DeepSpeedEngineWrapper`` sets it, ``engine.step()`` after the last one
   (ZeRO's own clipping at ``gradient_clipping`` 1.0, the optimizer on the fp32 partition,
   the 16-bit partition updated), Trainer's ``model.zero_grad()`` and the harness's
   synchronize at each step end.

A ZeRO trace is not unrolled over layers (``trace/worldunroll.py``): ZeRO's flat buffers,
partitions and bucket boundaries follow from the sizes of all the trainable parameters
together, so every decoder layer is traced; two steps are traced and the second repeated
(``worldrepeat.repeat_world_step``; ZeRO-3 records its module order in the first step and
prefetches from the second on: the third step is the second's, event for event). Executing
fewer layers than the model has (``config.num_hidden_layers`` cut after ``initialize``) keeps
the load, the wrap and the optimizer step event for event, and the interior layers alike,
but under ZeRO-3 not the ends: what a module releases is decided by looking
``stage3_max_reuse_distance`` (10^9 elements) ahead in the recorded module order, about 8
layers of Llama-3.2-1B each way, so the first and last layers' gathers and releases depend
on how many layers there are (Llama-3.2-1B LoRA, 2,048 x 4, 2 GPUs, 10 of 16 layers run: the
second step's forward differs from the full trace's in layers 1-4 and the last two); and
the reduce buckets flush where the gradients of the layers above fill them, in the middle of
a layer. The cost
(one process on a 2-core machine, LoRA at 2,048 tokens, 3 steps, trace and replay,
reports/world_memory.csv ``trace_seconds``): Llama-3.1-8B on 2 GPUs about 5-6 s under
ZeRO-2 and 13-15 s under ZeRO-3, 22 s for QLoRA under ZeRO-3; Llama-3.2-1B LoRA with
ZeRO-Offload 4 s (ZeRO-2) and 10-11 s (ZeRO-3).

ZeRO-Offload (``cpu_offload``: ``offload_optimizer`` and, under ZeRO-3, ``offload_param``,
device ``cpu``, pinned) is traced with host and GPU told apart by device
(``WorldRecorder.split_devices``): the model, the inputs and the fake accelerator's device
names are ``cpu:0`` (``zerofake.py``), and what DeepSpeed itself puts on ``"cpu"`` is host
memory, not recorded. So DeepSpeed's code decides what leaves the GPU: ZeRO-1/2 keep the
flat bf16 buffer, the reduce bucket and a bf16 gradient staging buffer of the largest
parameter (``temp_grad_buffer_for_gpu_offload``) on the GPU, and make the fp32 master
partition, its gradient and the pinned bf16 copy on the host (``self.device = 'cpu'``,
``stage_1_and_2.py`` 278, 559-575, 646-661); Trainer's AdamW then steps on host tensors, its
states made there too (``zeros_like``). ZeRO-3's ``zero.Init`` partitions onto its
``remote_device`` ``cpu`` (``partition_parameters.py`` 1161-1169, 1820-1843; persistent
parameters stay on the GPU) and each gather copies rank 0's partition to the GPU first
(``ds_tensor.to(current_device_name())``: 1359-1360 for a bucket, 1396 for one parameter) on
the all-gather stream; its optimizer's fp32 partitions and gradients are the host's.

k-bit weights under ZeRO-3 (QLoRA: the harness stores 4-bit ones as bf16,
``bnb_4bit_quant_storage``; int8 LoRA; both skip ``prepare_model_for_kbit_training``):
transformers loads a quantized model without ``zero.Init`` and bitsandbytes' quantizer gives it
the GPU as ``device_map`` (``loads_in_zero_init``), so the whole model, quantization state
included, is on the GPU after the load; ``deepspeed.initialize`` then partitions every
parameter, the quantized weights among them (``parameter_offload.py`` 258-279), while the
quantization state, not a parameter, stays whole; its ``Init(module=...)`` replaces
``F.linear`` with DeepSpeed's memory-efficient one from then on (``memory_efficient_linear``:
the bf16 head's forward and backward, the adapters'). bitsandbytes' ``MatMul4Bit`` keeps
``B.view(-1, 1)`` of the gathered weight on its context for backward
(``autograd/_functions.py`` 321, 358): when ZeRO-3 releases the weight (``param.data``
swapped for an empty tensor, ``partition_parameters.py`` 329) the view keeps the gathered
storage until that linear's backward. An int8 weight is the other way round: its int8
partition is made, but ``Int8Params.CB`` keeps the whole weight as loaded, and
``Linear8bitLt.forward`` computes with it and then points ``weight.data`` at it, dropping the
weight ZeRO-3 gathered as soon as its forward is done (``trace/worldlayers.py``; an H100's
allocator trace with Python stacks shows both, ``data/measurements/probe_zeroint8_2026-12-07``).
With no autocast, peft's ``lora.bnb`` forward reads ``lora_A.weight`` before calling the
adapter, which ZeRO-3 answers with a gather of it at once (``emulation.bnb_lora_forward``).
Transformers initializes under a gather only the weights a checkpoint lacks
(``_initialize_missing_keys``): none here.

Sources: DeepSpeed 0.19.8 ``runtime/engine.py``, ``runtime/zero/stage_1_and_2.py``,
``stage3.py``, ``partition_parameters.py``; accelerate 1.15 ``accelerator.py::
_prepare_deepspeed``, ``utils/deepspeed.py``; transformers 5.17 ``integrations/deepspeed.py``
(``deepspeed_init``, ``_load_state_dict_into_zero3_model``), ``modeling_utils.py``,
``trainer.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from vramcalc.configs.sharding import ZERO_STAGE, deepspeed_json
from vramcalc.trace.steptrace import backward, tag_layers, torch_optimizer, trainer_optimizer
from vramcalc.trace.worldrecorder import FAKE_GPU, WorldRecorder
from vramcalc.trace.zerofake import import_deepspeed
from vramcalc.trace.zerofast import faster_bookkeeping
from vramcalc.training_plan import TrainingPlan

#: the names Trainer keeps out of weight decay (transformers 5.17 ``trainer.py::
#: Trainer.get_decay_parameter_names``; with ``nn.LayerNorm`` modules)
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def trainer_param_groups(model: Any) -> list[dict[str, Any]]:
    """The parameter groups of Trainer's ``create_optimizer`` (transformers 5.17
    ``trainer.py``): the trainable parameters with weight decay, then those without (biases,
    norms), in ``named_parameters`` order. DeepSpeed keeps one flat buffer, fp32 partition
    and ``empty_cache`` per group (``stage_1_and_2.py`` 423-449; the engine drops an empty
    group, ``engine.py`` 2348): a full fine-tuning's norms are a second group, flattened
    after the first group's parameters have been freed."""
    from torch import nn
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [nn.LayerNorm], NO_DECAY_PATTERNS))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": 0.0},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


def initialize(model: Any, plan: TrainingPlan) -> Any:
    """``deepspeed.initialize`` as accelerate calls it, with Trainer's optimizer (its two
    parameter groups, ``trainer_param_groups``); the engine."""
    deepspeed = import_deepspeed()
    groups = trainer_param_groups(model)
    optimizer = torch_optimizer(groups, plan) or trainer_optimizer(
        [p for group in groups for p in group["params"]], plan
    )
    config = deepspeed_json(plan, int(model.config.hidden_size))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def loads_in_zero_init(plan: TrainingPlan) -> bool:
    """Whether transformers builds the model inside ``zero.Init``: ZeRO-3 with 16-bit weights.
    A quantized model is not (``modeling_utils.py`` 1440: ``is_deepspeed_zero3_enabled() and
    not _is_quantized``): bitsandbytes' quantizer gives it the GPU as its ``device_map``
    (``quantizer_bnb_4bit.py`` 102-105), a load as ZeRO-1/2's (``worldload.py``), and
    ``deepspeed.initialize`` partitions the loaded parameters (``parameter_offload.py``
    258-279: ``Init(module=...)``, which also replaces ``F.linear``:
    ``memory_efficient_linear``)."""
    return plan.strategy == "zero3" and not plan.is_kbit


def load_zero3(model: Any, plan: TrainingPlan, recorder: WorldRecorder) -> None:
    """Rank 0's load under ZeRO-3 (transformers' ``from_pretrained`` inside
    ``deepspeed.zero.Init``): each module's parameters made on the GPU as it is built and
    partitioned at once (children before their parent), then, module by module, gathered
    whole to load the checkpoint into and partitioned again
    (``_load_state_dict_into_zero3_model``: ``GatheredParameters(modifier_rank=0)``);
    buffers on the GPU; peft's adapters made whole on the GPU afterwards (partitioned by
    ``deepspeed.initialize``). The model arrives with every storage on the host."""
    import torch

    deepspeed = import_deepspeed()
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    config = deepspeed_json(plan, int(model.config.hidden_size))
    init = deepspeed.zero.Init(config_dict_or_path=config)  # not entered: nothing patched
    adapters = {id(p) for n, p in model.named_parameters() if "lora_" in n}

    def build(module: Any) -> None:
        for child in module.children():
            build(child)
        params = [
            p
            for p in module.parameters(recurse=False)
            if id(p) not in adapters and not is_zero_param(p)
        ]
        if params:
            with recorder.in_layer(recorder.layer_of(module)), recorder.scope("device"):
                for param in params:
                    param.data = param.detach().clone()  # made on the GPU
                init._convert_to_zero_parameters(params)

    def load(module: Any) -> None:
        params = [p for p in module.parameters(recurse=False) if id(p) not in adapters]
        if params:
            with (
                recorder.in_layer(recorder.layer_of(module)),
                deepspeed.zero.GatheredParameters(params, modifier_rank=0),
            ):
                pass  # module._load_from_state_dict: a copy into the gathered weights
        for child in module.children():
            load(child)

    with torch.no_grad():
        build(model)
        with recorder.scope("device"):
            for buffer in model.buffers():
                buffer.data = buffer.detach().clone()
        load(model)
        with recorder.scope("device"):
            for param in model.parameters():
                if id(param) in adapters:
                    param.data = param.detach().clone()


def zero_steps(model: Any, plan: TrainingPlan, recorder: WorldRecorder, steps: int) -> str:
    """The wrap and ``steps`` Trainer steps of a ZeRO plan (module docstring), recorded on
    ``recorder`` inside the fake world; returns the wrapper's description."""
    with (
        memory_efficient_linear(plan) if plan.strategy == "zero3" else contextlib.nullcontext(),
        faster_bookkeeping(),
    ):
        return _zero_steps(model, plan, recorder, steps)


@contextlib.contextmanager
def memory_efficient_linear(plan: TrainingPlan) -> Iterator[None]:
    """``torch.nn.functional.linear`` as ZeRO-3 leaves it: ``zero.Init``'s ``__enter__``
    (transformers loads a 16-bit model inside it) replaces it with DeepSpeed's
    ``zero3_linear_wrap`` (``memory_efficient_linear``, on by default, ``zero/config.py``
    346) and never puts it back (``partition_parameters.py`` 412-419, 603-604: "This will
    persist unless manually reset"); a quantized model, loaded outside ``zero.Init``, gets
    it from ``deepspeed.initialize``, whose ``Init(module=...)`` replaces it the same way
    (1090-1091): DeepSpeed's own code does it in the trace, from the wrap on. Its
    ``LinearFunctionForZeroStage3`` (``zero/linear.py``) saves the weight parameter itself
    for backward, not aten ``linear``'s ``weight.t()`` view: once ZeRO-3 releases a gathered
    weight (``param.data`` swapped for an empty tensor), nothing holds its storage, and
    backward works on the weight gathered again.
    Put back after the trace (this process goes on)."""
    import unittest.mock

    import torch
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    linear = zero3_linear_wrap if loads_in_zero_init(plan) else torch.nn.functional.linear
    with unittest.mock.patch.object(torch.nn.functional, "linear", linear):
        yield


def _zero_steps(model: Any, plan: TrainingPlan, recorder: WorldRecorder, steps: int) -> str:
    import torch

    if loads_in_zero_init(plan):
        load_zero3(model, plan, recorder)
        recorder.empty_cache()  # Trainer's accelerator.free_memory() before its loop
    recorder.mark("wrap")
    engine = initialize(model, plan)
    nodes = tag_layers(engine.module, recorder)
    engine.register_forward_pre_hook(lambda module, args: setattr(recorder, "layer", -1))
    vocab = int(model.config.vocab_size)
    device = FAKE_GPU if recorder.split_devices else None  # Trainer puts inputs on the GPU
    for step in range(steps):
        recorder.mark(f"step{step}")
        for micro in range(plan.grad_accum):
            last = micro == plan.grad_accum - 1
            ids = torch.randint(0, vocab, (plan.batch_size, plan.seq_len), device=device)
            labels = ids.clone()
            loss = engine(input_ids=ids, labels=labels).loss
            del ids, labels
            if plan.grad_accum > 1:
                loss = loss / plan.grad_accum
            engine.set_gradient_accumulation_boundary(is_boundary=last)
            backward(
                recorder,
                loss,
                nodes,
                f"step{step}_backward{micro}",
                lambda loss: engine.backward(loss, scale_wrt_gas=False),
            )
            del loss
            if last:
                recorder.mark(f"step{step}_optimizer")
                engine.step()
        engine.zero_grad()
        recorder.sync()  # the harness synchronizes at every step end (on_step_end)
    recorder.mark("end")
    recorder.stopped = True  # what is freed after the last step cannot raise a peak
    engine.destroy()
    return f"DeepSpeed ZeRO-{ZERO_STAGE[plan.strategy]} (DeepSpeedEngine, the harness's config)"
