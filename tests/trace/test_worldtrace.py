"""Rank 0 of an FSDP1 / DDP world traced on fake tensors (vramcalc/memory/worldtrace.py).

Tiny Llama (tests/conftest.py): hidden 64, MLP 128, 2 layers, 4 heads / 2 KV heads (head
dim 16), vocab 256, untied. A decoder layer holds q 64x64 + k, v 64x32 + o 64x64 + gate,
up, down 64x128 + 2 norms of 64 = 36,992 parameters; the root unit (embedding, final norm,
head) 16,384 + 64 + 16,384 = 32,832. Every unit divides by 2, so rank 0 of 2 holds exactly
half of each flat parameter (18,496 and 16,416 elements), with no padding.
"""

from __future__ import annotations

import collections
import functools

import pytest

from tests.conftest import TINY_LLAMA, live_bytes
from vramcalc.errors import InvalidPlanError
from vramcalc.memory.allocator import ALLOC, FREE, AllocatorConfig
from vramcalc.training_plan import TrainingPlan

LAYER, ROOT = 36_992, 32_832
SHARDS = LAYER // 2 * 2 + ROOT // 2  # rank 0's elements of the 3 units (2 layers + root)
BF16, FP32 = 2, 4
CUBLAS = 2 * 32 << 20  # forward and backward thread workspaces (steptrace)
UNSHARD, POST_BACKWARD, PRE_UNSHARD = 1, 2, 3  # FSDP1 creates its streams in this order


def plan(**fields) -> TrainingPlan:  # type: ignore[no-untyped-def]
    base = dict(model="tiny", seq_len=16, batch_size=2, num_gpus=2, gradient_checkpointing=True)
    return TrainingPlan(**{**base, **fields})


@functools.cache
def traced(**fields):  # type: ignore[no-untyped-def]
    from vramcalc.trace.worldtrace import trace_world

    return trace_world(TINY_LLAMA, plan(**fields))


def allocations(trace, start: str, stop: str) -> collections.Counter:  # type: ignore[no-untyped-def]
    """(stream, bytes) -> count of the allocations between two markers."""
    at = dict(trace.markers)
    return collections.Counter(
        (trace.streams[i], trace.events[i][2])
        for i in range(at[start], at[stop])
        if trace.events[i][0] == ALLOC
    )


def labelled(trace, start: str, stop: str) -> collections.Counter:  # type: ignore[no-untyped-def]
    """(aten op, stream, bytes) -> count of the allocations between two markers."""
    at = dict(trace.markers)
    return collections.Counter(
        (trace.labels[i], trace.streams[i], trace.events[i][2])
        for i in range(at[start], at[stop])
        if trace.events[i][0] == ALLOC
    )


def test_fsdp_full_rank0_holds_half_of_every_flat_parameter_in_fp32():
    trace = traced(method="full", strategy="fsdp")
    # after the wrap: fp32 shards (accelerate upcasts trainable flat parameters) and the bf16
    # shards the original parameters still view until the first forward; 64 B: rotary buffer
    assert live_bytes(trace, "step0") == SHARDS * FP32 + SHARDS * BF16 + 64


