"""Trace one training step of a recipe on fake tensors into ``oprecorder`` events.

``trace_events`` builds the recipe's model (``memory.fakemodel.build_model``) with two
decoder layers, swaps in the GPU code paths (``memory.emulation``; bitsandbytes layers and
FlashAttention from ``kbit_ops``), and runs what HF Trainer runs (``_micro_batch``: forward
under bf16 autocast, the loss with ``num_items_in_batch``, backward, the ``isnan``/``isinf``
read of the loss; ``_optimizer_step``: accelerate's foreach clipping and the optimizer, after
one unrecorded step that creates its states). Decoder-layer hooks tag each op with its layer
and phase; during the optimizer step an op over every parameter is split by layer.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from vramcalc.catalog import config_from_dict
from vramcalc.errors import VramcalcError
from vramcalc.memory.optimizer import bnb_state_tensors
from vramcalc.trace.fakemodel import build_model, to_fake
from vramcalc.trace.int8 import int8_outlier_probability, outlier_rule
from vramcalc.trace.oprecorder import LAUNCH, OpEvent, Recorder
from vramcalc.trace.steptrace import claim_nodes, decoder_layers, hook_backward, torch_optimizer
from vramcalc.training_plan import TrainingPlan

TRACE_PRIMES = (251, 241, 239, 233, 229, 227)  # the traced sequence length: the first that
# divides no model dimension
TRACED_LAYERS = 2


class ProfileError(VramcalcError):
    """The recipe's step could not be traced."""


@dataclass(frozen=True)
class BnbOptimizerParam:
    """One trainable tensor stepped by a bitsandbytes optimizer (a launch and a sync each)."""

    numel: int
    bytes_per_element: float  # parameter, gradient and states, read and written
    repeat: str  # "once" or "layers"
    # a LoRA tensor: numel + numel_per_rank * r elements, its states by the rule at that size
    numel_per_rank: int = 0
    itemsize: int = 0
    embedding: bool = False

    def at_rank(self, rank: int, optimizer: str) -> BnbOptimizerParam:
        if not self.numel_per_rank:
            return self
        n = self.numel + self.numel_per_rank * rank
        states = sum(b for b, _ in bnb_state_tensors(optimizer, n, self.embedding))
        return replace(
            self,
            numel=n,
            bytes_per_element=2 * states / n + 3 * self.itemsize,
            numel_per_rank=0,
        )


def _decoder_hooks(model: Any, rec: Recorder) -> dict[Any, int]:
    """Forward hooks on each decoder layer: set the recorder's layer (and the recompute phase
    when a layer runs again inside backward); the autograd nodes each layer's forward made,
    for backward prehooks (``steptrace.hook_backward``)."""
    nodes: dict[Any, int] = {}
    stack: list[tuple[int, str]] = []

    def walk(root: Any, stop: Any, layer: int) -> None:
        claim_nodes(root, stop, layer, nodes)

    for index, layer in enumerate(decoder_layers(model)):

        def pre(module: Any, args: Any, kwargs: Any, index: int = index) -> None:
            stack.append((rec.layer, rec.phase))
            rec.layer = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            module._vramcalc_speed_input = getattr(hidden, "grad_fn", None)

        def post(module: Any, args: Any, kwargs: Any, out: Any, index: int = index) -> None:
            if rec.phase == "forward":
                hidden = out[0] if isinstance(out, tuple) else out
                walk(getattr(hidden, "grad_fn", None), module._vramcalc_speed_input, index)
            rec.layer, rec.phase = stack.pop()

        layer.register_forward_pre_hook(pre, with_kwargs=True)
        layer.register_forward_hook(post, with_kwargs=True)

        # transformers checkpoints a layer's ``forward`` (not ``__call__``): the recompute in
        # backward calls the layer's children, not the layer
        # (checkpoint stops a recompute early by raising: no state is kept on a stack here)
        def child_pre(module: Any, args: Any, index: int = index) -> None:
            if rec.phase in ("backward", "recompute"):
                rec.phase, rec.layer = "recompute", index

        def child_post(module: Any, args: Any, out: Any) -> None:
            if rec.phase == "recompute":
                rec.phase = "backward"

        for child in layer.children():
            child.register_forward_pre_hook(child_pre)
            child.register_forward_hook(child_post)
    return nodes


def _outlier_probability(config: Any, name: str) -> float:
    """P(|x| >= 6) for one input element of an int8 linear at random init (``trace/int8.py``,
    the rule the step trace uses)."""
    rule = outlier_rule(config, name, 0)
    return int8_outlier_probability(rule.act, rule.sigma, rule.gated) if rule else 0.0


