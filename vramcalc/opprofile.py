"""The work of one training step, op by op: counted on the recipe's real model code.

Speed is priced op by op (``throughput.py``), so the ops are counted, not guessed.
``trace_profile`` builds the recipe's model (``memory.steptrace.build_model``:
transformers + peft, checkpointing, k-bit layers) with two decoder layers on
``FakeTensorMode`` tensors (no memory, no compute) and runs what HF Trainer runs
for one micro-batch (forward under bf16 autocast, the loss with Trainer's
``num_items_in_batch``, backward, Trainer's ``isnan``/``isinf`` read of the loss)
and for the optimizer step (accelerate's foreach gradient clipping,
``optimizer.step()``; ``zero_grad(set_to_none=True)`` launches nothing). A
``TorchDispatchMode`` records every op that reaches the dispatcher: its name, the
FLOPs of matmuls, the bytes it reads and writes, whether it launches a kernel, and
the decoder layer and phase (forward, recompute, backward, optimizer) it belongs to.

Where the recipe's CUDA code path differs from anything that runs on CPU, the ops
are stated from the sources instead (``kbit_ops.py``): bitsandbytes' 4-bit and
8-bit layers and optimizers, and SDPA's FlashAttention kernels.

Sizes: the step is traced at one sequence of a prime length ``p`` (251, or the next
prime below that divides no dimension of the model). Every tensor's elements are
then ``k·p^e``: ``e = 0`` a weight or state, ``e = 1`` an activation (per token),
``e = 2`` an S x S attention matrix; so every op's FLOPs and bytes are known as
``a + b·T + c·T·S`` for any batch and length (``T = batch·seq`` tokens). Two traced
layers give the first layer (which may compute no input gradients) and the layer
repeated ``num_layers - 1`` times (``Run.repeat``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from vramcalc.errors import VramcalcError
from vramcalc.plan import TrainingPlan

PROFILE_VERSION = 5
TRACE_PRIMES = (251, 241, 239, 233, 229, 227)  # the traced sequence length: the first that
# divides no model dimension
TRACED_LAYERS = 2
PHASES = ("forward", "recompute", "backward", "optimizer")
# kinds: what prices an op on the GPU (throughput.py)
MATMUL, MATMUL_FP32, INT8_MATMUL = "matmul", "matmul_fp32", "int8_matmul"
ATTENTION, MEMORY, LAUNCH = "attention", "memory", "launch"
# an op's FLOPs and bytes are linear in: 1, T, T·S, c, T·c (c: int8 outlier columns)
N_FEATURES = 5
# aten ops that only allocate or describe memory: a host dispatch, no kernel, no bytes
_NO_KERNEL = frozenset(
    {
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "lift_fresh",
        "_local_scalar_dense",
        "set_",
        "resize_",
        "_unsafe_view",
        "detach",
        "alias",
        "is_same_size",
    }
)
_MATMULS = frozenset({"mm", "addmm", "bmm", "baddbmm", "_grouped_mm"})
# in-place ops that overwrite their first argument without reading it
_WRITE_ONLY = frozenset({"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_"})

Vector = tuple[float, ...]


class ProfileError(VramcalcError):
    """The recipe's step could not be traced."""


def int8_outlier_columns(in_features: int, p: float, tokens: int) -> float:
    """Expected input columns of ``tokens`` rows with at least one |x| >= 6 (``c``)."""
    if p <= 0.0 or tokens <= 0:
        return 0.0
    return in_features * -math.expm1(tokens * math.log1p(-p))


@dataclass(frozen=True)
class Op:
    """One kind of op at one place of the step, ``count`` times there."""

    name: str
    kind: str  # MATMUL, MATMUL_FP32, INT8_MATMUL, ATTENTION, MEMORY (bandwidth-bound), LAUNCH
    phase: str  # forward, recompute, backward, optimizer
    count: int
    flops: Vector  # per op, coefficients of (1, T, T·S, c, T·c)
    bytes: Vector  # read + written, same features
    host: float = 1.0  # host dispatches (0: the layer share of an op over every parameter)
    python: float = 1.0  # Python-level calls it starts (0: dispatched by C++, or by the same call)
    outlier_p: float = 0.0  # int8: chance that one input element is an |x| >= 6 outlier
    outlier_in: int = 0  # int8: input columns; c = in·(1 - (1 - p)^T)
    sync: bool = False  # the host waits for the GPU after this op


