"""A serving run's allocations, recorded on fake tensors: adapters by mode, then ``generate``.

``trace_serving`` does what the harness's serving worker does (``harness/serve_step.py``),
with the real transformers and peft code on ``FakeTensorMode`` tensors (no memory, no
compute), under the step tracer's recorder: every new storage an ALLOC, its death a FREE
(``trace/events.py``):

1. the base model as ``from_pretrained`` leaves it: the plan's dtype, k-bit linears as
   bitsandbytes stores them (``gpu_paths.ServeInt8Linear`` / ``Serve4bitLinear``, a 4-bit
   weight with what ``Params4bit`` keeps on it: ``serving/fourbit.py``), eval mode; its
   loading is laid out by ``memory/loading.from_pretrained_events`` (the parameters are
   stand-ins, freed with their loading handles, a k-bit weight's data and quantization
   state, when merging replaces them);
2. the adapters with peft (``get_peft_model``, then ``add_adapter``; random A and B,
   ``init_lora_weights=False``): peft builds each adapter on the host and copies it to the
   base layer's device and dtype (``_move_adapter_to_device_of_base_layer``): only that copy
   is a GPU allocation, then the fp32 upcast (``autocast_adapter_dtype``) and DoRA's
   magnitude; ``merged``: ``merge_and_unload`` of the first (onto a k-bit weight:
   dequantized, the delta added, quantized again, ``fourbit.four_bit_paths``,
   ``eightbit.eight_bit_paths``); else
   ``set_adapter``;
3. the prompt (``input_ids`` and ``attention_mask`` on the device), then ``rounds`` rounds
   of a prefill-only ``generate`` (``max_new_tokens=1``) and a full one, greedy, with the
   plan's cache (and ``adapter_names=`` in ``multi`` mode); a round's outputs live as the
   harness keeps them (the warm-up rounds' not at all, a timed round's full output until
   the next one returns).

A full ``generate`` of more than ``traced_steps`` new tokens stops after that many loop
steps (the stop check decides by length; nothing else in a step depends on the number of
new tokens): ``serving/servesim.py`` repeats the last step for the rest, its sizes growing
as the traced steps grow. Markers: ``adapters``, ``merge``, ``inputs``, per generate ``g{j}``
(``j`` counts generates), ``g{j}.s{k}`` at each loop test (before step ``k``; the last one
ends the loop), and ``end``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vramcalc.adapters import serving_lora_config
from vramcalc.memory.layers import NO_SDPA
from vramcalc.serve_plan import ServePlan
from vramcalc.trace.fakemodel import frozen_heap, layered_config, to_fake
from vramcalc.trace.int8 import outlier_rule
from vramcalc.trace.steptrace import StepRecorder, decoder_layers

#: loop steps traced per full generate (the first takes the prefill's token); more repeat
#: the last one
TRACED_STEPS = 5
#: generate rounds of the harness: one untimed, three timed
WARMUP_ROUNDS, TIMED_ROUNDS = 1, 3
#: a plan's dtype as torch names it
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class GenerateSpan:
    """Where one ``generate`` is in the traced events."""

    marker: str  # g{j}
    new_tokens: int  # what it was asked for
    traced_steps: int  # loop steps traced (<= new_tokens)
    output_handle: int  # the returned ids' ALLOC handle


@dataclass(frozen=True)
class ServeTrace:
    """What the recorder saw of a serving run (loading is laid out apart, by rule)."""

    events: tuple[tuple[int, int, int], ...]
    tags: tuple[int, ...]  # per event: its decoder layer, -1 for none
    markers: tuple[tuple[str, int], ...]
    labels: tuple[str, ...]  # per event: what an ALLOC holds ("adapters", "inputs", "")
    generates: tuple[GenerateSpan, ...]
    params: tuple[tuple[str, tuple[int, ...], str, bool, bool], ...]  # the base as loaded
    loaded: dict[int, str]  # stand-in handle -> parameter name
    num_layers: int  # decoder layers traced
    param_layers: tuple[int, ...]  # per parameter: its decoder layer, -1 for none
    workspaces: tuple[int, ...] = ()  # the cuBLAS workspace's ALLOC handle (one thread)

    @property
    def param_index(self) -> dict[str, int]:
        return {p[0]: i for i, p in enumerate(self.params)}


class ServeRecorder(StepRecorder):
    """The step tracer's recorder, with host-side work left out (``paused``), loaded
    parameters freed by their loading handles, and ``generate``'s reads of values
    answered (``gpu_paths`` module docstring)."""

    def __init__(self) -> None:
        super().__init__(None, (0, 0, 0, 0))  # type: ignore[arg-type]
        self.paused = False
        self.inherit = False
        self.module_layers: dict[int, int] = {}  # id of a base module -> its decoder layer
        self.label = ""
        self.labels: list[str] = []
        self.reads = 0

    def loaded(self, tensor: Any, layer: int) -> int:
        """A parameter ``from_pretrained`` made: a stand-in ALLOC of 0 bytes in ``layer``
        (``servesim`` puts the loading handle in its place), and its death a FREE of it."""
        handle = self._alloc(0, layer)
        storage = tensor.untyped_storage()
        key = storage._cdata
        self._handles[key] = (handle, layer)

        def freed(key: int = key) -> None:
            self._handles.pop(key, None)
            self._free(handle, 0, layer)

        weakref.finalize(storage, freed)
        return handle

    def _output_tags(self, args: Any, outputs: list[Any]) -> list[int]:
        """In a forward, every output belongs to the decoder layer running (-1: none); while
        the adapters are made and merged (``inherit``), to the layer of what it is made
        from."""
        if self.layer >= 0 or not self.inherit:
            return [self.layer] * len(outputs)
        return super()._output_tags(args, outputs)

    def _alloc(self, nbytes: int, tag: int = -1, shape: Any = None) -> int:
        handle = super()._alloc(nbytes, tag, shape)
        self.labels.append(self.label)
        return handle

    def _free(self, handle: int, nbytes: int, tag: int) -> None:
        super()._free(handle, nbytes, tag)
        self.labels.append("")

    def dispatch(self, func: Any, args: Any, kwargs: Any) -> Any:
        import torch

        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1  # padding / special-token checks: none found
            return False if args[0].dtype == torch.bool else 0
        if self.paused:
            return func(*args, **kwargs)
        return super().dispatch(func, args, kwargs)


@contextlib.contextmanager
def _host_built_adapters(recorder: ServeRecorder) -> Iterator[None]:
    """peft builds each adapter on the host (``update_layer``), then copies it to the base
    layer's device (``_move_adapter_to_device_of_base_layer``): record only the copies."""
    from peft.tuners.lora import LoraLayer

    update, move = LoraLayer.update_layer, LoraLayer._move_adapter_to_device_of_base_layer

    def update_layer(self, adapter_name, *args, **kwargs):  # type: ignore[no-untyped-def]
        recorder.paused = True
        try:
            return update(self, adapter_name, *args, **kwargs)
        finally:
            recorder.paused = False

    def move_adapter(self, adapter_name, device=None):  # type: ignore[no-untyped-def]
        move(self, adapter_name, device)
        recorder.paused = False
        for name in (*self.adapter_layer_names, *self.other_param_names):
            holder = getattr(self, name, None)
            if isinstance(holder, dict) or not hasattr(holder, "keys"):
                continue
            if adapter_name in holder:
                item = holder[adapter_name]
                layer = recorder.module_layers.get(id(self.get_base_layer()), -1)
                for tensor in item.parameters() if hasattr(item, "parameters") else [item]:
                    recorder.track(tensor, layer)

    LoraLayer.update_layer = update_layer  # type: ignore[method-assign]
    LoraLayer._move_adapter_to_device_of_base_layer = move_adapter  # type: ignore[method-assign]
    try:
        yield
    finally:
        LoraLayer.update_layer = update  # type: ignore[method-assign]
        LoraLayer._move_adapter_to_device_of_base_layer = move  # type: ignore[method-assign]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _modules_converted_in_place() -> Iterator[None]:
    """``Module.to`` / ``.float()`` as on CUDA tensors: each converted parameter keeps its
    object and takes the new storage (``param.data = converted``); torch swaps fake
    parameters instead, which the fake mode's own references forbid."""
    import torch

    original = torch.nn.Module._apply

    def apply(module, fn, recurse=True):  # type: ignore[no-untyped-def]
        if recurse:
            for child in module.children():
                apply(child, fn)
        with torch.no_grad():
            for param in module._parameters.values():
                if param is not None:
                    converted = fn(param)
                    if converted is not param:
                        param.data = converted
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = fn(buf)
        return module

    torch.nn.Module._apply = apply  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module._apply = original  # type: ignore[method-assign]


