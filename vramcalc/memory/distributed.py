"""Per-GPU memory under data parallelism: DDP, FSDP, DeepSpeed ZeRO 1/2/3.

Each GPU runs the plan's micro-batch, so activations and logits are per GPU
and unchanged. What changes is which persistent tensors each GPU holds, and
the communication buffers. Rules (torch.distributed.fsdp, torch DDP's
Reducer, DeepSpeed ``stage_1_and_2.py`` / ``stage3.py`` defaults as
accelerate configures them with ``auto`` values):

* ``ddp``: everything replicated. The Reducer keeps gradient buckets that
  are a second copy of every trainable gradient (``gradient_as_bucket_view``
  is False by default in accelerate), live for the whole run.
* ``zero1``: optimizer states / N. ``zero2``: + gradients / N, with a
  reduce bucket (``reduce_bucket_size`` auto = hidden²) of gradients.
* ``zero3``: + weights / N; parameters are gathered per layer with a prefetch
  bucket (``stage3_prefetch_bucket_size`` auto = 0.9·hidden²); we hold the
  gathered current layer and the prefetched next one.
* ``fsdp`` (FULL_SHARD, transformer-layer auto wrap, ``use_orig_params``):
  weights, gradients and optimizer states / N; the root unit (embeddings,
  head, final norm) stays gathered from forward to backward; two decoder
  layers are gathered at once (current + backward prefetch); one layer's
  unsharded gradients wait for their reduce-scatter.
* ``fsdp-grad-op`` (SHARD_GRAD_OP): gradients and optimizer states / N;
  parameters gathered in forward stay gathered until backward, so every
  weight is live unsharded during the step (plus its 1/N shard).
* QLoRA under FSDP/ZeRO-3 stores 4-bit weights with
  ``bnb_4bit_quant_storage=bf16`` so they can be flattened and sharded (the
  same packed bytes) and skips ``prepare_model_for_kbit_training``, so the
  non-quantized parameters stay in the load dtype (peft's FSDP-QLoRA recipe).
* Full fine-tuning under FSDP1 with mixed precision: accelerate upcasts the
  trainable shards to fp32, so weights, gradients and optimizer states are
  counted as fp32 master weights whatever ``--dtype``.
* ``--cpu-offload``: optimizer states move to CPU (and, for fsdp/zero3, the
  parameter and gradient shards too).
* Every process also holds NCCL communicator buffers (calibration file).

These rules answer ``--allocator-model approximate``. With the default (``simulate``),
multi-GPU plans are traced instead (``memory/worldsim.py``): FSDP1 and DDP, and DeepSpeed
ZeRO-1/2/3 with DeepSpeed's own code (``trace/zerotrace.py``, deepspeed installed;
ZeRO-Offload, ``--cpu-offload``, and 4-bit and int8 ZeRO-3 included).
"""

from __future__ import annotations

from dataclasses import dataclass

from vramcalc.inventory import ModelInventory
from vramcalc.training_plan import TrainingPlan

SHARDED_PARAM_STRATEGIES = ("fsdp", "fsdp-grad-op", "zero3")


def effective_plan(plan: TrainingPlan) -> TrainingPlan:
    """The plan whose single-GPU rules give the per-GPU tensors before sharding.

    FSDP1 mixed precision keeps fp32 master shards of trainable parameters
    (accelerate upcasts them), so full fine-tuning under FSDP is fp32 master.
    """
    if plan.num_gpus > 1 and plan.method == "full" and plan.strategy in ("fsdp", "fsdp-grad-op"):
        return plan.with_(dtype="fp32")
    return plan


def skips_kbit_upcast(plan: TrainingPlan) -> bool:
    """FSDP/ZeRO-3 QLoRA keeps non-quantized parameters in the load dtype (no fp32 upcast)."""
    return plan.is_kbit and plan.num_gpus > 1 and plan.strategy in SHARDED_PARAM_STRATEGIES


