"""torch's own FSDP2 memory tracker on the same plan, for comparison with the FSDP1 world trace.

``torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker`` tracks live tensor bytes of an
FSDP2 (``fully_shard``) model under ``FakeTensorMode``, per module and state. It only
hooks FSDP2 (``FSDPParamGroup``), so it runs here on FSDP2 stand-ins of the measured
FSDP1 recipe: ``fully_shard`` on each decoder layer and the root (as the harness's CPU
simulated world does, ``harness/simworld.py``), bf16 ``MixedPrecisionPolicy``,
``reshard_after_forward`` for ``fsdp``, ``CPUOffloadPolicy`` for CPU offload, the
plan's optimizer, two steps. Its peak is live bytes (no loading, no caching allocator,
no NCCL); a different wrapper, so it shows what FSDP2 would need, not what was measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vramcalc.trace.fakemodel import to_fake
from vramcalc.trace.steptrace import decoder_layers, trainer_optimizer
from vramcalc.trace.worldtrace import build_world_model, check_world_plan, fake_world, quiet
from vramcalc.training_plan import TrainingPlan


@dataclass(frozen=True)
class TrackerPeak:
    peak_bytes: int  # FSDPMemTracker's peak, all categories, the device
    by_category: dict[str, int]  # at the peak: sharded/unsharded params, grads, activations...


def fsdp2_tracker_peak(
    config_dict: dict[str, Any], plan: TrainingPlan, num_layers: int | None = None
) -> TrackerPeak:
    """FSDPMemTracker's peak for ``plan`` run as FSDP2 on fake tensors (module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh

    from vramcalc.trace.emulation import (  # torch: only when a trace runs
        cuda_functions,
        gpu_code_paths,
    )

    check_world_plan(plan)
    with quiet():
        model = build_world_model(config_dict, plan, num_layers)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    to_fake(model, mode)
    vocab = int(model.config.vocab_size)
    with fake_world(plan.num_gpus), quiet():
        mesh = init_device_mesh("cpu", (plan.num_gpus,))  # reads its ranks: outside fake mode
        with mode, gpu_code_paths(), cuda_functions():
            return _track(model, plan, mesh, vocab)


def _track(model: Any, plan: TrainingPlan, mesh: Any, vocab: int) -> TrackerPeak:
    import torch
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    dtype = torch.float16 if plan.dtype == "fp16" else torch.bfloat16
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": plan.strategy == "fsdp",
        "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype),
    }
    if plan.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    if plan.method == "full":  # accelerate's upcast of trainable parameters
        for p in model.parameters():
            p.data = p.data.float()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = trainer_optimizer(params, plan)
    tracker = FSDPMemTracker(model, optimizer)
    ids = torch.randint(0, vocab, (plan.batch_size, plan.seq_len))
    tracker.track_inputs((ids,))
    with tracker:
        for step in range(2):
            if step:
                tracker.reset_mod_stats()  # per iteration (FSDPMemTracker's rule)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            del loss
    snapshot = tracker.get_tracker_snapshot("peak")
    device_stats = next(
        (v for k, v in snapshot.items() if getattr(k, "type", str(k)) != "meta"), {}
    )
    total = int(device_stats.get("Total", 0))
    return TrackerPeak(total, {k: int(v) for k, v in device_stats.items() if k != "Total"})