def build_base(config_dict: dict[str, Any], plan: ServePlan, num_layers: int | None = None) -> Any:
    """The base model on the meta device as ``from_pretrained`` leaves it for ``plan``."""
    import torch
    from transformers import AutoModelForCausalLM

    # gpu_paths imports torch and bitsandbytes at its top
    from vramcalc.serving import gpu_paths

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    config = layered_config(config_dict, num_layers)
    attn = "eager" if plan.attn == "eager" or config.model_type in NO_SDPA else "sdpa"
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, DTYPES[plan.dtype]), attn_implementation=attn
        )
    model.tie_weights()
    if plan.is_kbit:
        from transformers.quantizers.base import get_keys_to_not_convert

        skip = set(get_keys_to_not_convert(model))
        for name, module in list(model.named_modules()):
            if type(module) is not torch.nn.Linear or any(
                name == k or name.endswith("." + k) for k in skip
            ):
                continue
            bias = module.bias is not None
            if plan.quant == "int8":
                new = gpu_paths.int8_linear_class()(module.in_features, module.out_features, bias)
                new.outlier_rule = outlier_rule(config, name, module.in_features)
            else:
                new = gpu_paths.four_bit_linear_class()(
                    module.in_features,
                    module.out_features,
                    bias,
                    plan.quant,
                    plan.double_quant,
                    getattr(torch, DTYPES[plan.dtype]),
                )
            new.weight._vramcalc_kbit = True  # type: ignore[attr-defined]
            if bias:
                new.bias = module.bias
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
        model.is_loaded_in_4bit = plan.quant != "int8"
        model.is_loaded_in_8bit = plan.quant == "int8"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def loaded_params(model: Any) -> list[tuple[str, tuple[int, ...], str, bool, bool]]:
    """(name, shape, dtype, trainable, k-bit) of each parameter as the checkpoint holds it
    (a k-bit weight by its 16-bit shape): what ``from_pretrained_events`` lays out."""
    out = []
    for name, p in model.named_parameters():
        kbit = bool(getattr(p, "_vramcalc_kbit", False))
        module = model.get_submodule(name.rpartition(".")[0])
        shape = (module.out_features, module.in_features) if kbit else tuple(p.shape)
        out.append((name, tuple(int(d) for d in shape), str(p.dtype).removeprefix("torch."),
                    False, kbit))  # fmt: skip
    return out


