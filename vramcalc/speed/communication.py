"""What the GPUs of a multi-GPU plan send each other per optimizer step, and the time it adds.

A pure module: collectives are counted from the model inventory (``inventory.py``) and the
plan; their time from a link's bus bandwidth (``data/gpus.csv``) and NCCL's latency model.

Bytes (``communication_volume``), the recipe the harness runs (accelerate's FSDP1 /
DeepSpeed configs in ``harness/distributed.py``, HF Trainer):

* **FSDP** (FSDP1, ``use_orig_params``, mixed precision in the compute dtype, transformer-layer
  auto wrap; adapter plans: peft's ``fsdp_auto_wrap_policy``, which also makes every leaf
  module with a trainable weight -- each ``lora_A`` / ``lora_B`` / DoRA magnitude, each
  ``modules_to_save`` copy -- a unit of its own). A unit's parameters are one flat parameter
  padded to a multiple of the world size (torch ``fsdp/_flat_param.py``,
  ``_init_flat_param_and_metadata``: the 16-byte address alignment between tensors adds
  nothing where every tensor size is a multiple of 8, as in the catalog's models). It is
  all-gathered in the compute dtype (``MixedPrecision.param_dtype``; accelerate's fp32 upcast
  of trainable units does not change that) and its gradient reduce-scattered in it
  (``reduce_dtype``). ``FULL_SHARD`` frees every unit but the root after forward
  (``_runtime_utils._post_forward_reshard``) and all of them after backward
  (``_should_free_in_backward``): per micro-batch an all-gather of every unit in forward and
  of every unit but the root in backward (``_pre_backward_hook``; frozen decoder layers too,
  their input gradient needs the weights). ``SHARD_GRAD_OP`` keeps them gathered from forward
  to backward and, under ``no_sync``, to the next micro-batch: one forward all-gather per unit
  and step. Trainer runs every micro-batch but the last under ``no_sync``: one reduce-scatter
  per unit whose flat parameter needs a gradient, in the last backward. A frozen unit (a
  LoRA plan's decoder layers and root) sends no gradient. FSDP-QLoRA: the 4-bit weights are
  parameters stored as ``bnb_4bit_quant_storage`` = the compute dtype, ``(n + 1) // 4``
  elements for ``n`` weights (bitsandbytes ``quantize_4bit``); their quantization state stays
  on every GPU. ``clip_grad_norm_`` all-reduces one fp32 norm.
* **DDP**: every trainable gradient, in its own dtype (fp32 for adapters), all-reduced in
  buckets filled in reverse parameter order: the first 1 MiB (``dist._DEFAULT_FIRST_BUCKET_BYTES``),
  the others 25 MiB (``bucket_cap_mb``), in the last micro-batch's backward. Buckets are
  counted by bytes (the Reducer closes one at a tensor boundary: the count can differ by one).
* **ZeRO** (DeepSpeed, ``bf16`` / ``fp16`` mode: the model and so the communication in the
  half dtype, ``communication_data_type`` unset; Trainer never skips the sync for DeepSpeed):
  ZeRO-1 reduce-scatters the trainable gradients at the accumulation boundary, ZeRO-2 in every
  backward, both in ``reduce_bucket_size`` (hidden²) buckets and, with ``overlap_comm`` off
  (their default), on the compute stream; after the optimizer step each all-gathers the
  updated trainable parameters (``allgather_bucket_size`` 5e8 elements). ZeRO-3 all-gathers
  every partitioned parameter (those of at least ``stage3_param_persistence_threshold`` =
  10·hidden elements; the rest stays whole on every GPU) in forward and again in backward,
  one collective per module, reduce-scatters the trainable gradients in every backward
  (``overlap_comm`` on) and all-gathers the updated persistent trainable ones after the step.
  The volumes are those of the ZeRO paper (Rajbhandari et al. 2020, §7: 2Ψ for ZeRO-1/2,
  3Ψ for ZeRO-3). DeepSpeed's ``stage3_max_reuse_distance`` can keep the last layer or two
  gathered across the turn of the step: not modelled.

Time: each collective's on the plan's link (``links.py``: NCCL's ring at the link's bus
bandwidth, after NCCL's latency).

Overlap (``communication_time``), per micro-batch and phase: FSDP's and ZeRO-3's all-gathers
run on their own stream ahead of the compute that needs them (the host issues the next
unit's while the GPU computes the current one; ``BACKWARD_PRE`` prefetches in backward),
reduce-scatters and DDP's bucket all-reduces run while the earlier layers' backward
computes. What cannot hide: the root's and the first decoder layer's forward all-gathers
(only the embedding lookup runs before them), the first layer's and the root's
reduce-scatters and DDP's last bucket (nothing is left to compute after them), ZeRO-1/2's
collectives (on the compute stream or after backward), and everything after backward::

    exposed = sum(collectives that cannot hide) + max(0, sum(the others) - the phase's time)

the phase's time being the forward (or backward, recompute included) of one micro-batch as
priced on the GPU (``throughput.py``). Layers are alike, so this is also the per-layer rule
``max(0, a layer's communication - a layer's compute)`` summed. NCCL's kernels also take SMs
from the compute they overlap: not modelled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vramcalc.inventory import ModelInventory
from vramcalc.memory import DTYPE_BYTES
from vramcalc.memory.gradients import trainable_tensors
from vramcalc.speed.links import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, Link, collective_seconds
from vramcalc.training_plan import TrainingPlan

__all__ = [
    "ALL_GATHER",
    "ALL_REDUCE",
    "REDUCE_SCATTER",
    "Collective",
    "CommunicationTime",
    "CommunicationVolume",
    "communication_time",
    "communication_volume",
]

PHASES = ("forward", "backward", "step")  # step: after the last backward, before the next
EVERY, FIRST, LAST = "every", "first", "last"  # the micro-batches a collective runs in
DDP_FIRST_BUCKET_BYTES = 1024 * 1024  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DDP_BUCKET_BYTES = 25 * 1024 * 1024  # DistributedDataParallel(bucket_cap_mb=25)
ZERO_ALLGATHER_BUCKET = 500_000_000  # DeepSpeed allgather_bucket_size default (elements)
ZERO_PERSISTENCE_HIDDEN = 10  # stage3_param_persistence_threshold = 10 x hidden (harness)


# -- bytes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Collective:
    """``count`` collectives of one kind, each of ``nbytes`` (NCCL's S: the whole gathered,
    reduced or scattered buffer), in ``phase`` of the micro-batches ``when`` says."""

    kind: str  # ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE
    phase: str  # PHASES
    what: str
    nbytes: int
    count: int
    when: str = EVERY  # EVERY, FIRST or LAST micro-batch (phase "step": once)
    exposed: bool = False  # nothing to overlap it with (module docstring)

    def runs_in(self, micro: int, micro_batches: int) -> bool:
        return (
            self.when == EVERY
            or (self.when == FIRST and micro == 0)
            or (self.when == LAST and micro == micro_batches - 1)
        )

    def per_step(self, micro_batches: int) -> int:
        """How many run per optimizer step."""
        return self.count * (micro_batches if self.when == EVERY else 1)


@dataclass(frozen=True)
class CommunicationVolume:
    """Every collective of one optimizer step of a multi-GPU plan."""

    plan: TrainingPlan
    collectives: tuple[Collective, ...]
    rule: str

    def bytes_per_step(self, kind: str | None = None) -> int:
        """NCCL's S summed over the step (what one GPU holds of it before or after)."""
        n = self.plan.grad_accum
        return sum(
            c.nbytes * c.per_step(n) for c in self.collectives if kind is None or c.kind == kind
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "bytes_per_step": {
                k: self.bytes_per_step(k) for k in (ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE)
            },
            "collectives": [
                {**c.__dict__, "per_step": c.per_step(self.plan.grad_accum)}
                for c in self.collectives
            ],
        }