def _torch_optimizer(params: list[Any], plan: TrainingPlan) -> Any:
    """The optimizer Trainer builds, as CUDA runs it (``steptrace.torch_optimizer``; Adafactor's
    own ops too)."""
    optimizer = torch_optimizer(params, plan)
    if optimizer is not None:
        return optimizer
    if plan.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-4, scale_parameter=False, relative_step=False)
    return None  # bitsandbytes: BnbOptimizerParam, priced per tensor


def _bnb_params(
    params: list[tuple[Any, int, bool]], plan: TrainingPlan, rank_prime: int
) -> tuple[BnbOptimizerParam, ...]:
    """(tensor, layer, embedding) -> what a bitsandbytes optimizer moves per element: its
    states read and written, the parameter read and written, the gradient read. A LoRA
    tensor (its size a multiple of the traced prime rank) keeps its size per unit of rank."""
    out = []
    for p, layer, embedding in params:
        n = int(p.numel())
        states = sum(b for b, _ in bnb_state_tensors(plan.optimizer, n, embedding))
        per_element = 2 * states / n + 3 * p.element_size()
        repeat = "layers" if layer == 1 else "once"
        per_rank = n // rank_prime if rank_prime and n % rank_prime == 0 else 0
        out.append(
            BnbOptimizerParam(
                0 if per_rank else n, per_element, repeat, per_rank, p.element_size(), embedding
            )
        )
    return tuple(out)


def _model_dims(config: Any) -> list[int]:
    names = (
        "hidden_size",
        "intermediate_size",
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "num_local_experts",
        "moe_intermediate_size",
    )
    return [int(v) for v in (getattr(config, n, None) for n in names) if isinstance(v, int) and v]


def trace_prime(config: Any, plan: TrainingPlan) -> int:
    """The traced sequence length: the first of ``TRACE_PRIMES`` dividing no model dimension."""
    dims = _model_dims(config)
    dims.append(plan.adapter_rank)
    for p in TRACE_PRIMES:
        if all(d % p for d in dims):
            return p
    raise ProfileError(f"every traced length {TRACE_PRIMES} divides a dimension of the model")


def trace_events(
    config_dict: dict[str, Any], plan: TrainingPlan, rank_prime: int = 0
) -> tuple[list[OpEvent], list[OpEvent], Any]:
    """The events of one micro-batch and of one optimizer step, and the parameter facts.

    ``rank_prime``: the plan's LoRA rank is this prime (``opprofile.traced_rank``), and every
    amount is split into its parts in r^0, r^1 and r^2 (0: amounts at the plan's rank)."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vramcalc.trace import emulation, kbit_ops  # they import torch

    config = config_from_dict(config_dict)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    prime = trace_prime(text_config, plan)
    if rank_prime and (rank_prime != plan.adapter_rank or rank_prime == prime):
        raise ProfileError(f"rank {plan.adapter_rank} is not the traced prime rank {rank_prime}")
    rec = Recorder(prime, rank_prime)
    with _quiet():
        model = build_model(
            config_dict, plan.with_(batch_size=1, seq_len=prime, grad_accum=1), TRACED_LAYERS
        )
    for name, module in model.named_modules():
        if isinstance(module, emulation.Emulated4bit):
            module.forward = kbit_ops.bnb4_forward(module, rec, plan.double_quant)  # type: ignore[method-assign]
        elif isinstance(module, emulation.Emulated8bit):
            p = _outlier_probability(text_config, name)
            module.forward = kbit_ops.bnb8_forward(module, rec, p)  # type: ignore[method-assign]
    for module in model.modules():
        # LayerDrop (OPT) draws a host-side coin per layer in training; at 0 it never skips
        # one, and its CPU tensor cannot be read on fake tensors: leave that branch out
        if getattr(module, "layerdrop", None) == 0.0:
            module.training = False
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    named = to_fake(model, mode)
    layers = decoder_layers(model)
    layer_of: dict[int, int] = {}
    for index, layer in enumerate(layers):
        for p in layer.parameters():
            layer_of[id(p)] = index
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    params = [p for _, p in named if p.requires_grad]
    counts = _param_counts(named, layer_of)
    nodes = _decoder_hooks(model, rec)
    allocate = _rank_allocation(model, plan)
    original_sdpa = F.scaled_dot_product_attention
    with mode, _quiet(), _unpadded(), emulation.gpu_code_paths(), emulation.cuda_functions():
        F.scaled_dot_product_attention = kbit_ops.flash_sdpa(original_sdpa, rec)
        try:
            optimizer = _torch_optimizer(params, plan)
            with rec.mode():
                _micro_batch(model, rec, nodes, int(text_config.vocab_size), prime)
                micro_batch = list(rec.events)
                rec.phase, rec.layer = "optimizer", -1
                with rec.pause():  # the first step creates the optimizer states
                    _optimizer_step(params, optimizer, allocate)
                rec.layer_of = _state_layers(params, optimizer, layer_of)
                start = len(rec.events)
                _optimizer_step(params, optimizer, allocate)
                optimizer_events = rec.events[start:]
        finally:
            F.scaled_dot_product_attention = original_sdpa
    bnb: tuple[BnbOptimizerParam, ...] = ()
    if optimizer is None:
        bnb = _bnb_params(
            [(p, layer_of.get(id(p), -1), id(p) in embeddings) for p in params], plan, rank_prime
        )
    return micro_batch, optimizer_events, (bnb, counts, len(layers), prime)


@contextlib.contextmanager
def _unpadded() -> Iterator[None]:
    """The recipe's batches are whole sequences: a padding mask (OPT passes one of ones) is
    all true, as transformers' ``fast_all`` finds on the GPU by reading it back; on fake
    tensors it cannot be read, so say so."""
    import transformers.masking_utils as masking_utils

    fast_all = masking_utils.fast_all
    masking_utils.fast_all = lambda tensor: True  # type: ignore[assignment,return-value]
    try:
        yield
    finally:
        masking_utils.fast_all = fast_all


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.getLogger("transformers").level
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("transformers").setLevel(level)


def _param_counts(
    named: list[tuple[str, Any]], layer_of: dict[int, int]
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Parameter tensors (all, trainable) outside the layers, in the first, in the second."""
    total, trainable = [0, 0, 0], [0, 0, 0]
    for _, p in named:
        slot = layer_of.get(id(p), -1) + 1
        total[slot] += 1
        trainable[slot] += int(p.requires_grad)
    return (total[0], total[1], total[2]), (trainable[0], trainable[1], trainable[2])