@frozen_heap()
def trace_serving(
    config_dict: dict[str, Any],
    plan: ServePlan,
    rounds: tuple[int, int] = (WARMUP_ROUNDS, TIMED_ROUNDS),
    traced_steps: int = TRACED_STEPS,
    num_layers: int | None = None,
) -> ServeTrace:
    """Record the adapters and the generate rounds of one model copy of ``plan`` (its
    first adapter and share of the batch, ``ServePlan.one_copy``) with
    ``num_layers`` decoder layers (module docstring): ``rounds`` (warm-up, timed; the
    simulation traces two timed rounds and ``servesim`` repeats the second), each full
    generate's first ``traced_steps`` loop steps."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vramcalc.serving.eightbit import eight_bit_paths  # imports torch
    from vramcalc.serving.fourbit import FOUR_BIT_QUANTS, four_bit_paths
    from vramcalc.serving.gpu_paths import (  # imports torch and bitsandbytes
        StopAt,
        generate_on_fake_tensors,
        host_built_caches,
        inference_code_paths,
    )

    if plan.adapters:  # a first import makes small tensors: not under the recorder
        import peft.tuners.lora  # noqa: F401
    model = build_base(config_dict, plan, num_layers)
    params = loaded_params(model)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    named = to_fake(model, mode)
    recorder = ServeRecorder()
    layers = decoder_layers(model)
    layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    loaded: dict[int, str] = {}
    for name, p in named:  # a k-bit weight stands for its data and quantization state
        loaded[recorder.loaded(p, layer_of.get(id(p), -1))] = name
    param_layers = tuple(layer_of.get(id(p), -1) for _, p in named)
    del named, p  # a parameter a merge replaces dies with its last reference
    recorder.known(model.buffers())
    recorder.module_layers = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    recorder.mark("loaded")
    _tag_layers(model, layers, recorder)
    stop = StopAt()
    spans: list[GenerateSpan] = []
    state = {"generate": -1, "step": 0}

    def on_step() -> None:
        state["step"] += 1
        recorder.mark(f"g{state['generate']}.s{state['step']}")

    batch, prompt, new = plan.copy_batch, plan.prompt_tokens, plan.new_tokens
    with (
        mode,
        _quiet(),
        inference_code_paths(),
        generate_on_fake_tensors(stop, on_step),
        host_built_caches(recorder),
        four_bit_paths() if plan.quant in FOUR_BIT_QUANTS else contextlib.nullcontext(),
        eight_bit_paths() if plan.quant == "int8" else contextlib.nullcontext(),
        recorder.mode,
    ):
        serving, kwargs = _apply_adapters(model, plan, recorder, batch)
        recorder.mark("inputs")
        recorder.label = "inputs"
        ids = torch.zeros((batch, prompt), dtype=torch.long)
        mask = torch.ones_like(ids)
        recorder.label = ""
        common = {
            **kwargs,
            "input_ids": ids,
            "attention_mask": mask,
            "do_sample": False,
            "pad_token_id": _pad(serving),
            "cache_implementation": "static" if plan.cache == "static" else None,
        }

        def generate(tokens: int, steps: int) -> Any:
            state["generate"] += 1
            state["step"] = 0
            marker = f"g{state['generate']}"
            recorder.mark(marker)
            stop.length = prompt + steps
            out = serving.generate(**common, max_new_tokens=tokens, min_new_tokens=tokens)
            handle = recorder._handles[out.untyped_storage()._cdata][0]
            spans.append(GenerateSpan(marker, tokens, steps, handle))
            return out

        kept = None
        warmup, timed = rounds
        for r in range(warmup + timed):
            recorder.mark(f"round{r}")
            generate(1, 1)
            out = generate(new, min(new, traced_steps))
            if r >= warmup:
                kept = out  # the harness keeps the last full output until the next returns
            del out
        recorder.mark("after")
        del kept
        recorder.mark("end")
    return ServeTrace(
        tuple(recorder.events),
        tuple(recorder.tags),
        tuple(recorder.markers),
        tuple(recorder.labels),
        tuple(spans),
        tuple(params),
        loaded,
        len(layers),
        param_layers,
        tuple(recorder.workspace_handles),
    )


def _tag_layers(model: Any, layers: list[Any], recorder: ServeRecorder) -> None:
    """Hooks that tell the recorder which decoder layer runs: from a layer's start until the
    next one's (the final norm and head count as the last layer's), none outside the
    model's forward."""

    def outside(*_: Any) -> None:
        recorder.layer = -1

    model.register_forward_pre_hook(outside)
    model.register_forward_hook(outside)
    for index, layer in enumerate(layers):

        def enter(*_: Any, index: int = index) -> None:
            recorder.layer = index

        layer.register_forward_pre_hook(enter)