@dataclass(frozen=True)
class Run:
    """Ops in program order; ``repeat`` "layers": once per decoder layer after the first."""

    repeat: str  # "once" or "layers"
    ops: tuple[Op, ...]


@dataclass(frozen=True)
class BnbOptimizerParam:
    """One trainable tensor stepped by a bitsandbytes optimizer (a launch and a sync each)."""

    numel: int
    bytes_per_element: float  # parameter, gradient and states, read and written
    repeat: str  # "once" or "layers"


@dataclass(frozen=True)
class OpProfile:
    """One micro-batch and one optimizer step of a recipe, as ops."""

    micro_batch: tuple[Run, ...]
    optimizer: tuple[Run, ...]
    bnb_params: tuple[BnbOptimizerParam, ...]  # empty unless a bitsandbytes optimizer
    params_total: tuple[int, int, int]  # parameter tensors: outside layers, first, each other
    params_trainable: tuple[int, int, int]
    trace_seq: int = TRACE_PRIMES[0]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OpProfile:
        def runs(raw: list[dict[str, Any]]) -> tuple[Run, ...]:
            return tuple(
                Run(
                    r["repeat"],
                    tuple(
                        Op(**{**o, "flops": tuple(o["flops"]), "bytes": tuple(o["bytes"])})
                        for o in r["ops"]
                    ),
                )
                for r in raw
            )

        def triple(raw: list[int]) -> tuple[int, int, int]:
            return int(raw[0]), int(raw[1]), int(raw[2])

        return cls(
            runs(data["micro_batch"]),
            runs(data["optimizer"]),
            tuple(BnbOptimizerParam(**p) for p in data["bnb_params"]),
            triple(data["params_total"]),
            triple(data["params_trainable"]),
            int(data["trace_seq"]),
        )

    def tensor_count(self, num_layers: int, trainable: bool) -> int:
        """Parameter tensors of the model with ``num_layers`` decoder layers."""
        outside, first, other = self.params_trainable if trainable else self.params_total
        return outside + (first if num_layers else 0) + max(num_layers - 1, 0) * other


# -- recording -----------------------------------------------------------------------------------
@dataclass
class _Event:
    name: str
    kind: str
    phase: str
    layer: int  # -1 outside the decoder layers
    flops: Vector  # (1, T, T·S, c, T·c)
    bytes: Vector
    host: float = 1.0
    sync: bool = False
    outlier: tuple[float, int] = (0.0, 0)  # int8: (p, input columns)
    python: float = 1.0


def _leaves(tree: Any) -> list[Any]:
    import torch
    from torch.utils._pytree import tree_leaves

    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _power(n: int, p: int) -> int:
    """How many factors ``p`` divide ``n`` (0, 1 or 2 and more)."""
    e = 0
    while n and n % p == 0 and e < 2:
        n //= p
        e += 1
    return e