def _state_layers(params: list[Any], optimizer: Any, layer_of: dict[int, int]) -> dict[int, int]:
    """Decoder layer of every parameter, gradient and optimizer state tensor (by ``id``)."""
    import torch

    out: dict[int, int] = {}
    for p in params:
        layer = layer_of.get(id(p), -1)
        out[id(p)] = layer
        if p.grad is not None:
            out[id(p.grad)] = layer
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for value in state.values():
            if isinstance(value, torch.Tensor):
                out[id(value)] = layer
    return out


def _micro_batch(model: Any, rec: Recorder, nodes: dict[Any, int], vocab: int, seq: int) -> None:
    """One micro-batch as Trainer runs it (``_inner_training_loop``, ``training_step``)."""
    import torch

    with rec.pause():
        ids = torch.randint(0, vocab, (1, seq))
        labels = ids.clone()
    rec.phase, rec.layer = "forward", -1
    num_items = labels[..., 1:].ne(-100).sum()  # Trainer._get_num_items_in_batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=num_items).loss
    rec.layer = -1

    def enter(layer: int) -> None:
        rec.layer, rec.phase = layer, "backward"

    hook_backward(loss, nodes, enter)
    nodes.clear()
    rec.phase = "backward"
    loss.backward()
    rec.phase, rec.layer = "backward", -1
    detached = loss.detach()
    torch.isnan(detached)  # `torch.isnan(loss) or torch.isinf(loss)`: the host reads both
    rec.emit("_local_scalar_dense", LAUNCH, sync=True)
    torch.isinf(detached)
    rec.emit("_local_scalar_dense", LAUNCH, sync=True)
    with rec.pause():
        tr_loss = torch.zeros(())
    tr_loss += detached  # Trainer's self._tr_loss += tr_loss_step


def _rank_allocation(model: Any, plan: TrainingPlan) -> Any:
    """AdaLoRA: the rank allocator's ``update_ipt`` (what ``update_and_allocate`` runs every
    step before zero_grad; its data-dependent ``mask_to_budget`` is not traced), else None."""
    if plan.method != "adalora":
        return None
    allocator, inner = model.base_model.rankallocator, model.base_model.model
    return lambda: allocator.update_ipt(inner)


def _optimizer_step(params: list[Any], optimizer: Any, allocate: Any = None) -> None:
    """accelerate's ``clip_grad_norm_`` (foreach on CUDA), the step, AdaLoRA's rank
    allocation (a Trainer callback on_optimizer_step), ``model.zero_grad()``."""
    import torch

    with_grad = [p for p in params if p.grad is not None]
    if with_grad:
        torch.nn.utils.clip_grad_norm_(with_grad, 1.0, foreach=True)
    if optimizer is not None:
        optimizer.step()
    if allocate is not None:
        allocate()