@dataclass(frozen=True)
class ShardedStatic:
    """Persistent per-GPU bytes after sharding, plus communication buffers."""

    weights_bytes: int
    adapter_bytes: int
    optimizer_state_bytes: int
    gradient_bytes: int  # all gradients at the optimizer step, per GPU
    gathered_weights_bytes: int  # unsharded parameters held while computing
    comm_buffer_bytes: int  # DDP buckets, ZeRO reduce bucket, FSDP unsharded grads
    nccl_bytes: int
    rule: str


def layer_fraction(inventory: ModelInventory) -> tuple[float, float]:
    """(one decoder layer, root unit) as fractions of the base parameters."""
    roles = inventory.params_by_role
    root = roles["embedding"] + roles["lm_head"]
    per_layer = (inventory.total_params - root) / max(inventory.num_layers, 1)
    total = max(inventory.total_params, 1)
    return per_layer / total, root / total


def shard_static(
    inventory: ModelInventory,
    plan: TrainingPlan,
    weights_bytes: int,
    adapter_bytes: int,
    optimizer_state_bytes: int,
    gradient_bytes: int,
    compute_itemsize: int,
    nccl_bytes: int,
) -> ShardedStatic:
    """Per-GPU persistent memory of ``plan`` (``plan.num_gpus`` data-parallel ranks)."""
    n = plan.num_gpus
    if n == 1:
        return ShardedStatic(
            weights_bytes,
            adapter_bytes,
            optimizer_state_bytes,
            gradient_bytes,
            0,
            0,
            0,
            "single GPU: nothing sharded",
        )
    strategy = plan.strategy
    layer, root = layer_fraction(inventory)
    hidden2 = inventory.hidden_size**2
    weights, adapters, opt, grads = (
        weights_bytes,
        adapter_bytes,
        optimizer_state_bytes,
        gradient_bytes,
    )
    gathered = comm = 0
    if strategy == "ddp":
        comm = gradient_bytes
        rule = "DDP: all replicated + gradient buckets (a second copy of the gradients)"
    elif strategy in ("zero1", "zero2", "zero3"):
        opt //= n
        rule = "ZeRO-1: optimizer states sharded"
        if strategy in ("zero2", "zero3"):
            grads //= n
            comm = min(gradient_bytes, hidden2 * 4)  # reduce bucket, fp32 gradients
            rule = "ZeRO-2: optimizer states and gradients sharded, one reduce bucket"
        if strategy == "zero3":
            weights //= n
            adapters //= n
            gathered = int(2 * layer * weights_bytes) + int(0.9 * hidden2 * compute_itemsize)
            rule = "ZeRO-3: weights, gradients and optimizer states sharded; a layer gathered + prefetch bucket"
    elif strategy == "fsdp":
        weights //= n
        adapters //= n
        opt //= n
        grads //= n
        gathered = int((2 * layer + root) * weights_bytes)
        comm = gradient_bytes // max(inventory.num_layers, 1)
        rule = "FSDP FULL_SHARD: all sharded; root unit + 2 decoder layers gathered; one layer's grads before reduce-scatter"
    else:  # fsdp-grad-op
        opt //= n
        grads //= n
        gathered = weights_bytes - weights_bytes // n
        comm = gradient_bytes // max(inventory.num_layers, 1)
        weights = weights_bytes // n
        rule = "FSDP SHARD_GRAD_OP: gradients and optimizer states sharded; weights gathered for the whole step"
    if plan.cpu_offload:
        opt = 0
        if strategy in ("fsdp", "zero3"):
            # FSDP offload_params / ZeRO-3 offload_param move every parameter shard,
            # frozen base weights included, to CPU
            weights = 0
            grads = 0
        rule += "; CPU offload of optimizer states" + (
            " and parameter/gradient shards" if strategy in ("fsdp", "zero3") else ""
        )
    return ShardedStatic(weights, adapters, opt, grads, gathered, comm, nccl_bytes, rule)