def comm_itemsize(plan: TrainingPlan) -> int:
    """Bytes per element FSDP gathers and reduces in, and ZeRO communicates in: the compute
    dtype (accelerate's ``mixed_precision``, DeepSpeed's bf16/fp16 mode), fp32 for fp32 plans."""
    return DTYPE_BYTES[plan.dtype]


def padded(numel: int, world: int) -> int:
    """A flat parameter padded to a multiple of the world size (FSDP1)."""
    return -(numel // -world) * world


def _layer_split(inventory: ModelInventory) -> tuple[int, int]:
    """(base parameters of one decoder layer, of the root) with every layer alike."""
    layers = max(inventory.num_layers, 1)
    inside = inventory.decoder_layer_params or (
        inventory.total_params
        - inventory.params_by_role["embedding"]
        - inventory.params_by_role["lm_head"]
    )
    return inside // layers, inventory.total_params - inside // layers * layers


def _packed_savings(inventory: ModelInventory, plan: TrainingPlan) -> tuple[int, int]:
    """Elements the 4-bit packing removes from (one decoder layer, the root) under a sharded
    QLoRA plan: ``n`` weights stored as ``(n + 1) // (2 x itemsize)`` storage elements."""
    if plan.quant not in ("nf4", "fp4"):
        return 0, 0
    per_element = 2 * comm_itemsize(plan)
    layers, layer, root = max(inventory.num_layers, 1), 0, 0
    for g in inventory.linears:
        if not g.quantizable:
            continue
        saved = g.weight_params - (g.weight_params + 1) // per_element
        if g.count % layers == 0:
            layer += saved * g.count // layers
        else:
            root += saved * g.count
    return layer, root


@dataclass(frozen=True)
class _Tensor:
    numel: int
    count: int  # how many of them in the model
    in_layers: bool


def _trainable(inventory: ModelInventory, plan: TrainingPlan) -> list[_Tensor]:
    """Adapter tensors and ``modules_to_save`` copies: one FSDP unit each (peft's policy)."""
    layers = max(inventory.num_layers, 1)
    out = [_Tensor(math.prod(s), c, c % layers == 0) for s, c in inventory.trainable_shapes]
    return out + [_Tensor(math.prod(s), c, False) for s, c in inventory.saved_copy_shapes]


def _fsdp(inventory: ModelInventory, plan: TrainingPlan) -> tuple[list[Collective], str]:
    n, size, layers = plan.num_gpus, comm_itemsize(plan), max(inventory.num_layers, 1)
    full_shard = plan.strategy == "fsdp"
    layer, root = _layer_split(inventory)
    saved_layer, saved_root = _packed_savings(inventory, plan)
    layer, root = layer - saved_layer, root - saved_root
    trains_base = plan.method == "full"
    out: list[Collective] = []
    forward_when = EVERY if full_shard else FIRST

    def unit(what: str, numel: int, count: int, first: int, trains: bool, is_root: bool) -> None:
        """``count`` units, ``first`` of them before anything can hide their collectives."""
        nbytes = padded(numel, n) * size
        for exposed, k in ((True, first), (False, count - first)):
            if not k:
                continue
            out.append(Collective(ALL_GATHER, "forward", what, nbytes, k, forward_when, exposed))
            if full_shard and not is_root:
                out.append(Collective(ALL_GATHER, "backward", what, nbytes, k, EVERY))
            if trains:
                out.append(Collective(REDUCE_SCATTER, "backward", what, nbytes, k, LAST, exposed))

    unit("root unit (embedding, head, final norm)", root, 1, 1, trains_base, True)
    unit("decoder layer", layer, layers, 1, trains_base, False)
    for t in _trainable(inventory, plan) if plan.uses_adapters else ():
        per_layer = t.count // layers if t.in_layers else t.count
        unit(
            "adapter tensor" if t.in_layers else "modules_to_save copy",
            t.numel,
            t.count,
            per_layer,
            True,
            False,
        )
    out.append(Collective(ALL_REDUCE, "step", "gradient norm (clip_grad_norm_)", 4, 1, LAST, True))
    kind = "FULL_SHARD" if full_shard else "SHARD_GRAD_OP"
    rule = (
        f"FSDP {kind}: every unit all-gathered in forward"
        + (
            " and again in backward (the root stays gathered)"
            if full_shard
            else " (kept for backward)"
        )
        + f", trainable units reduce-scattered in the last micro-batch; {8 * size}-bit"
    )
    return out, rule


def _ddp(inventory: ModelInventory, plan: TrainingPlan) -> tuple[list[Collective], str]:
    grads = sum(
        math.prod(shape) * count * DTYPE_BYTES[dtype]
        for shape, count, dtype in trainable_tensors(inventory, plan)
    )
    out: list[Collective] = []
    if grads <= DDP_FIRST_BUCKET_BYTES:
        out.append(Collective(ALL_REDUCE, "backward", "gradient bucket", grads, 1, LAST, True))
    else:
        rest = grads - DDP_FIRST_BUCKET_BYTES
        full, last = divmod(rest, DDP_BUCKET_BYTES)
        if not last:
            full, last = full - 1, DDP_BUCKET_BYTES
        out.append(
            Collective(
                ALL_REDUCE, "backward", "first gradient bucket", DDP_FIRST_BUCKET_BYTES, 1, LAST
            )
        )
        if full:
            out.append(
                Collective(ALL_REDUCE, "backward", "gradient bucket", DDP_BUCKET_BYTES, full, LAST)
            )
        out.append(Collective(ALL_REDUCE, "backward", "last gradient bucket", last, 1, LAST, True))
    return (
        out,
        "DDP: every trainable gradient all-reduced in 25 MiB buckets (first 1 MiB) in the last micro-batch",
    )


def _buckets(numel: int, bucket: int) -> tuple[int, int, int]:
    """(full buckets, elements in the last one, buckets) of ``numel`` elements."""
    if numel <= 0:
        return 0, 0, 0
    full, last = divmod(numel, bucket)
    if not last:
        full, last = full - 1, bucket
    return full, last, full + 1


def _zero(inventory: ModelInventory, plan: TrainingPlan) -> tuple[list[Collective], str]:
    n, size, layers = plan.num_gpus, comm_itemsize(plan), max(inventory.num_layers, 1)
    trainable = inventory.trainable_params if plan.uses_adapters else inventory.total_params
    bucket = max(inventory.hidden_size**2, 1)  # reduce_bucket_size, as the harness writes it
    out: list[Collective] = []
    stage3 = plan.strategy == "zero3"
    reduce_when = LAST if plan.strategy == "zero1" else EVERY
    full, last, _ = _buckets(trainable, bucket)
    phase = "step" if plan.strategy == "zero1" else "backward"
    hides = stage3  # overlap_comm: on for ZeRO-3 only
    if full:
        out.append(
            Collective(
                REDUCE_SCATTER,
                phase,
                "gradient bucket",
                padded(bucket, n) * size,
                full,
                reduce_when,
                not hides,
            )
        )
    if last:
        out.append(
            Collective(
                REDUCE_SCATTER,
                phase,
                "last gradient bucket",
                padded(last, n) * size,
                1,
                reduce_when,
                True,
            )
        )
    if not stage3:
        g_full, g_last, _ = _buckets(trainable, ZERO_ALLGATHER_BUCKET)
        if g_full:
            out.append(
                Collective(
                    ALL_GATHER,
                    "step",
                    "updated parameters",
                    padded(ZERO_ALLGATHER_BUCKET, n) * size,
                    g_full,
                    LAST,
                    True,
                )
            )
        if g_last:
            out.append(
                Collective(
                    ALL_GATHER,
                    "step",
                    "updated parameters",
                    padded(g_last, n) * size,
                    1,
                    LAST,
                    True,
                )
            )
    else:
        threshold = ZERO_PERSISTENCE_HIDDEN * inventory.hidden_size
        per_element = 2 * size if plan.quant in ("nf4", "fp4") else 0
        modules: list[tuple[str, int, int, bool]] = []  # (what, numel, count, in layers)
        for g in inventory.linears:
            numel = (
                (g.weight_params + 1) // per_element
                if per_element and g.quantizable
                else g.weight_params
            )
            modules.append((f"{g.name} weight", numel, g.count, g.count % layers == 0))
        roles = inventory.params_by_role
        modules += [
            ("embedding", roles["embedding"], 1, False),
            ("lm_head", roles["lm_head"], 1, False),
            # 3-D MoE expert tensors, routers: one module's worth per layer
            ("other parameters", roles["other"] // layers, layers, True),
        ]
        if plan.uses_adapters:
            modules += [
                ("adapter tensor", t.numel, t.count, t.in_layers)
                for t in _trainable(inventory, plan)
            ]
        persistent_trainable = 0
        for what, numel, count, in_layers in modules:
            if numel < threshold:
                if what == "adapter tensor" or plan.method == "full":
                    persistent_trainable += numel * count
                continue
            nbytes = padded(numel, n) * size
            first = count // layers if in_layers else count if what == "embedding" else 0
            for exposed, k in ((True, first), (False, count - first)):
                if k:
                    out.append(Collective(ALL_GATHER, "forward", what, nbytes, k, EVERY, exposed))
            out.append(Collective(ALL_GATHER, "backward", what, nbytes, count, EVERY))
        if plan.method == "full":  # norms and biases: whole on every GPU, updated by each
            gathered = sum(c.nbytes // size * c.count for c in out if c.phase == "backward")
            persistent_trainable = max(inventory.total_params - gathered, 0)
        if persistent_trainable:
            out.append(
                Collective(
                    ALL_GATHER,
                    "step",
                    "updated persistent parameters",
                    padded(persistent_trainable, n) * size,
                    1,
                    LAST,
                    True,
                )
            )
    out.append(Collective(ALL_REDUCE, "step", "gradient norm", 4, 1, LAST, True))
    stage = plan.strategy[-1]
    rule = {
        "1": "ZeRO-1: gradients reduce-scattered at the boundary, updated parameters all-gathered",
        "2": "ZeRO-2: gradients reduce-scattered in every backward (compute stream), updated parameters all-gathered",
        "3": "ZeRO-3: partitioned parameters all-gathered in forward and backward, gradients reduce-scattered",
    }[stage]
    return out, rule + f"; {8 * size}-bit"


def communication_volume(
    inventory: ModelInventory, plan: TrainingPlan
) -> CommunicationVolume | None:
    """The collectives of one optimizer step of ``plan`` (None for one GPU)."""
    if plan.num_gpus <= 1:
        return None
    if plan.strategy in ("fsdp", "fsdp-grad-op"):
        collectives, rule = _fsdp(inventory, plan)
    elif plan.strategy == "ddp":
        collectives, rule = _ddp(inventory, plan)
    else:
        collectives, rule = _zero(inventory, plan)
    return CommunicationVolume(plan, tuple(c for c in collectives if c.count and c.nbytes), rule)


# -- time ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CommunicationTime:
    """A step's collectives on a link: their seconds and what of them the compute hides."""

    volume: CommunicationVolume
    link: Link
    seconds: dict[str, float]  # every collective's time per step, by phase
    exposed: dict[str, float]  # what the step waits for, by phase
    phase_seconds: dict[str, float]  # one micro-batch's forward / backward on the GPU

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def exposed_seconds(self) -> float:
        return sum(self.exposed.values())

    def exposed_share(self, step_seconds: float) -> float:
        """What the step waits for the collectives, as a share of the step."""
        return self.exposed_seconds / step_seconds if step_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "link": self.link.name,
            "bus_gbps": self.link.bus_gbps,
            "link_derivation": self.link.derivation,
            "bus_bandwidth_source": self.link.bus_bandwidth_source,
            "seconds": dict(self.seconds),
            "exposed_seconds": dict(self.exposed),
            "total_seconds": self.total_seconds,
            "exposed_total_seconds": self.exposed_seconds,
            "phase_seconds": dict(self.phase_seconds),
            **self.volume.to_dict(),
        }


def communication_time(
    volume: CommunicationVolume, link: Link, phase_seconds: Mapping[str, float]
) -> CommunicationTime:
    """``volume`` on ``link``; ``phase_seconds``: one micro-batch's ``forward`` and
    ``backward`` (recompute included) as priced on the GPU, the compute collectives can hide
    behind (module docstring)."""
    n, micro_batches = volume.plan.num_gpus, volume.plan.grad_accum
    times = {c: collective_seconds(c.kind, c.nbytes, n, link) * c.count for c in volume.collectives}
    seconds = dict.fromkeys(PHASES, 0.0)
    exposed = dict.fromkeys(PHASES, 0.0)
    for c, t in times.items():
        seconds[c.phase] += t * (micro_batches if c.when == EVERY and c.phase != "step" else 1)
        if c.phase == "step":
            exposed["step"] += t
    for phase in ("forward", "backward"):
        for micro in range(micro_batches):
            now = [
                (c, t)
                for c, t in times.items()
                if c.phase == phase and c.runs_in(micro, micro_batches)
            ]
            hidden = sum(t for c, t in now if not c.exposed)
            exposed[phase] += sum(t for c, t in now if c.exposed)
            exposed[phase] += max(0.0, hidden - phase_seconds.get(phase, 0.0))
    return CommunicationTime(volume, link, seconds, exposed, dict(phase_seconds))
