"""Rank 0 of a DeepSpeed ZeRO-1/2 world: DeepSpeed's own code traced on fake tensors
(vramcalc/trace/zerotrace.py, zerofake.py).

Tiny Llama (tests/conftest.py): hidden 64, 2 layers, q/o 64x64, k/v 64x32. LoRA r=8 on
q, k, v, o: A is 8 x in, B is out x 8, so a layer's adapters hold 8*(64+64) + 8*(64+32) +
8*(64+32) + 8*(64+64) = 3,584 elements and the model's N = 7,168, in this order (q A, q B,
k A, k B, v A, v B, o A, o B per layer; peft's fp32 adapters, cast to bf16 by the engine).

DeepSpeed 0.19.8 ``stage_1_and_2.py`` (``DeepSpeedZeroOptimizer.__init__``,
``initialize_optimizer_states``, ``copy_grads_in_partition``, ``setup_buckets``):

* the flat bf16 buffer: N padded to a multiple of ``2 * world_size`` elements
  (``nccl_start_alignment_factor`` 2 per rank; ``parameter_alignment`` is off by default:
  no padding between parameters);
* rank 0's partition: the flat size / world_size; its fp32 master copy (``.clone()`` in
  bf16, then ``.to(fp32)``), an fp32 gradient partition made and dropped at once, two fp32
  Adam states (torch AdamW, ``zeros_like`` at the first step) and, at each step, the fp32
  gradient partition (``flatten(averaged_gradients).to(fp32)``);
* the reduce bucket (``contiguous_gradients``): ``reduce_bucket_size`` = hidden² = 4,096
  bf16 elements; the contiguous gradients of rank 0's partition: every parameter that starts
  in it, whole.
"""

from __future__ import annotations

import collections
import functools

import pytest

from tests.conftest import TINY_LLAMA, live_bytes
from vramcalc.errors import InvalidPlanError, SimulationError
from vramcalc.memory.allocator import ALLOC, FREE
from vramcalc.training_plan import TrainingPlan

pytest.importorskip("deepspeed")

BF16, FP32 = 2, 4
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
LAYER_ADAPTERS = (512, 512, 512, 256, 512, 256, 512, 512)  # q A, q B, k A, k B, v A, v B, o A, o B
N = 2 * sum(LAYER_ADAPTERS)  # 7,168
BUCKET = 64 * 64  # reduce_bucket_size = hidden²


def plan(**fields) -> TrainingPlan:  # type: ignore[no-untyped-def]
    base = dict(
        model="tiny",
        seq_len=16,
        batch_size=2,
        num_gpus=2,
        gradient_checkpointing=True,
        method="lora",
        targets=QKVO,
    )
    return TrainingPlan(**{**base, **fields})


@functools.cache
def traced(**fields):  # type: ignore[no-untyped-def]
    from vramcalc.trace.worldtrace import trace_world

    return trace_world(TINY_LLAMA, plan(**fields))


def labelled(trace, start: str, stop: str) -> collections.Counter:  # type: ignore[no-untyped-def]
    """(aten op, bytes) -> count of the allocations of 1 KiB or more between two markers."""
    at = dict(trace.markers)
    return collections.Counter(
        (trace.labels[i], trace.events[i][2])
        for i in range(at[start], at[stop])
        if trace.events[i][0] == ALLOC and trace.events[i][2] >= 1024
    )