def _vector(amounts: list[tuple[int, float]], p: int) -> Vector:
    """Amounts keyed by the element count they scale with -> coefficients of (1, T, T·S),
    exact (integers divided by the power of ``p`` they carry)."""
    sums = [0, 0, 0]
    for elements, amount in amounts:
        sums[_power(elements, p)] += int(amount)
    return tuple(float(total // p**e) for e, total in enumerate(sums)) + (0.0, 0.0)


def _matmul_shape(name: str, args: tuple[Any, ...]) -> tuple[int, int, int, int]:
    """(batch, m, k, n) of an aten matmul."""
    if name in ("mm", "addmm"):
        a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
        return 1, a.shape[0], a.shape[1], b.shape[1]
    if name in ("bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
        return a.shape[0], a.shape[1], a.shape[2], b.shape[2]
    return 0, 0, 0, 0


def _traffic(
    func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> list[tuple[Any, int]]:
    """(tensor, bytes) an op moves: every tensor argument is read (except what a write-only op
    overwrites); mutated arguments and new outputs are written."""
    mutated: list[Any] = []
    for i, arg in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if arg.alias_info is not None and arg.alias_info.is_write and value is not None:
            mutated.extend(_leaves(value))
    mutated_ids = {id(t) for t in mutated}
    inputs = _leaves((args, kwargs))
    input_ids = {id(t) for t in inputs}
    moved = [
        (t, t.numel() * t.element_size())
        for t in inputs
        if not (name in _WRITE_ONLY and id(t) in mutated_ids)
    ]
    moved += [(t, t.numel() * t.element_size()) for t in mutated]
    moved += [(t, t.numel() * t.element_size()) for t in _leaves(out) if id(t) not in input_ids]
    return moved


# frames between a Python caller and the recorder: torch's dispatch machinery
_INTERNAL = (
    "/torch/_ops.py",
    "/torch/utils/_python_dispatch.py",
    "/torch/_subclasses/",
    "/torch/utils/_stats.py",
    "/torch/_compile.py",
    "/torch/_dynamo/",
    "/torch/_prims_common/",
)
_ENGINE = "/torch/autograd/graph.py"  # _engine_run_backward: ops the C++ autograd engine runs


def _caller() -> tuple[int, int] | None:
    """The Python call site that dispatched the current op, or None when the C++ autograd
    engine did (a backward formula): (frame id, instruction)."""
    import sys

    frame = sys._getframe(3)  # past Recorder.dispatch and the mode's __torch_dispatch__
    while frame is not None and any(part in frame.f_code.co_filename for part in _INTERNAL):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None or _ENGINE in frame.f_code.co_filename:
        return None
    return id(frame), frame.f_lasti


class Recorder:
    """Where the step is (phase, decoder layer) and every op seen there."""

    def __init__(self, prime: int) -> None:
        self.prime = prime
        self.events: list[_Event] = []
        self.phase = "forward"
        self.layer = -1
        self.paused = 0
        # optimizer phase: decoder layer of each parameter / gradient / state tensor (by id),
        # so that one op over the lists of all of them is split by layer
        self.layer_of: dict[int, int] = {}
        self._last_caller: tuple[int, int] | None = None

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def emit(
        self,
        name: str,
        kind: str,
        flops: Vector = (0.0, 0.0, 0.0),
        nbytes: Vector = (0.0, 0.0, 0.0),
        sync: bool = False,
        outlier: tuple[float, int] = (0.0, 0),
        c_flops: tuple[float, float] = (0.0, 0.0),
        c_bytes: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        """An op stated from the sources (``kbit_ops.py``): FLOPs and bytes as coefficients of
        (1, T, T·S), and of (c, T·c) for int8 outlier columns."""
        self._last_caller = None
        if not self.paused:
            pad = (0.0, 0.0, 0.0)
            event = _Event(
                name,
                kind,
                self.phase,
                self.layer,
                (*flops, *pad[len(flops) :], *c_flops),
                (*nbytes, *pad[len(nbytes) :], *c_bytes),
                sync=sync,
                outlier=outlier,
            )
            self.events.append(event)

    def dispatch(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = func(*args, **kwargs)
        if self.paused or func.namespace == "prim":  # prim: tensor.device and such, metadata
            return out
        name = func.overloadpacket.__name__
        zero = (0.0,) * N_FEATURES
        caller = _caller()
        python = 1.0 if caller is not None and caller != self._last_caller else 0.0
        self._last_caller = caller
        if getattr(func, "is_view", False) or name in _NO_KERNEL or name.startswith("_record_"):
            self.events.append(
                _Event(name, LAUNCH, self.phase, self.layer, zero, zero, python=python)
            )
            return out
        moved = _traffic(func, name, args, kwargs, out)
        kind, flops = MEMORY, zero
        if name in _MATMULS:
            batch, m, k, n = _matmul_shape(name, args)
            flops = _vector([(batch * m * k * n, 2.0 * batch * m * k * n)], self.prime)
            operand = args[1] if name in ("addmm", "baddbmm") else args[0]
            kind = MATMUL_FP32 if operand.element_size() == 4 else MATMUL
        if not self.layer_of:
            nbytes = _vector([(t.numel(), b) for t, b in moved], self.prime)
            self.events.append(
                _Event(name, kind, self.phase, self.layer, flops, nbytes, python=python)
            )
            return out
        # an op over lists of every parameter: its bytes belong to each tensor's layer, and it
        # is one dispatch (counted outside the layers) however many layers there are
        by_layer: dict[int, list[tuple[int, float]]] = {-1: []}
        for tensor, b in moved:
            by_layer.setdefault(self.layer_of.get(id(tensor), -1), []).append((tensor.numel(), b))
        for layer, amounts in sorted(by_layer.items()):
            outside = layer == -1
            self.events.append(
                _Event(
                    name,
                    kind,
                    self.phase,
                    layer,
                    flops if outside else zero,
                    _vector(amounts, self.prime),
                    1.0 if outside else 0.0,
                    python=python if outside else 0.0,
                )
            )
        return out

    def mode(self) -> Any:
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                return recorder.dispatch(func, args, kwargs or {})

        return _Mode()


# -- the traced step ------------------------------------------------------------------------------
def _decoder_hooks(model: Any, rec: Recorder) -> dict[Any, int]:
    """Forward hooks on each decoder layer: set the recorder's layer (and the recompute phase
    when a layer runs again inside backward); the autograd nodes each layer's forward made,
    for backward prehooks (``_hook_backward``)."""
    from vramcalc.memory.steptrace import decoder_layers

    nodes: dict[Any, int] = {}
    stack: list[tuple[int, str]] = []

    def walk(root: Any, stop: Any, layer: int) -> None:
        todo = [root]
        while todo:
            node = todo.pop()
            if node is None or node is stop or node in nodes:
                continue
            nodes[node] = layer
            todo.extend(fn for fn, _ in node.next_functions)

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


def _hook_backward(loss: Any, nodes: dict[Any, int], rec: Recorder) -> None:
    seen: set[Any] = set()
    todo = [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)

        def enter(grads: Any, layer: int = nodes.get(node, -1)) -> None:
            rec.layer, rec.phase = layer, "backward"

        node.register_prehook(enter)
        todo.extend(fn for fn, _ in node.next_functions)


def _outlier_probability(config: Any, name: str) -> float:
    """P(|x| >= 6) for one input element of an int8 linear at random init: MLP output
    projections only (``memory.steptrace._outlier_columns`` gives the same columns)."""
    from vramcalc.memory.emulation import int8_outlier_probability
    from vramcalc.memory.steptrace import _MLP_OUTPUT

    parts = name.split(".")
    leaf = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]
    if leaf not in _MLP_OUTPUT:
        return 0.0
    act = str(
        getattr(config, "hidden_activation", None)
        or getattr(config, "hidden_act", None)
        or getattr(config, "activation_function", None)
        or "silu"
    )
    act = "gelu_tanh" if "gelu" in act else ("relu" if act == "relu" else "silu")
    sigma = float(getattr(config, "initializer_range", 0.02) or 0.02) * math.sqrt(
        int(config.hidden_size)
    )
    return int8_outlier_probability(act, sigma, _MLP_OUTPUT[leaf])


def _torch_optimizer(params: list[Any], plan: TrainingPlan) -> Any:
    """The optimizer Trainer builds, as CUDA runs it (fused, or foreach by default on CUDA)."""
    import torch

    name = plan.optimizer
    if name in ("adamw_torch", "adamw_torch_fused"):
        fused = name == "adamw_torch_fused"
        return torch.optim.AdamW(params, lr=1e-4, fused=fused, foreach=not fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4, foreach=True)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-4, scale_parameter=False, relative_step=False)
    return None  # bitsandbytes: BnbOptimizerParam, priced per tensor


def _bnb_params(
    params: list[tuple[Any, int, bool]], plan: TrainingPlan
) -> tuple[BnbOptimizerParam, ...]:
    """(tensor, layer, embedding) -> what a bitsandbytes optimizer moves per element: its
    states read and written, the parameter read and written, the gradient read."""
    from vramcalc.memory.optimizer import bnb_state_tensors

    out = []
    for p, layer, embedding in params:
        n = int(p.numel())
        states = sum(b for b, _ in bnb_state_tensors(plan.optimizer, n, embedding))
        per_element = 2 * states / n + 3 * p.element_size()
        out.append(BnbOptimizerParam(n, per_element, "layers" if layer == 1 else "once"))
    return tuple(out)


def trace_prime(config: Any, plan: TrainingPlan) -> int:
    """The traced sequence length: the first of ``TRACE_PRIMES`` dividing no model dimension."""
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
    dims = [int(v) for v in (getattr(config, n, None) for n in names) if isinstance(v, int) and v]
    dims.append(plan.rank)
    for p in TRACE_PRIMES:
        if all(d % p for d in dims):
            return p
    raise ProfileError(f"every traced length {TRACE_PRIMES} divides a dimension of the model")


def _trace(
    config_dict: dict[str, Any], plan: TrainingPlan
) -> tuple[list[_Event], list[_Event], Any]:
    """The events of one micro-batch and of one optimizer step, and the parameter facts."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vramcalc import kbit_ops
    from vramcalc.catalog import config_from_dict
    from vramcalc.memory import emulation
    from vramcalc.memory.steptrace import _to_fake, build_model, decoder_layers

    config = config_from_dict(config_dict)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    prime = trace_prime(text_config, plan)
    rec = Recorder(prime)
    with _quiet():
        model = build_model(
            config_dict, plan.with_(batch_size=1, seq_len=prime, grad_accum=1), TRACED_LAYERS
        )
    for name, module in model.named_modules():
        if isinstance(module, emulation.Emulated4bit):
            module.forward = kbit_ops.bnb4_forward(module, rec, plan.double_quant)
        elif isinstance(module, emulation.Emulated8bit):
            p = _outlier_probability(text_config, name)
            module.forward = kbit_ops.bnb8_forward(module, rec, p)
    for module in model.modules():
        # LayerDrop (OPT) draws a host-side coin per layer in training; at 0 it never skips
        # one, and its CPU tensor cannot be read on fake tensors: leave that branch out
        if getattr(module, "layerdrop", None) == 0.0:
            module.training = False
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    named = _to_fake(model, mode)
    layers = decoder_layers(model)
    layer_of: dict[int, int] = {}
    for index, layer in enumerate(layers):
        for p in layer.parameters():
            layer_of[id(p)] = index
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    params = [p for _, p in named if p.requires_grad]
    counts = _param_counts(named, layer_of)
    nodes = _decoder_hooks(model, rec)
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
                    _optimizer_step(params, optimizer)
                rec.layer_of = _state_layers(params, optimizer, layer_of)
                start = len(rec.events)
                _optimizer_step(params, optimizer)
                optimizer_events = rec.events[start:]
        finally:
            F.scaled_dot_product_attention = original_sdpa
    bnb: tuple[BnbOptimizerParam, ...] = ()
    if optimizer is None:
        bnb = _bnb_params([(p, layer_of.get(id(p), -1), id(p) in embeddings) for p in params], plan)
    return micro_batch, optimizer_events, (bnb, counts, len(layers), prime)


@contextlib.contextmanager
def _unpadded() -> Iterator[None]:
    """The recipe's batches are whole sequences: a padding mask (OPT passes one of ones) is
    all true, as transformers' ``fast_all`` finds on the GPU by reading it back; on fake
    tensors it cannot be read, so say so."""
    import transformers.masking_utils as masking_utils

    fast_all = masking_utils.fast_all
    masking_utils.fast_all = lambda tensor: True  # type: ignore[assignment]
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
    _hook_backward(loss, nodes, rec)
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


def _optimizer_step(params: list[Any], optimizer: Any) -> None:
    """accelerate's ``clip_grad_norm_`` (foreach on CUDA), the step, ``model.zero_grad()``."""
    import torch

    with_grad = [p for p in params if p.grad is not None]
    if with_grad:
        torch.nn.utils.clip_grad_norm_(with_grad, 1.0, foreach=True)
    if optimizer is not None:
        optimizer.step()


# -- events -> runs ------------------------------------------------------------------------------
def _ops(events: list[_Event]) -> list[tuple[int, Op]]:
    return [
        (
            e.layer,
            Op(
                e.name,
                e.kind,
                e.phase,
                1,
                e.flops,
                e.bytes,
                e.host,
                e.python,
                e.outlier[0],
                e.outlier[1],
                e.sync,
            ),
        )
        for e in events
    ]


def _runs(ops: list[tuple[int, Op]]) -> tuple[Run, ...]:
    """Consecutive ops of the second traced layer form a run repeated per layer; the rest runs
    once. Within a run, identical ops between two syncs are merged (their order there does not
    change the time)."""
    runs: list[Run] = []
    stretch: dict[Op, int] = {}
    current: list[Op] = []
    repeat: str | None = None

    def close_stretch() -> None:
        current.extend(replace(op, count=n) for op, n in stretch.items())
        stretch.clear()

    for layer, op in ops:
        kind = "layers" if layer == 1 else "once"
        if kind != repeat:
            close_stretch()
            if current and repeat is not None:
                runs.append(Run(repeat, tuple(current)))
            current, repeat = [], kind
        stretch[op] = stretch.get(op, 0) + 1
        if op.sync:
            close_stretch()
    close_stretch()
    if current and repeat is not None:
        runs.append(Run(repeat, tuple(current)))
    return tuple(runs)


def trace_profile(config_dict: dict[str, Any], plan: TrainingPlan) -> OpProfile:
    """Trace the recipe of ``plan`` (its sizes do not matter) into an ``OpProfile``."""
    try:
        micro_batch, optimizer, (bnb, counts, layers, prime) = _trace(config_dict, plan)
    except VramcalcError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the model code: no profile
        raise ProfileError(
            f"the training step of this recipe could not be traced ({type(err).__name__}: {err})"
        ) from err
    if layers != TRACED_LAYERS:
        raise ProfileError(f"traced {layers} decoder layers, expected {TRACED_LAYERS}")
    # the optimizer step has no syncs: group its ops by layer, order does not matter
    optimizer_ops = sorted(_ops(optimizer), key=lambda item: item[0] == 1)
    return OpProfile(
        _runs(_ops(micro_batch)), _runs(optimizer_ops), bnb, counts[0], counts[1], prime
    )


def profile_key(config_dict: dict[str, Any], plan: TrainingPlan) -> str:
    """Everything that changes a profile: the config, the recipe (not its sizes), versions."""
    from vramcalc.inventory import library_versions

    recipe = _recipe(plan).to_dict()
    recipe.pop("model", None)
    payload = {
        "v": PROFILE_VERSION,
        "config": config_dict,
        "recipe": recipe,
        "libs": library_versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :32
    ]


def _recipe(plan: TrainingPlan) -> TrainingPlan:
    """The plan with what does not change the ops per micro-batch set to one value."""
    return plan.with_(
        seq_len=TRACE_PRIMES[0],
        batch_size=1,
        grad_accum=1,
        num_gpus=1,
        strategy="ddp",
        cpu_offload=False,
        allocator="default",
    )


def _cache_dir() -> Path:
    from vramcalc.inventory import _cache_dir as inventory_dir

    return inventory_dir().parent / "opprofile"


@functools.lru_cache(maxsize=256)
def _cached(key: str, config_json: str, recipe: TrainingPlan) -> OpProfile:
    path = _cache_dir() / f"{key}.json"
    if path.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return OpProfile.from_json(json.loads(path.read_text()))
    profile = trace_profile(json.loads(config_json), recipe)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(profile.to_json()))
        tmp.replace(path)
    return profile


def op_profile(config_dict: dict[str, Any], plan: TrainingPlan) -> OpProfile:
    """The ``OpProfile`` of ``plan``'s recipe: traced once, then cached in memory and on disk
    (beside the inventory cache, same key rules)."""
    config_json = json.dumps(config_dict, sort_keys=True)
    return _cached(profile_key(config_dict, plan), config_json, _recipe(plan))
