"""The allocation sequence of real training steps, recorded on fake tensors.

The caching allocator's slack (``peak_reserved - peak_allocated``) depends on
the order and sizes of every allocation and free of a step, not on totals.
``trace_steps`` builds the recipe's real model (transformers + peft, the
k-bit layers emulated, ``memory/emulation.py``) with ``FakeTensorMode``
tensors (no memory, no compute: a full-size 8B step costs seconds of CPU),
runs HF Trainer's step on it (forward under bf16 autocast, the loss, backward,
gradient clipping, the optimizer step, AdaLoRA's ``update_ipt``,
``zero_grad(set_to_none=True)``) and
records every storage the aten ops create and the moment each is freed: the
``(op, handle, nbytes)`` events of ``memory/allocator.py``.

Parameters and buffers exist before the first step; they are returned apart
(``params``) so the caller can lay them out as loading does
(``memory/slack.py``). What the CUDA kernels allocate that the CPU kernels do
not (cuBLAS workspaces, FlashAttention-2's backward buffers) is added here,
each with its source.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from vramcalc.memory.allocator import ALLOC, FREE
from vramcalc.trace.events import Shape, StepTrace
from vramcalc.trace.fakemodel import build_model, frozen_heap, to_fake
from vramcalc.trace.fastviews import make_call
from vramcalc.trace.leaves import make_leaves
from vramcalc.trace.repeat import steps_to_trace
from vramcalc.training_plan import TrainingPlan

# torch CublasHandlePool: one workspace per (handle, stream), a handle per thread: the
# forward (main thread) and the autograd engine's device thread each get one, allocated
# through the caching allocator at their first matmul; 32 MiB on sm_90
# (getChosenWorkspaceSize: 4096 KiB * 8); never freed during training.
CUBLAS_WORKSPACE_BYTES = 32 << 20
_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm"}


class StepRecorder:
    """A ``TorchDispatchMode`` that turns new storages into ALLOC and their death into FREE."""

    def __init__(self, plan: TrainingPlan, attn_shape: tuple[int, int, int, int]) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        recorder = self
        # a tensor's device asked (the autograd engine asks it of every input and output):
        # no storage is made, so it is answered past the recorder (60 % of a ZeRO-3 trace's
        # dispatches)
        device = torch.ops.prim.device.default

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                if func is device:
                    return func(*args, **(kwargs or {}))
                return recorder.dispatch(func, args, kwargs or {})

        self.mode = Mode()
        self.events: list[tuple[int, int, int]] = []
        self.shapes: list[Shape | None] = []  # per event, see StepTrace
        self.tags: list[int] = []  # per event: the decoder layer it belongs to, or -1
        self.markers: list[tuple[str, int]] = []
        self.bnb_slots: list[tuple[int, int, bool]] = []  # (event position, tensor, embedding)
        self._handles: dict[int, tuple[int, int]] = {}  # storage -> (handle, layer tag)
        self.layer = -1  # the decoder layer running now (forward hooks, backward node hooks)
        self._next = 0
        self.live = self.peak = 0
        self.in_backward = False
        self._workspaces: set[str] = set()
        self.workspace_handles: list[int] = []  # the cuBLAS workspaces' ALLOCs
        # while gradient clipping runs: how many trainable tensors there are, and the handles
        # of what it stacks one element per tensor into (StepTrace.per_tensor)
        self.clipping = 0
        self.per_tensor: list[int] = []
        from vramcalc.trace.emulation import ROUNDED_DIMS  # torch: only once a trace runs

        self._rounded = ROUNDED_DIMS
        self._leaves = make_leaves(torch, tree_leaves)
        self._call = make_call(torch)
        self._attn_shape = attn_shape  # batch, seq, heads, head_dim

    def known(self, tensors: Any, layer: int = -1) -> None:
        """Storages that exist before the steps (parameters, buffers): views of them are not
        allocations; ``layer`` tags what the optimizer derives from them."""
        for tensor in tensors:
            self._handles[tensor.untyped_storage()._cdata] = (0, layer)

    def mark(self, label: str) -> None:
        self.take_slots()
        self.markers.append((label, len(self.events)))

    def take_slots(self) -> None:
        """Give the bitsandbytes state slots opened since the last event their position."""
        while BNB_SLOTS:
            index, embedding = BNB_SLOTS.pop(0)
            self.bnb_slots.append((len(self.events), index, embedding))

    def _alloc(self, nbytes: int, tag: int = -1, shape: Shape | None = None) -> int:
        self._next += 1
        self.events.append((ALLOC, self._next, nbytes))
        self.shapes.append(shape)
        self.tags.append(tag)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        return self._next

    def _free(self, handle: int, nbytes: int, tag: int) -> None:
        self.take_slots()
        self.events.append((FREE, handle, nbytes))
        self.shapes.append(None)
        self.tags.append(self.layer if self.layer >= 0 else tag)
        self.live -= nbytes

    def _tag_of(self, tensor: Any) -> int:
        import torch

        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            return -1
        known = self._handles.get(tensor.untyped_storage()._cdata)
        return known[1] if known else -1

    def track(self, tensor: Any, tag: int) -> None:
        import torch

        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._handles:
            return
        nbytes = int(storage.nbytes())
        itemsize = tensor.element_size()
        rounded = self._rounded
        shape: Shape | None = (
            (itemsize, tuple(int(d) for d in tensor.shape), rounded[-1] if rounded else ())
            if tensor.numel() * itemsize == nbytes and tensor.storage_offset() == 0
            else None
        )
        if BNB_STATE_NOTE:
            shape = ("bnb", *BNB_STATE_NOTE[-1])  # type: ignore[assignment]
        handle = self._alloc(nbytes, tag, shape)
        self._handles[key] = (handle, tag)

        def freed(key: int = key, handle: int = handle, nbytes: int = nbytes) -> None:
            self._handles.pop(key, None)
            self._free(handle, nbytes, tag)

        weakref.finalize(storage, freed)

    def _output_tags(self, args: Any, outputs: list[Any]) -> list[int]:
        """Outside a decoder layer (the optimizer, gradient clipping), an output belongs to
        the layer of what it is made from: element i of a foreach op's output list to
        element i of its first list argument, anything else to its first tagged input."""
        if self.layer >= 0:
            return [self.layer] * len(outputs)
        for arg in args:
            if isinstance(arg, (list, tuple)) and len(arg) == len(outputs) and len(arg) > 1:
                return [self._tag_of(a) for a in arg]
        tag = next((t for t in map(self._tag_of, self._leaves(args)) if t >= 0), -1)
        return [tag] * len(outputs)

    def dispatch(self, func: Any, args: Any, kwargs: Any) -> Any:
        name = func.overloadpacket.__name__
        out = self._call(func, args, kwargs)
        outputs = self._leaves(out)
        for tensor, tag in zip(outputs, self._output_tags(args, outputs), strict=True):
            self.track(tensor, tag)
        if name in _MATMULS:
            thread = "backward" if self.in_backward else "forward"
            if thread not in self._workspaces:
                self._workspaces.add(thread)
                # after the output: the op allocates it, then the cuBLAS call gets its
                # thread's handle and workspace (kept for the whole run); the allocator trace
                # of h100_servetrace's int8 merge shows this order
                self.workspace_handles.append(self._alloc(CUBLAS_WORKSPACE_BYTES))
        if self.clipping and name == "stack" and outputs:
            stacked = outputs[0]
            if stacked.dim() == 1 and int(stacked.shape[0]) == self.clipping:
                known = self._handles.get(stacked.untyped_storage()._cdata)
                if known is not None and known[0]:
                    self.per_tensor.append(known[0])
        return out


def canonical_frees(
    events: list[tuple[int, int, int]], tags: list[int], markers: list[tuple[str, int]] = ()
) -> tuple[tuple[tuple[int, int, int], ...], tuple[int, ...], list[int]]:
    """Each batch of consecutive frees in the order its tensors were made.

    Python releases some groups of tensors in an order that changes from run to run (a
    dict or set of saved tensors dropped at once, weakref callbacks), and the order of
    frees with no allocation between them does not change the allocator's state (free
    blocks merge with their free neighbours whatever the order): one order makes traces of
    the same recipe comparable event by event."""
    made = {handle: i for i, (op, handle, _) in enumerate(events) if op == ALLOC}
    out, out_tags = list(events), list(tags)
    position = list(range(len(events)))  # new index -> old index (frees move among frees)
    cuts = {at for _, at in markers}  # batches do not cross a marker (or another cut)
    i, n = 0, len(out)
    while i < n:
        if out[i][0] != FREE:
            i += 1
            continue
        j = i + 1
        while j < n and out[j][0] == FREE and j not in cuts:
            j += 1
        if j - i > 1:
            order = sorted(range(i, j), key=lambda k: made.get(events[k][1], -1))
            out[i:j] = [events[k] for k in order]
            out_tags[i:j] = [tags[k] for k in order]
            position[i:j] = order
        i = j
    return tuple(out), tuple(out_tags), position


def torch_optimizer(params: list[Any], plan: TrainingPlan) -> Any:
    """The torch optimizer HF Trainer builds for ``plan.optimizer``, as CUDA runs it (None for
    the bitsandbytes and Adafactor optimizers): the step and the op traces both run it."""
    import torch

    name = plan.optimizer
    if name in ("adamw_torch", "adamw_torch_fused"):
        # Trainer: AdamW(fused=True) for adamw_torch_fused; torch's default on CUDA
        # tensors otherwise is the foreach implementation (forced: these are CPU tensors)
        fused = name == "adamw_torch_fused"
        return torch.optim.AdamW(params, lr=1e-4, fused=fused, foreach=not fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4, foreach=True)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=True)
    return None


def trainer_optimizer(params: list[Any], plan: TrainingPlan) -> Any:
    """The step trace's optimizer: torch's, else the states the rules give (``_StatesOnly``)."""
    return torch_optimizer(params, plan) or _StatesOnly(params, plan)


#: (trainable tensor index, embedding) while a bitsandbytes state is allocated: the recorder
#: notes it in place of a shape (the state's size is the rule's, ``optimizer.bnb_state_tensors``)
BNB_STATE_NOTE: list[tuple[int, bool]] = []
#: (trainable tensor index, embedding) appended as each tensor's bitsandbytes states are made
#: (none on the device when paged): the recorder keeps the event position of each slot
BNB_SLOTS: list[tuple[int, bool]] = []


class _StatesOnly:
    """bitsandbytes / Adafactor optimizers: states allocated at the first step as the
    optimizer rules say (``memory/optimizer.py``), in parameter order; their steps are
    single in-place kernels (bitsandbytes) or per-tensor temporaries (Adafactor)."""

    def __init__(self, params: list[Any], plan: TrainingPlan) -> None:
        self.params, self.plan = params, plan
        self.state: list[Any] | None = None

    def step(self) -> None:
        import torch

        from vramcalc.memory.optimizer import BNB_OPTIMIZERS, bnb_state_tensors

        if self.state is not None:
            return
        self.state = []
        if self.plan.optimizer in BNB_OPTIMIZERS:
            for index, p in enumerate(self.params):
                embedding = bool(getattr(p, "_vramcalc_embedding", False))
                states = bnb_state_tensors(self.plan.optimizer, p.numel(), embedding)
                BNB_SLOTS.append((index, embedding))  # where this tensor's states go (any)
                for nbytes, on_device in states:
                    if on_device:
                        # how many and how large follow from the tensor's size by rule (32-bit
                        # below 4096 elements, paged above 1e5): noted for trace/recipe.py
                        BNB_STATE_NOTE.append((index, embedding))
                        try:
                            self.state.append(p.new_empty((nbytes,), dtype=torch.uint8))
                        finally:
                            BNB_STATE_NOTE.pop()
            return
        for p in self.params:  # adafactor: factored second moment (optimizer.py's rule)
            if p.dim() >= 2:
                self.state.append(p.new_empty(p.shape[:-1]))
                self.state.append(p.new_empty((*p.shape[:-2], p.shape[-1])))
            else:
                self.state.append(p.new_empty(p.shape))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def decoder_layers(model: Any) -> list[Any]:
    """The stack of decoder layers: the longest ``nn.ModuleList`` of the model."""
    import torch

    longest: list[Any] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(longest):
            longest = list(module)
    return longest


def claim_nodes(root: Any, stop: Any, layer: int, nodes: dict[Any, int]) -> None:
    """The autograd nodes a decoder layer's forward made: from its output's node back to its
    input's (``stop``), each not claimed yet given ``layer`` in ``nodes`` (the step and the op
    traces tag backward by them)."""
    todo = [root]
    while todo:
        node = todo.pop()
        if node is None or node is stop or node in nodes:
            continue
        nodes[node] = layer
        todo.extend(fn for fn, _ in node.next_functions)


def claim_parameter_nodes(loss: Any, nodes: dict[Any, int], layer_of: dict[int, int]) -> None:
    """The autograd nodes of ``loss``'s graph outside the decoder layers' forwards (not in
    ``nodes``) that reach the parameters of one decoder layer alone (``layer_of``: id of a
    parameter -> its layer) and no node of a layer, given that layer in ``nodes``: AdaLoRA's
    orthogonal regularisation of each adapter, computed after the model's forward. The
    nodes on the way to the layers (the head, the loss) and those that sum over several
    layers stay outside."""
    reach: dict[Any, frozenset[int] | None] = {}  # None: reaches a node of a layer
    todo: list[tuple[Any, bool]] = [(loss.grad_fn, False)]
    while todo:
        node, expanded = todo.pop()
        if node is None or (node in reach and not expanded):
            continue
        variable = getattr(node, "variable", None)  # a parameter's AccumulateGrad
        if variable is not None:
            layer = layer_of.get(id(variable), -1)
            reach[node] = frozenset((layer,)) if layer >= 0 else frozenset()
            continue
        if node in nodes:
            reach[node] = None
            continue
        children = [fn for fn, _ in node.next_functions if fn is not None]
        if not expanded:
            reach[node] = frozenset()  # a placeholder until its children are done
            todo.append((node, True))
            todo.extend((fn, False) for fn in children if fn not in reach)
            continue
        layers: set[int] = set()
        blocked = False
        for fn in children:
            below = reach.get(fn, frozenset())
            if below is None:
                blocked = True
            else:
                layers |= below
        reach[node] = None if blocked else frozenset(layers)
    for node, layers in reach.items():
        if layers is not None and len(layers) == 1 and node not in nodes:
            nodes[node] = next(iter(layers))


def parameters_tagged(model: Any, recorder: StepRecorder, layer_of: dict[int, int]) -> None:
    """While a loop over ``model.named_parameters()`` runs, the recorder's layer is that of
    the parameter it is at (outside the layers: the layer before the loop). AdaLoRA computes
    its orthogonal regularisation, and its rank allocator's moving averages, in such loops
    over every adapter: each adapter's terms belong to its decoder layer."""
    original = model.named_parameters

    def named_parameters(*args: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        before = recorder.layer
        try:
            for name, param in original(*args, **kwargs):
                layer = layer_of.get(id(param), -1)
                recorder.layer = layer if layer >= 0 else before
                yield name, param
        finally:
            recorder.layer = before

    model.named_parameters = named_parameters


def tag_layers(model: Any, recorder: StepRecorder) -> dict[Any, int]:
    """Hooks that tell the recorder which decoder layer runs: forward hooks on each layer,
    and, for backward, the autograd nodes each layer's forward created (found from its
    output back to its input) in ``nodes``, for prehooks set before backward."""
    nodes: dict[Any, int] = {}
    stack: list[int] = []
    inputs: list[Any] = []

    def walk(root: Any, stop: Any, layer: int) -> None:
        claim_nodes(root, stop, layer, nodes)

    for index, layer in enumerate(decoder_layers(model)):

        def pre(module: Any, args: Any, kwargs: Any, index: int = index) -> None:
            if recorder.in_backward:  # a checkpoint's recompute: the node hooks tell the
                # layer, and an early-stopped recompute never reaches the post hook (so
                # nothing may be held here: it would keep the recomputed graph alive)
                return
            stack.append(recorder.layer)
            recorder.layer = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            # held only until the layer returns: a lasting reference to a graph node would
            # keep everything it reaches (and what bitsandbytes keeps on ctx) alive
            inputs.append(getattr(hidden, "grad_fn", None))

        def post(module: Any, args: Any, kwargs: Any, out: Any, index: int = index) -> None:
            if recorder.in_backward:
                return
            hidden = out[0] if isinstance(out, tuple) else out
            walk(getattr(hidden, "grad_fn", None), inputs.pop(), index)
            stack.pop()
            # the layer's context lasts until the next layer starts (the decoder loop frees
            # the previous layer's output after this one returns)
            recorder.layer = index

        layer.register_forward_pre_hook(pre, with_kwargs=True)
        layer.register_forward_hook(post, with_kwargs=True)
    return nodes


def graph_nodes(loss: Any) -> Iterator[Any]:
    """Every node of ``loss``'s autograd graph, once each, depth first from ``loss.grad_fn``."""
    seen: set[Any] = set()
    todo = [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        todo.extend(fn for fn, _ in node.next_functions)


def hook_backward(loss: Any, nodes: dict[Any, int], enter: Callable[[int], None]) -> None:
    """Before backward: every node of ``loss``'s graph calls ``enter`` with its decoder layer
    (``nodes``; -1 outside the layers) when it runs."""
    for node in graph_nodes(loss):

        def prehook(grads: Any, layer: int = nodes.get(node, -1)) -> None:
            enter(layer)

        node.register_prehook(prehook)


def backward(recorder: Any, loss: Any, nodes: dict[Any, int], label: str, run: Any = None) -> None:
    """A micro-batch's backward as both step traces record it: each graph node tells
    ``recorder`` its decoder layer (``hook_backward``), ``label`` marks where it starts, and
    ``recorder.in_backward`` holds while it runs; ``run(loss)`` runs it (default
    ``loss.backward()``; DeepSpeed: ``engine.backward``)."""
    recorder.layer = -1
    hook_backward(loss, nodes, lambda layer: setattr(recorder, "layer", layer))
    recorder.mark(label)
    recorder.in_backward = True
    if run is None:
        loss.backward()
    else:
        run(loss)
    recorder.in_backward = False
    recorder.layer = -1
    nodes.clear()


def trace_steps(
    config_dict: dict[str, Any],
    plan: TrainingPlan,
    steps: int = 3,
    num_layers: int | None = None,
    unroll: bool = True,
    labelled: bool = False,
) -> StepTrace:
    """Record ``steps`` Trainer steps of ``plan`` (``num_layers`` decoder layers, default all).

    With ``unroll``, a model of more than ``unroll.TRACED_LAYERS`` layers is traced with that
    many and unrolled to all of them (``memory/unroll.py``); if its layers are not alike
    enough for that, all of them are traced. ``labelled``: an unrolled trace keeps its
    layer tags and phase markers (``unroll.expand``), as a trace of every layer has them.
    """
    from vramcalc.trace import unroll as unrolling

    total = num_layers or config_layers(config_dict)
    if not unroll or steps < 2:
        return trace_at(config_dict, plan, steps, num_layers)
    traced = min(steps, steps_to_trace(plan))
    small = trace_at(config_dict, plan, traced, min(total, unrolling.TRACED_LAYERS))
    try:
        return unrolling.expand(small, steps, total, labelled=labelled)
    except unrolling.UnrollError:
        return trace_at(config_dict, plan, steps, num_layers)


def _rank_allocator(model: Any, plan: TrainingPlan) -> Any:
    """AdaLoRA's ``RankAllocator``, whose ``update_ipt`` the trace runs after each optimizer
    step (None for other methods).

    ``AdaLoraModel.update_and_allocate(step)`` runs ``update_ipt`` (the sensitivity and
    uncertainty moving averages: every tensor it keeps) and then, on budget steps,
    ``mask_to_budget``, which thresholds the scores with ``kthvalue(...).item()``: a value
    fake tensors do not have. Its temporaries (one element score per adapter tensor at a
    time, r-sized means) are not traced; ``memory/adalora.py`` states the rule.
    """
    if plan.method != "adalora":
        return None
    return model.base_model.rankallocator


def config_layers(config_dict: dict[str, Any]) -> int:
    """Decoder layers of the config's model."""
    from vramcalc.catalog import config_from_dict

    config = config_from_dict(config_dict)
    return int(getattr(config, "num_hidden_layers", 0) or 0)


@frozen_heap()
def trace_at(
    config_dict: dict[str, Any],
    plan: TrainingPlan,
    steps: int,
    num_layers: int | None,
    outlier_columns: int | None = None,
) -> StepTrace:
    """``steps`` optimizer steps of ``plan`` with ``num_layers`` decoder layers (default: the
    config's), every layer traced; ``outlier_columns`` sets INT8's outlier columns (default:
    as the plan's tokens make them)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vramcalc.trace.emulation import cuda_functions, gpu_code_paths

    BNB_SLOTS.clear()
    with _quiet():
        model = build_model(config_dict, plan, num_layers, outlier_columns)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    named = to_fake(model, mode)
    embedding = model.get_input_embeddings()
    for p in embedding.parameters():
        p._vramcalc_embedding = True  # bnb 8-bit optimizers keep 32-bit state for these
    params = [p for _, p in named if p.requires_grad]
    config = model.config
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads)
    recorder = StepRecorder(plan, (plan.batch_size, plan.seq_len, heads, head_dim))
    vocab = int(config.vocab_size)
    layer_of: dict[int, int] = {}
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        for p in layer.parameters():
            layer_of[id(p)] = index
    for _, p in named:
        recorder.known([p], layer_of.get(id(p), -1))
    recorder.known(model.buffers())
    nodes = tag_layers(model, recorder)
    allocator = _rank_allocator(model, plan)
    if allocator is not None:
        parameters_tagged(model.base_model.model, recorder, layer_of)
    with mode, _quiet(), gpu_code_paths(), cuda_functions():
        optimizer = trainer_optimizer(params, plan)
        with recorder.mode:
            for step in range(steps):
                recorder.mark(f"step{step}")
                for micro in range(plan.grad_accum):
                    if micro:
                        recorder.mark(f"step{step}_micro{micro}")
                    ids = torch.randint(0, vocab, (plan.batch_size, plan.seq_len))
                    labels = ids.clone()
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = model(input_ids=ids, labels=labels).loss
                    del ids, labels
                    if allocator is not None:
                        claim_parameter_nodes(loss, nodes, layer_of)
                    backward(recorder, loss, nodes, f"step{step}_backward{micro}")
                    del loss
                recorder.mark(f"step{step}_optimizer")
                if params:
                    recorder.clipping = len(params)
                    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                    recorder.clipping = 0
                optimizer.step()
                if allocator is not None:  # AdaLoRA: update_and_allocate, before zero_grad
                    allocator.update_ipt(model.base_model.model)
                optimizer.zero_grad(set_to_none=True)
            recorder.mark("end")
    param_list = tuple(
        (
            name,
            tuple(int(d) for d in p.shape),
            str(p.dtype).removeprefix("torch."),
            bool(p.requires_grad),
            bool(getattr(p, "_vramcalc_kbit", False)),
        )
        for name, p in named
    )
    events, tags, position = canonical_frees(
        recorder.events,
        recorder.tags,
        [*recorder.markers, *(("slot", at) for at, _, _ in recorder.bnb_slots)],
    )
    return StepTrace(
        events,
        tags,
        tuple(recorder.markers),
        param_list,
        tuple(layer_of.get(id(p), -1) for _, p in named),
        len(layers),
        tuple(recorder.shapes[k] for k in position),
        getattr(model, "_vramcalc_outlier_rule", None),
        tuple(recorder.bnb_slots),
        tuple(recorder.per_tensor),
        len(params),
    )