def flat_and_partition(world_size: int) -> tuple[int, int]:
    alignment = 2 * world_size
    flat = -(-N // alignment) * alignment
    return flat, flat // world_size


def partition_params(partition: int) -> int:
    """Elements of the parameters that start in rank 0's partition (whole)."""
    total = start = 0
    for numel in LAYER_ADAPTERS * 2:
        if start < partition:
            total += numel
        start += numel
    return total


@pytest.mark.parametrize("world_size", [2, 3])
def test_zero2_lora_wrap_allocates_the_flat_buffer_and_the_fp32_master_partition(world_size):
    trace = traced(strategy="zero2", num_gpus=world_size)
    flat, partition = flat_and_partition(world_size)
    assert (flat, partition) == ((7168, 3584) if world_size == 2 else (7170, 2390))
    wrap = labelled(trace, "wrap", "step0")
    # peft's fp32 adapters cast to bf16 by the engine (the q/k/v/o A and B of 512 elements)
    assert wrap[("_to_copy", 512 * BF16)] == 2 * 6
    del wrap[("_to_copy", 512 * BF16)]
    assert wrap == {
        ("cat", flat * BF16): 1,  # the flat bf16 buffer of the trainable parameters
        ("clone", partition * BF16): 1,  # rank 0's partition copied ...
        ("_to_copy", partition * FP32): 1,  # ... to its fp32 master copy
        ("zeros", partition * FP32): 1,  # the fp32 gradient partition (dropped at once)
    }


def test_zero2_lora_step_allocates_adam_states_and_the_gradient_partition():
    trace = traced(strategy="zero2")
    flat, partition = flat_and_partition(2)
    backward = labelled(trace, "step0_backward0", "step0_optimizer")
    assert backward[("empty", BUCKET * BF16)] == 1  # the reduce bucket (ipg buffer)
    assert backward[("empty", partition_params(partition) * BF16)] == 1  # grads_in_partition
    optimizer = labelled(trace, "step0_optimizer", "step1")
    assert optimizer[("zeros_like", partition * FP32)] == 2  # exp_avg, exp_avg_sq
    assert optimizer[("_to_copy", partition * FP32)] == 1  # the fp32 gradient partition
    # the second step makes no new states
    assert labelled(trace, "step1_optimizer", "step2")[("zeros_like", partition * FP32)] == 0


def test_zero2_frees_other_ranks_gradients_as_buckets_fill_where_zero1_keeps_them():
    """ZeRO-1 reduces every gradient at the end of backward; ZeRO-2 reduces each bucket as it
    fills and drops the gradients rank 0 does not own: its backward holds less, the rest of
    the step is the same."""

    def backward_peak(trace) -> int:  # type: ignore[no-untyped-def]
        at, live, peak = dict(trace.markers), {}, 0
        for index, (op, handle, nbytes) in enumerate(trace.events[: at["step0_optimizer"]]):
            if op == ALLOC:
                live[handle] = nbytes
            elif op == FREE:
                live.pop(handle, None)
            if index >= at["step0_backward0"]:
                peak = max(peak, sum(live.values()))
        return peak

    zero1, zero2 = traced(strategy="zero1", method="full"), traced(strategy="zero2", method="full")
    assert backward_peak(zero1) > backward_peak(zero2)
    assert labelled(zero1, "wrap", "step0") == labelled(zero2, "wrap", "step0")
    assert labelled(zero1, "step0_optimizer", "end") == labelled(zero2, "step0_optimizer", "end")


def test_full_zero2_flattens_trainers_two_parameter_groups_with_an_empty_cache_between():
    """Trainer's optimizer has two groups (weight decay; biases and norms without), and ZeRO
    makes a flat buffer and an fp32 partition per group, calling ``empty_cache`` before each
    flatten (``stage_1_and_2.py`` 449): the second one comes after the first group's loaded
    weights were freed, so their segments go back to the driver (the real runs' segment_free
    run). Tiny Llama: decay group 256x64 embedding and head + 2 x 36,864 = 106,496 elements;
    norms 2 x 2 x 64 + 64 = 320 (both multiples of 2 * world_size: no padding)."""
    from vramcalc.memory.allocator import EMPTY_CACHE

    trace = traced(strategy="zero2", method="full")
    at = dict(trace.markers)
    decay, norms = 106_496, 320
    wrap = [
        (trace.labels[i], nbytes) if op == ALLOC else op
        for i, (op, _, nbytes) in enumerate(trace.events[at["wrap"] : at["step0"]], at["wrap"])
        if op == EMPTY_CACHE or (op == ALLOC and trace.labels[i] in ("cat", "clone", "_to_copy"))
    ]
    assert wrap == [
        EMPTY_CACHE,
        ("cat", decay * BF16),  # group 0 flattened
        ("clone", decay // 2 * BF16),  # rank 0's partition ...
        ("_to_copy", decay // 2 * FP32),  # ... its fp32 master copy
        EMPTY_CACHE,  # the loaded weights of group 0 are free by now
        ("cat", norms * BF16),  # group 1: the norms
        ("clone", norms // 2 * BF16),
        ("_to_copy", norms // 2 * FP32),
    ]


def test_seam_simulates_zero_plans():
    from vramcalc.memory.worldsim import seam_simulation

    simulation = seam_simulation("tiny", TINY_LLAMA, plan(strategy="zero2"))
    assert simulation is not None
    assert simulation.peak_allocated_bytes["default"] > 0
    offload = seam_simulation("tiny", TINY_LLAMA, plan(strategy="zero2", cpu_offload=True))
    assert offload is not None  # ZeRO-Offload: simulated, its partitions on the host
    assert offload.peak_allocated_bytes["default"] < simulation.peak_allocated_bytes["default"]
    # int8 weights under ZeRO-3: simulated as well, the trace replayed
    from vramcalc.memory.worldreplay import replay

    int8 = seam_simulation("tiny", TINY_LLAMA, plan(strategy="zero3", quant="int8"))
    replayed = replay(traced(strategy="zero3", quant="int8"))
    assert int8.peak_allocated_bytes["default"] == replayed.peak_allocated_bytes
    assert int8.peak_reserved_bytes["default"] == replayed.peak_reserved_bytes


def test_zero_without_deepspeed_is_an_error_naming_the_install_and_the_way_out(monkeypatch):
    import vramcalc.trace.worldtrace as worldtrace
    from vramcalc.memory.worldsim import seam_simulation

    monkeypatch.setattr(worldtrace, "has_deepspeed", lambda: False)
    with pytest.raises(InvalidPlanError, match="pip install deepspeed"):
        worldtrace.check_world_plan(plan(strategy="zero1"))
    with pytest.raises(SimulationError) as err:
        seam_simulation("tiny", TINY_LLAMA, plan(strategy="zero2", seq_len=8))
    assert "pip install deepspeed" in str(err.value)
    assert "--allocator-model approximate" in str(err.value)


def test_zero2_offload_keeps_the_fp32_master_partition_and_adam_states_off_the_device():
    """ZeRO-Offload (``offload_optimizer`` cpu, pinned): ``self.device`` is ``cpu``
    (``stage_1_and_2.py`` 278), so the fp32 master partition, its gradient, the pinned bf16
    copy and Trainer's AdamW states are host memory; the GPU keeps the flat bf16 buffer, the
    bf16 partition cloned before its copy to the host, the reduce bucket and a bf16 staging
    buffer of the largest parameter (``temp_grad_buffer_for_gpu_offload``, 646-661); the
    gradients of rank 0's partition go to the host from the bucket (no ``grads_in_partition``
    on the device, 2161-2177)."""
    trace = traced(strategy="zero2", cpu_offload=True)
    flat, partition = flat_and_partition(2)
    wrap = labelled(trace, "wrap", "step0")
    assert wrap[("_to_copy", 512 * BF16)] == 2 * 6  # peft's fp32 adapters cast to bf16
    del wrap[("_to_copy", 512 * BF16)]
    assert wrap == {
        ("cat", flat * BF16): 1,  # the flat bf16 buffer, on the GPU
        ("clone", partition * BF16): 1,  # rank 0's partition cloned, then moved to the host
        ("zeros", 512 * BF16): 1,  # temp_grad_buffer_for_gpu_offload: the largest parameter
    }
    backward = labelled(trace, "step0_backward0", "step0_optimizer")
    assert backward[("empty", BUCKET * BF16)] == 1  # the reduce bucket
    assert backward[("empty", partition_params(partition) * BF16)] == 0  # no grads_in_partition
    markers = [name for name, _ in trace.markers]
    for step in ("step0_optimizer", "step1_optimizer", "step2_optimizer"):
        # Adam states, the fp32 gradient partition, the update: all the host's
        assert labelled(trace, step, markers[markers.index(step) + 1]) == {}


# -- ZeRO-3 ------------------------------------------------------------------------------------
#: base elements: 2 layers of 36,992 (q 64x64, k, v 64x32, o 64x64, gate, up, down 64x128,
#: 2 norms of 64) + embedding, head 256x64 and the final norm (tests/trace/test_worldtrace.py)
BASE = 2 * 36_992 + 32_832
ROTARY = 64  # the rotary embedding's buffers


def test_zero3_lora_load_leaves_rank0_its_partition_of_every_weight_and_whole_adapters():
    """zero.Init partitions each weight as it is made (every size here is even: halves, no
    padding); peft's fp32 adapters come after, whole, until deepspeed.initialize."""
    trace = traced(strategy="zero3")
    at = dict(trace.markers)
    assert live_bytes(trace, "wrap") == BASE // 2 * BF16 + N * FP32 + ROTARY
    # loading gathers each module's weights whole (the embedding's 256x64 the largest)
    assert max(trace.events[i][2] for i in range(at["load"], at["wrap"])) == 256 * 64 * BF16


def test_zero3_offload_keeps_partitions_on_the_host_and_copies_each_to_the_device_to_gather():
    """ZeRO-3 with ``offload_param`` cpu: ``zero.Init`` partitions onto its remote device
    (``partition_parameters.py`` 1161-1169, 1820-1843), so after the load the device holds only
    the whole fp32 adapters and the rotary buffers; each gather copies rank 0's half to the
    GPU (``ds_tensor.to(current_device_name())``, 1396) on the all-gather stream beside the
    whole buffer; the optimizer's fp32 partitions and Adam states are the host's."""
    trace = traced(strategy="zero3", cpu_offload=True)
    at = dict(trace.markers)
    assert live_bytes(trace, "wrap") == N * FP32 + ROTARY  # no base partition on the device
    side = collections.Counter(
        (trace.labels[i], trace.events[i][2])
        for i in range(at["step0"], at["step0_backward0"])
        if trace.events[i][0] == ALLOC and trace.streams[i] != 0
    )
    for numel, count in ((256 * 64, 2), (64 * 128, 2 * 3), (64 * 64, 2 * 2), (64 * 32, 2 * 2)):
        assert side[("empty", numel * BF16)] == count  # the whole weight, as without offload
        assert side[("_to_copy", numel * BF16 // 2)] == count  # rank 0's half, host to device
    assert side[("_to_copy", 64 * BF16 // 2)] == 2 * 2 + 1  # the norms' halves
    on_device = traced(strategy="zero3")
    assert labelled(on_device, "step0_optimizer", "step1")[("zeros_like", 3584 * FP32)] == 2
    optimizer = labelled(trace, "step0_optimizer", "step1")
    assert not any(label in ("zeros_like", "_to_copy") and nbytes >= 3584 * FP32
                   for label, nbytes in optimizer)  # fmt: skip


#: a 4-bit weight as bitsandbytes packs it in bf16 (bnb_4bit_quant_storage): numel / 2 bytes
PACKED_4BIT = {64 * 32 // 2: 2 * 2, 64 * 64 // 2: 2 * 2, 64 * 128 // 2: 2 * 3}  # k, v; q, o; MLP


def test_zero3_qlora_keeps_each_gathered_4bit_weight_until_its_backward():
    """A quantized model loads without zero.Init (``zerotrace.loads_in_zero_init``): whole on
    the GPU, then partitioned by deepspeed.initialize. bitsandbytes' MatMul4Bit keeps a view
    of the gathered packed weight for backward (``B.view(-1, 1)``, ``ctx.tensors``), so
    ZeRO-3's release (``param.data`` swapped) does not free it: at the end of the first
    forward every 4-bit weight gathered on the all-gather stream is still allocated, where
    16-bit weights (DeepSpeed's ``F.linear`` saves the parameter) are all freed."""
    trace = traced(strategy="zero3", method="qlora", quant="nf4")
    # the load: every weight whole on the GPU before the wrap, none partitioned yet
    assert not any(label == "empty" for label, _ in labelled(trace, "load", "wrap"))

    def gathered_alive(trace) -> collections.Counter:  # type: ignore[no-untyped-def]
        at, live = dict(trace.markers), {}
        for index in range(at["step0"], at["step0_backward0"]):
            op, handle, nbytes = trace.events[index]
            if op == ALLOC and trace.streams[index] != 0:
                live[handle] = nbytes
            elif op == FREE:
                live.pop(handle, None)
        return collections.Counter(nbytes for nbytes in live.values() if nbytes >= 1024)

    assert gathered_alive(trace) == PACKED_4BIT
    assert gathered_alive(traced(strategy="zero3")) == {}


#: an int8 weight (bitsandbytes' Int8Params): numel bytes; k, v 64x32, q, o 64x64, MLP 64x128
INT8 = {64 * 32: 2 * 2, 64 * 64: 2 * 2, 64 * 128: 2 * 3}


def test_zero3_int8_keeps_each_loaded_weight_beside_its_partition_and_drops_each_gathered_one():
    """int8 weights load whole without zero.Init, as 4-bit ones. bitsandbytes'
    ``Int8Params._quantize`` makes the weight's data and its ``CB`` one tensor, and an
    attribute is not what ZeRO-3 partitions: after deepspeed.initialize rank 0 holds every
    loaded int8 weight (``CB``) and its int8 half (the partition). In forward ZeRO-3 gathers
    each weight whole in int8 on the all-gather stream, and ``Linear8bitLt.forward`` (which
    multiplies with ``state.CB``) then sets ``weight.data = state.CB``: no gathered weight is
    left at the end of the forward (an H100's allocator trace, probe_zeroint8_2026-12-07)."""
    trace = traced(strategy="zero3", quant="int8")
    at = dict(trace.markers)

    def live(stop: str) -> collections.Counter:
        alive: dict[int, tuple[str, int, int]] = {}
        for index in range(at[stop]):
            op, handle, nbytes = trace.events[index]
            if op == ALLOC:
                alive[handle] = (trace.labels[index], nbytes, trace.streams[index])
            elif op == FREE:
                alive.pop(handle, None)
        return collections.Counter(alive.values())

    wrapped = live("step0")
    for numel, count in INT8.items():
        assert wrapped[("load", numel, 0)] == count  # CB: the weight as loaded, whole
        assert wrapped[("empty", numel // 2, 0)] == count  # rank 0's int8 partition
    side = labelled(trace, "step0", "step0_backward0")
    for numel, count in INT8.items():
        assert side[("empty", numel)] == count  # each gathered whole, in int8
    assert not [key for key in live("step0_backward0") if key[2] != 0]


def test_zero3_gathers_each_weight_whole_on_its_allgather_stream():
    trace = traced(strategy="zero3")
    at = dict(trace.markers)
    side = collections.Counter(
        trace.events[i][2]
        for i in range(at["step0"], at["step0_backward0"])
        if trace.events[i][0] == ALLOC and trace.streams[i] != 0
    )
    assert side[256 * 64 * BF16] == 2  # embedding, head
    assert side[64 * 128 * BF16] == 2 * 3  # gate, up, down
    assert side[64 * 64 * BF16] == 2 * 2  # q, o
    assert side[64 * 32 * BF16] == 2 * 2  # k, v
    assert side[64 * BF16] == 2 * 2 + 1  # the norms (persistent: gathered once)


def test_zero3_frees_a_gathered_weight_at_its_release_not_at_its_backward():
    """zero.Init leaves ``F.linear`` as DeepSpeed's ``zero3_linear_wrap``, which saves the
    weight parameter for backward (aten's linear saves a ``weight.t()`` view, which would keep
    the gathered storage): the head's gathered 256x64 weight is freed when ZeRO-3 releases
    it after the head's forward, before the loss, and gathered again for its backward."""
    import torch

    trace = traced(strategy="zero3")
    at, live = dict(trace.markers), {}
    head = 256 * 64 * BF16
    for index in range(at["step0"], at["step0_backward0"]):
        op, handle, nbytes = trace.events[index]
        if op == ALLOC and trace.streams[index] != 0 and nbytes == head:
            live[handle] = index
        elif op == FREE:
            live.pop(handle, None)
    assert live == {}  # embedding and head: both gathered and freed in the forward
    gathered = [
        i
        for i in range(at["step0_backward0"], at["step0_optimizer"])
        if trace.events[i][0] == ALLOC and trace.streams[i] != 0 and trace.events[i][2] == head
    ]
    assert len(gathered) == 2  # head (first) and embedding (last), gathered again
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    assert torch.nn.functional.linear is not zero3_linear_wrap  # put back after the trace


def test_zero3_fetches_wait_on_the_oldest_of_more_than_two_pending_gathers():
    """The parameter coordinator's rate limiter (``partitioned_param_coordinator.py``
    400-411): fetch events that ``query()`` as done are dropped, and with more than two
    pending the host synchronizes on the oldest. On a GPU behind the host none reads done, so
    the trace holds those waits, each on a point before it (``replay(gpu_bound=True)``)."""
    trace = traced(strategy="zero3")
    at = dict(trace.markers)
    waits = [
        (now, upto)
        for now, upto in trace.sync_points
        if at["step0"] <= now < at["step0_backward0"] and upto < now
    ]
    assert len(waits) >= 10  # 2 layers of q, k, v, o, gate, up, down, norms; embedding, head


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_the_repeated_second_step_is_the_traced_third(strategy):
    """A ZeRO trace is every layer's, with two steps traced and the second repeated
    (ZeRO-3 records its module order in the first step and prefetches from the second)."""
    from vramcalc.trace.worldtrace import trace_world

    repeated = traced(strategy=strategy, method="full")
    whole = trace_world(TINY_LLAMA, plan(strategy=strategy, method="full"), unroll=False)
    assert repeated.markers == whole.markers
    assert [(op, nbytes) for op, _, nbytes in repeated.events] == [
        (op, nbytes) for op, _, nbytes in whole.events
    ]
    assert repeated.streams == whole.streams