def _pad(model: Any) -> int:
    pad = model.generation_config.pad_token_id
    return 0 if pad is None else int(pad)


def _apply_adapters(
    model: Any, plan: ServePlan, recorder: ServeRecorder, batch: int
) -> tuple[Any, dict[str, Any]]:
    """peft's adapters by mode, as the harness applies them (module docstring)."""
    if not plan.adapters:
        return model, {}
    from peft import get_peft_model

    adapters = plan.adapters[:1] if plan.mode == "merged" else plan.adapters
    model_type = model.config.model_type
    recorder.mark("adapters")
    recorder.label = "adapters"
    recorder.inherit = True
    with _host_built_adapters(recorder), _modules_converted_in_place(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            model, serving_lora_config(adapters[0], model_type), adapters[0].name
        )
        for adapter in adapters[1:]:
            peft_model.add_adapter(adapter.name, serving_lora_config(adapter, model_type))
    recorder.label = ""
    peft_model.eval()
    if plan.mode == "merged":
        recorder.mark("merge")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = peft_model.merge_and_unload()
        recorder.inherit = False
        return merged, {}
    recorder.inherit = False
    peft_model.set_adapter(adapters[0].name)
    if plan.mode != "multi":
        return peft_model, {}
    names = [a.name for a in adapters]
    return peft_model, {"adapter_names": [names[i % len(names)] for i in range(batch)]}