def test_fsdp_full_all_gathers_each_unit_on_the_unshard_stream_and_frees_it():
    trace = traced(method="full", strategy="fsdp")
    made = allocations(trace, "step1", "step2")
    gathered = labelled(trace, "step1", "step2")  # FSDP allocates by resizing a storage
    # bf16 unsharded layers: forward and backward (FULL_SHARD reshards after forward); the
    # root stays gathered from forward to backward
    assert gathered[("resize", UNSHARD, LAYER * BF16)] == 2 * 2
    assert gathered[("resize", UNSHARD, ROOT * BF16)] == 1
    # each unit's flat gradient, concatenated where its parameter views were made
    assert gathered[("cat", UNSHARD, LAYER * BF16)] == 2
    assert gathered[("cat", UNSHARD, ROOT * BF16)] == 1
    # the bf16 copy of each fp32 shard to all-gather (mixed precision), on pre_unshard
    assert made[(PRE_UNSHARD, LAYER // 2 * BF16)] == 2 * 2
    # reduce-scatter output (bf16 half) and its fp32 cast, on post_backward
    assert made[(POST_BACKWARD, LAYER // 2 * BF16)] == 2
    assert made[(POST_BACKWARD, LAYER // 2 * FP32)] == 2
    # nothing is left gathered between steps
    assert live_bytes(trace, "step2") == live_bytes(trace, "step1")


#: the tiny Llama with its head tied to the embedding, and a vocabulary whose embedding
#: (81,920 x 64 in bf16: 10 MiB) takes segments of its own (>= kMinLargeAlloc)
TIED_VOCAB = 81_920
TIED_EMBEDDING = TIED_VOCAB * 64  # the root unit: embedding (= head) + final norm (64)


def test_fsdp_backward_runs_on_the_unshard_stream_where_the_parameter_views_were_made():
    """FSDP1 makes each unit's parameter views (split + view of the unsharded flat parameter)
    on its unshard stream; autograd runs their backward there: the cat of a unit's gradients
    into its flat gradient, and the add of a tied parameter's two gradients (embedding and
    head), as the allocator traces of real runs show (data/measurements/
    h100_fsdptrace_2026-12-06_traces: every unit's cat and the tied embedding's add on the
    unshard stream)."""
    from vramcalc.memory.worldreplay import replay
    from vramcalc.trace.worldtrace import trace_world

    config = {**TINY_LLAMA, "tie_word_embeddings": True, "vocab_size": TIED_VOCAB}
    trace = trace_world(config, plan(method="full", strategy="fsdp"))
    made = labelled(trace, "step1_backward0", "step1_optimizer")
    root = TIED_EMBEDDING + 64
    flat_gradients = {k: n for k, n in made.items() if k[0] == "cat" and k[2] >= LAYER * BF16}
    assert flat_gradients == {("cat", UNSHARD, LAYER * BF16): 2, ("cat", UNSHARD, root * BF16): 1}
    assert {k: n for k, n in made.items() if k[0] == "add" and k[1] != 0} == {
        ("add", UNSHARD, TIED_EMBEDDING * BF16): 1
    }
    # the two gradients added were made on the compute stream and used on the unshard one
    at = dict(trace.markers)
    summed = [
        trace.events[i][1]
        for i in range(at["step1_backward0"], at["step1_optimizer"])
        if trace.labels[i] in ("mm", "embedding_dense_backward")
        and trace.events[i][2] == TIED_EMBEDDING * BF16
    ]
    assert len(summed) == 2 and set(summed) <= trace.cross_stream
    # the unshard stream, which still holds the root's gathered parameter (12 MiB segment),
    # takes a 10 MiB segment for the add and a 12 MiB one for the cat in the first backward:
    # 220 MiB at the peak where the compute stream's cached blocks held both (210 MiB)
    assert replay(trace).peak_reserved_bytes == 220 << 20


def test_shard_grad_op_keeps_layers_gathered_into_backward():
    made = labelled(traced(method="full", strategy="fsdp-grad-op"), "step1", "step2")
    assert made[("resize", UNSHARD, LAYER * BF16)] == 2  # forward only


def test_cpu_offload_keeps_shards_on_the_host_and_copies_them_in():
    trace = traced(method="full", strategy="fsdp", cpu_offload=True)
    # shards, gradients and states on the host; only the rotary buffers (64 B) moved in
    assert live_bytes(trace, "step0") == 64
    made = allocations(trace, "step1", "step2")
    assert made[(PRE_UNSHARD, LAYER // 2 * FP32)] == 2 * 2  # the H2D copy of each shard
    assert labelled(trace, "step1", "step2")[("resize", UNSHARD, LAYER * BF16)] == 2 * 2
    assert allocations(trace, "step1_optimizer", "step2") == collections.Counter()


def test_ddp_buckets_are_a_second_copy_of_the_gradients_rebuilt_once():
    trace = traced(method="full", strategy="ddp")
    params = (2 * LAYER + ROOT) * BF16
    # replicated bf16 parameters + one bucket for all of them (find_unused_parameters off)
    assert live_bytes(trace, "step0") == 2 * params
    assert allocations(trace, "step1", "step1_optimizer")[(0, params)] == 1  # rebuilt
    assert allocations(trace, "step2", "step2_optimizer")[(0, params)] == 0


def test_qlora_fsdp_shards_the_packed_weights_and_keeps_the_quant_state():
    from vramcalc.trace.worldload import loads_on_gpu

    p = plan(method="qlora", strategy="fsdp", targets=("q_proj",))
    assert loads_on_gpu(p)
    trace = traced(method="qlora", strategy="fsdp", targets=("q_proj",))
    at = dict(trace.markers)
    loaded = live_bytes(trace, "wrap")
    # 7 linears per layer packed as bf16: (numel + 1) // 4 elements of 2 bytes
    linear = 4096 + 2048 + 2048 + 4096 + 3 * 8192
    packed = 2 * (linear // 4) * BF16
    assert at["wrap"] > 0 and loaded > packed
    made = allocations(trace, "step1", "step2")
    # each layer unit (packed weights + norms, bf16) all-gathered in forward and backward
    assert made[(UNSHARD, (linear // 4 + 128) * BF16)] == 2 * 2


def test_replay_gpu_bound_holds_cross_stream_blocks_until_a_host_wait():
    from vramcalc.memory.worldreplay import replay
    from vramcalc.trace.events import WorldTrace

    mib = 1 << 20
    events = ((ALLOC, 1, 64 * mib), (FREE, 1, 0), (ALLOC, 2, 64 * mib), (FREE, 2, 0))
    trace = WorldTrace(events, (1, 1, 1, 1), (), (), 0, "test", cross_stream=frozenset({1}))
    assert replay(trace).peak_reserved_bytes == 64 * mib
    assert replay(trace, gpu_bound=True).peak_reserved_bytes == 128 * mib
    waited = WorldTrace(events, (1, 1, 1, 1), (), ((2, 2),), 0, "test", cross_stream=frozenset({1}))
    assert replay(waited, gpu_bound=True).peak_reserved_bytes == 64 * mib
    # allocated drops at the free either way
    assert replay(trace, gpu_bound=True).peak_allocated_bytes == 64 * mib


def test_world_peaks_replay_under_both_allocator_modes():
    from vramcalc.memory.worldreplay import replay

    trace = traced(method="lora", strategy="fsdp")
    default = replay(trace)
    expandable = replay(trace, AllocatorConfig(expandable_segments=True))
    assert default.peak_allocated_bytes == expandable.peak_allocated_bytes > CUBLAS
    assert default.peak_reserved_bytes >= default.peak_allocated_bytes


@pytest.mark.parametrize(
    "fields, problem",
    [
        (dict(strategy="fsdp", num_gpus=1), "num_gpus"),
        (dict(strategy="fsdp", method="lora", quant="int8"), "int8"),
    ],
)
def test_plans_the_world_cannot_trace_are_refused(fields, problem):
    from vramcalc.trace.worldtrace import check_world_plan

    with pytest.raises(InvalidPlanError, match=problem):
        check_world_plan(plan(**fields))


def test_fsdp_arguments_are_the_harness_accelerate_config():
    """What the trace wraps with is what harness/distributed.py tells accelerate to use."""
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy

    from vramcalc.trace.worldtrace import build_world_model, fsdp_kwargs
    from vramcalc_harness.distributed import FSDP_SHARDING

    for strategy, offload in (("fsdp", False), ("fsdp-grad-op", False), ("fsdp", True)):
        p = plan(method="full", strategy=strategy, cpu_offload=offload)
        kwargs = fsdp_kwargs(build_world_model(TINY_LLAMA, p, None), p)
        assert kwargs["sharding_strategy"] == ShardingStrategy[FSDP_SHARDING[strategy]]
        assert kwargs["cpu_offload"].offload_params is offload
        assert kwargs["backward_prefetch"] == BackwardPrefetch.BACKWARD_PRE
        assert kwargs["use_orig_params"] and kwargs["sync_module_states"]
        assert not kwargs["forward_prefetch"] and kwargs["limit_all_gathers"]


def test_nccl_buffers_from_nccls_defaults():
    from vramcalc.memory.nccl import nccl_buffer_bytes

    assert nccl_buffer_bytes(1) == 0
    # 32 channels x 2 connections x (512 KiB LL + 4,915,200 B LL128 + 4 MiB Simple)
    assert nccl_buffer_bytes(8) == 32 * 2 * (524_288 + 4_915_200 + 4_194_304) == 616_562_688


def test_load_warmup_counts_tensor_parallel_weights_per_rank():
    """transformers' caching_allocator_warmup divides the weights of the model's tp plan by the
    world size once torch.distributed is up (every rank of a multi-GPU run)."""
    trace = traced(method="qlora", strategy="fsdp", targets=("q_proj",))
    linear = 4096 + 2048 + 2048 + 4096 + 3 * 8192  # 4-bit: half a byte each, in the tp plan
    norms = 2 * 64 * BF16
    embedding = head = 256 * 64 * BF16  # the head is in the plan (colwise_gather_output)
    warmup = embedding + 2 * (linear // 2 // 2 + norms) + 64 * BF16 + head // 2
    assert trace.events[0] == (ALLOC, trace.events[0][1], warmup)
    assert trace.events[1] == (FREE, trace.events[0][1], 0)


def test_simulate_world_is_cached_and_composes_the_device_total():
    from vramcalc.memory.nccl import nccl_buffer_bytes
    from vramcalc.memory.overhead import load_calibration
    from vramcalc.memory.worldsim import (
        cached_world_simulation,
        simulate_world,
        world_device_total_bytes,
    )

    p = plan(method="lora", strategy="fsdp")
    first = simulate_world(TINY_LLAMA, p)
    assert set(first.peak_reserved_bytes) == {"default", "expandable"}
    assert cached_world_simulation(TINY_LLAMA, p) == first
    assert cached_world_simulation(TINY_LLAMA, p.with_(num_gpus=4)) is None
    calibration = load_calibration()
    real = world_device_total_bytes(first, p, calibration)
    fake = world_device_total_bytes(first, p, calibration, simulated_world=True)
    assert real["device_total"] - fake["device_total"] == nccl_buffer_bytes(2)
    assert fake["device_total"] == sum(v for k, v in fake.items() if k != "device_total")


def test_compare_groups_and_summaries():
    from vramcalc.worldcompare import group_of, summarize

    base = {"model": "meta-llama/Llama-3.1-8B", "method": "qlora", "strategy": "fsdp"}
    assert group_of(base) == "8B QLoRA, FSDP"
    assert group_of({**base, "cpu_offload": True}) == "FSDP + CPU offload"
    assert group_of({**base, "strategy": "ddp"}) == "DDP"
    assert group_of({**base, "strategy": "zero3"}) == "ZeRO-3 QLoRA"
    int8 = {**base, "strategy": "zero3", "method": "lora", "quant": "int8"}
    assert group_of(int8) == "ZeRO-3 int8 LoRA"
    zero2_offload = {**base, "strategy": "zero2", "method": "lora", "cpu_offload": True}
    assert group_of(zero2_offload) == "ZeRO-2 LoRA + CPU offload"
    rows = [{"e": e} for e in (0.01, -0.05, 0.02, 0.0)]
    s = summarize(rows, "e")
    assert (s["n"], s["max_abs"], s["worst_under"]) == (4, 0.05, 0.05)
    assert s["median_abs"] == pytest.approx(0.015)


def test_a_world_trace_notes_each_layer_it_traces():
    """The progress note names the step, the pass and the layer (a ZeRO trace runs every
    layer: minutes for a large model); noting changes nothing in the trace."""
    from vramcalc import progress
    from vramcalc.trace.worldtrace import trace_world

    notes: list[str] = []
    with progress.reporting(notes.append):
        trace = trace_world(TINY_LLAMA, plan(strategy="ddp"))
    head = "tracing rank 0 of a 2-GPU ddp run of tiny LoRA on fake tensors: "
    layers = [n.removeprefix(head) for n in notes if n.startswith(head)]
    # 3 steps, each layer's forward and (checkpointing) its recomputation in backward
    assert layers[:4] == [
        "step 1 of 3, forward, layer 1 of 2",
        "step 1 of 3, forward, layer 2 of 2",
        "step 1 of 3, backward, layer 2 of 2",
        "step 1 of 3, backward, layer 1 of 2",
    ]
    assert len(layers) == 3 * 4 and layers[-1] == "step 3 of 3, backward, layer 1 of 2"
    assert trace == traced(strategy="ddp")


def test_a_markers_pass_is_read_once_for_the_phases_and_the_progress_notes():
    from vramcalc.memory.provenance import BACKWARD, FORWARD, OPTIMIZER, marker_pass, run_phases

    assert marker_pass("step0") == (FORWARD, 0, 0)
    assert marker_pass("step2_micro1") == (FORWARD, 2, 1)
    assert marker_pass("step1_backward3") == (BACKWARD, 1, 3)
    assert marker_pass("step0_optimizer") == (OPTIMIZER, 0, 0)
    assert [marker_pass(m) for m in ("load", "wrap", "end")] == [None, None, None]
    markers = [("load", 0), ("step0", 2), ("step0_micro1", 4), ("step0_backward1", 6), ("end", 9)]
    labels = [p.label for p in run_phases(1, 10, markers)]
    assert labels == ["loading", "step 1 forward", "step 1 forward (micro-batch 2)",
                      "step 1 backward (micro-batch 2)"]  # fmt: skip
