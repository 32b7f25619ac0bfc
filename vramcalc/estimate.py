"""Compose the per-component rules into one ``MemoryEstimate``.

A training step's memory is not a sum of everything ever allocated: tensors
come and go. The estimate evaluates the live bytes at the moments where the
peak can fall and takes the largest (``phase_allocated_bytes`` keeps each):

``forward``        all saved activations + one decoder layer's short-lived
                   forward buffers (dequantized k-bit weight, eager scores);
``loss``           all saved activations + logits, their fp32 upcast and
                   log-probabilities (+ the eager attention mask);
``loss_backward``  saved activations + the fp32 gradients of the logits (+ the
                   head's gradient in full fine-tuning);
``backward``       saved activations + the top layer re-created (gradient
                   checkpointing) + one layer's backward temporaries;
``backward_end``   every gradient + the first layer's saved tensors and
                   backward temporaries;
``optimizer_step`` every gradient + the optimizer's step temporaries.

Gradients kept across micro-batches (``grad_accum`` > 1) are live in every
phase. Always live: weights, adapters, optimizer states (allocated at the first step,
so present in every measured step after it), cuBLAS workspaces. Reserved adds
the allocator's slack; the device total adds the CUDA context and paged
optimizer states (managed memory).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from vramcalc.catalog import ModelSpec, forget_resolved, one_line, resolve
from vramcalc.errors import InvalidPlanError, SimulationError, VramcalcError
from vramcalc.inventory import ModelInventory, build_inventory, cache_key, lora_key
from vramcalc.limits import bytes_problem
from vramcalc.memory import DTYPE_BYTES, slack, worldsim
from vramcalc.memory.activations import ActivationEstimate, estimate_activations
from vramcalc.memory.adalora import AdaLoraEstimate, estimate_adalora
from vramcalc.memory.attribution import ALLOCATED, attribute
from vramcalc.memory.distributed import effective_plan, shard_static
from vramcalc.memory.gradients import gradient_bytes, trainable_dtype
from vramcalc.memory.layers import NO_SDPA
from vramcalc.memory.logits import LogitsEstimate, estimate_logits
from vramcalc.memory.nccl import NCCL_ASSUMPTION, nccl_buffer_bytes
from vramcalc.memory.optimizer import OptimizerEstimate, estimate_optimizer
from vramcalc.memory.overhead import (
    Calibration,
    allocator_reserve_bytes,
    load_calibration,
    paged_device_bytes,
    runtime_bytes,
)
from vramcalc.memory.slack import AllocatorSimulation
from vramcalc.memory.weights import WeightsEstimate, estimate_weights
from vramcalc.training_plan import TrainingPlan
from vramcalc.versions import version_note

COMPONENTS = (
    *ALLOCATED,  # the allocated ones, in attribution's order
    "allocator_reserve",
    "cuda_context",
    "driver_reserved",
    "nccl",
    "paged_optimizer_states",
)

#: components only some plans have (0 by construction for the others), and which
_SETTING_COMPONENTS = {
    "rank_allocator": lambda plan: plan.method == "adalora",
    "gathered_weights": lambda plan: plan.num_gpus > 1,
    "comm_buffers": lambda plan: plan.num_gpus > 1,
    "nccl": lambda plan: plan.num_gpus > 1,
    "paged_optimizer_states": lambda plan: plan.optimizer.startswith("paged_"),
}


def plan_components(plan: TrainingPlan) -> tuple[str, ...]:
    """The components ``plan`` can have, in ``COMPONENTS`` order: AdaLoRA's rank allocator
    only with --method adalora, sharding's and NCCL's only on several GPUs, paged optimizer
    states only with a paged optimizer (outputs leave the others out)."""
    return tuple(
        name
        for name in COMPONENTS
        if name not in _SETTING_COMPONENTS or _SETTING_COMPONENTS[name](plan)
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory of one training plan at its peak, by component, in bytes."""

    plan: TrainingPlan
    model_name: str
    model_source: str
    total_params: int
    trainable_params: int
    components: dict[str, int]  # per GPU at the peak moment; sums to device_total_bytes
    peak_allocated_bytes: int  # comparable to torch.cuda.max_memory_allocated()
    peak_reserved_bytes: int  # comparable to torch.cuda.max_memory_reserved()
    device_total_bytes: int  # comparable to nvidia-smi used memory (per GPU)
    peak_phase: str
    phase_allocated_bytes: dict[str, int]
    assumptions: tuple[str, ...]
    rules: dict[str, str] = field(default_factory=dict)
    # which model gave peak reserved: "simulated" (the run -- rank 0's for a multi-GPU FSDP1
    # or DDP plan -- traced and replayed through the caching-allocator model) or "approximate"
    # (a calibrated fraction: --allocator-model approximate, or a ZeRO plan, which the world
    # trace does not run; the assumptions say which)
    allocator_model: str = "simulated"
    # the allocated components as the per-component rules count them at peak_phase (the
    # comparison plan --verbose shows); ``components`` are the simulated run's bytes
    rules_components: dict[str, int] = field(default_factory=dict)
    # where the simulated run's peak falls ("step 2 backward"); None when not simulated
    simulated_peak_phase: str | None = None
    lora_targets: tuple[str, ...] = ()  # the modules the adapters wrap, resolved

    @property
    def num_gpus(self) -> int:
        return self.plan.num_gpus

    @property
    def total_device_bytes_all_gpus(self) -> int:
        """Device memory summed over every GPU of the plan."""
        return self.device_total_bytes * self.plan.num_gpus

    def plan_dict(self) -> dict[str, Any]:
        """The plan as outputs show it: the fields that mean something for its method, the
        adapters' targets resolved (``TrainingPlan.shown_dict``)."""
        return self.plan.shown_dict(self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; field names match the harness's measurement records."""
        return {
            "model": self.model_name,
            "model_source": self.model_source,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "device_total_bytes": self.device_total_bytes,
            "num_gpus": self.num_gpus,
            "total_device_bytes_all_gpus": self.total_device_bytes_all_gpus,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "allocator_model": self.allocator_model,
            "peak_phase": self.peak_phase,
            "simulated_peak_phase": self.simulated_peak_phase,
            "phase_allocated_bytes": dict(self.phase_allocated_bytes),
            "components": {name: self.components[name] for name in plan_components(self.plan)},
            "rules_components": dict(self.rules_components),
            "plan": self.plan_dict(),
            "assumptions": list(self.assumptions),
            "rules": dict(self.rules),
        }


# -- the seam: one way from a model and a plan to an estimate -------------------------------
@dataclass(frozen=True)
class Prepared:
    """A resolved model, its inventory under a plan, and the calibration: all an estimate needs.

    ``prepare`` builds it (memoized); ``estimate`` then works for every plan that shares
    the inventory (same model, method family and LoRA shape: batch, sequence, optimizer,
    GPUs ... may differ), so ``plan``, ``sweep``, ``fit`` and ``report`` give the same bytes.
    """

    spec: ModelSpec
    inventory: ModelInventory
    calibration: Calibration
    lora: dict[str, Any] | None  # inventory.lora_key of the plans this serves

    def estimate(self, plan: TrainingPlan, allocator_model: str | None = None) -> MemoryEstimate:
        """The memory estimate of ``plan`` on this model.

        ``allocator_model``: ``simulate`` (the run traced once per recipe and replayed
        through the caching-allocator model: a fraction of a second per plan, cached) or
        ``approximate`` (the calibrated fraction, only when asked for); default
        ``default_allocator_model()``. Multi-GPU FSDP1, DDP and DeepSpeed ZeRO plans simulate
        rank 0 of the world (``memory/worldsim.py``).
        """
        if lora_key(plan) != self.lora:
            raise ValueError(
                f"plan {plan.method} r={plan.rank} targets={plan.targets} needs another inventory "
                f"than the one prepared for {self.spec.name}; call prepare(spec, plan) for it"
            )
        by_rules = estimate_from_inventory(self.inventory, plan, self.calibration)
        if too_large := bytes_problem(by_rules.device_total_bytes, _size_flags(plan)):
            raise InvalidPlanError([too_large])  # before a simulation of it is tried
        return estimate_from_inventory(
            self.inventory,
            plan,
            self.calibration,
            model_name=self.spec.name,
            model_source=self.spec.source,
            simulation=self.simulation(plan, allocator_model or default_allocator_model()),
        )

    def simulation(self, plan: TrainingPlan, allocator_model: str) -> AllocatorSimulation | None:
        """The plan's allocator simulation as ``allocator_model`` asks (None: approximate).

        A recipe whose training step cannot be traced raises ``SimulationError`` naming it
        and the way out (``--allocator-model approximate``): no answer is silently
        approximated. A multi-GPU plan: ``worldsim.seam_simulation``."""
        if allocator_model not in ALLOCATOR_MODELS:
            raise ValueError(
                f"allocator_model {allocator_model!r} is not one of {ALLOCATOR_MODELS}"
            )
        if allocator_model == "approximate":
            return None
        if plan.num_gpus > 1:
            return worldsim.seam_simulation(self.spec.name, self.spec.config_dict, plan)
        try:
            return slack.simulate_plan(self.spec.config_dict, plan)
        except VramcalcError:
            raise
        except Exception as err:
            raise SimulationError(
                f"--model {self.spec.name}: the training step of this recipe could not be "
                f"traced on fake tensors ({type(err).__name__}: {one_line(err)}); "
                "--allocator-model approximate gives the calibrated estimate instead"
            ) from err

    def cached(self, plan: TrainingPlan) -> bool:
        """Whether ``plan``'s simulation is on disk already (no trace, no replay to run)."""
        if plan.num_gpus > 1:
            return worldsim.cached_world_simulation(self.spec.config_dict, plan) is not None
        return slack.cached_simulation(self.spec.config_dict, plan) is not None


ALLOCATOR_MODELS = ("simulate", "approximate")


def _size_flags(plan: TrainingPlan) -> str:
    """The options that make a plan's bytes grow, as given: for an error about its size."""
    rank = f"--init-rank {plan.init_rank}" if plan.method == "adalora" else f"--rank {plan.rank}"
    return f"--seq-len {plan.seq_len}, --batch-size {plan.batch_size}" + (
        f" and {rank}" if plan.uses_adapters else ""
    )


def default_allocator_model() -> str:
    """``$VRAMCALC_ALLOCATOR_MODEL`` or ``simulate`` (the test suite sets ``approximate``
    where a test is not about the allocator, to stay fast)."""
    import os

    return os.environ.get("VRAMCALC_ALLOCATOR_MODEL", "simulate")


_PREPARED: OrderedDict[tuple[str, str, str], Prepared] = OrderedDict()
_PREPARED_MAX = 256


def prepare(model: ModelSpec | str, plan: TrainingPlan) -> Prepared:
    """The one step every command takes before estimating: resolve, build the inventory
    (disk-cached), attach the calibration. Memoized per model config and inventory key."""
    spec = resolve(model) if isinstance(model, str) else model
    key = cache_key(spec.config_dict, plan)
    memo = (spec.name, spec.source, key)
    if memo in _PREPARED:
        _PREPARED.move_to_end(memo)
        return _PREPARED[memo]
    prepared = Prepared(spec, inventory_for(spec, plan), load_calibration(), lora_key(plan))
    _PREPARED[memo] = prepared
    if len(_PREPARED) > _PREPARED_MAX:
        _PREPARED.popitem(last=False)
    return prepared


def forget_prepared() -> None:
    """Empty ``prepare``'s memo (benchmarks that time cold starts; tests)."""
    _PREPARED.clear()
    forget_resolved()


def inventory_for(spec: ModelSpec, plan: TrainingPlan) -> ModelInventory:
    """The (disk-cached) inventory of ``spec`` under ``plan``; use ``prepare`` instead."""
    return build_inventory(spec.config_dict, plan, where=spec.name)


def estimate(plan: TrainingPlan, spec: ModelSpec | None = None) -> MemoryEstimate:
    """Estimate ``plan`` (the convenience entry): ``prepare(...).estimate(plan)``."""
    return prepare(spec or plan.model, plan).estimate(plan)


def estimate_from_inventory(
    inventory: ModelInventory,
    plan: TrainingPlan,
    calibration: Calibration,
    *,
    model_name: str = "",
    model_source: str = "",
    simulation: AllocatorSimulation | None = None,
) -> MemoryEstimate:
    """The pure part: inventory + plan + calibration → ``MemoryEstimate`` (reads nothing).

    The model's config facts are in the inventory; ``model_name``/``model_source`` only label
    the result. Commands go through ``prepare``, which supplies all three arguments.

    ``simulation``: the plan's run replayed through the caching-allocator model
    (``memory/slack.py``). Its peaks are the estimate's peak allocated and reserved bytes,
    and what is alive at its peak is the breakdown (``memory/attribution.py``: the rules'
    own count at their peak phase is ``rules_components``); a multi-GPU plan's is rank 0's
    world (``memory/worldsim.py``), whose breakdown is the rules'. Without it
    (``--allocator-model approximate``, ZeRO plans) the slack is the calibrated fraction and
    the breakdown the rules'.
    """
    static_plan = effective_plan(plan)  # FSDP full fine-tuning: fp32 master shards
    weights: WeightsEstimate = estimate_weights(inventory, static_plan)
    optimizer: OptimizerEstimate = estimate_optimizer(inventory, static_plan)
    activations: ActivationEstimate = estimate_activations(inventory, plan)
    logits: LogitsEstimate = estimate_logits(inventory, plan)
    adalora: AdaLoraEstimate = estimate_adalora(inventory, plan)
    sharded = shard_static(
        inventory,
        plan,
        weights_bytes=weights.weights_bytes,
        adapter_bytes=weights.adapter_bytes,
        optimizer_state_bytes=optimizer.state_bytes,
        gradient_bytes=gradient_bytes(inventory, static_plan),
        compute_itemsize=2,
        nccl_bytes=nccl_buffer_bytes(plan.num_gpus),
    )
    grads = sharded.gradient_bytes
    head_grad = _head_gradient_bytes(inventory, static_plan) // (
        plan.num_gpus if plan.strategy in ("fsdp", "zero3") else 1
    )
    accum_grads = grads if plan.grad_accum > 1 else 0
    paged = 0 if plan.cpu_offload and plan.num_gpus > 1 else optimizer.paged_state_bytes

    adapters = sharded.adapter_bytes + adalora.ranknum_bytes
    static = (
        sharded.weights_bytes
        + adapters
        + sharded.optimizer_state_bytes
        + adalora.rank_allocator_bytes
        + sharded.gathered_weights_bytes
        + sharded.comm_buffer_bytes
        + calibration.cublas_workspace_bytes
    )
    acts, mask = activations.layers_saved_bytes, activations.attention_mask_bytes
    live_grads = max(accum_grads, head_grad, adalora.early_gradient_bytes)
    if plan.gradient_checkpointing:
        last_layer = activations.checkpoint_input_bytes + activations.recompute_layer_bytes
    else:
        last_layer = activations.first_layer_saved_bytes
    after_loss = logits.logits_bytes + logits.head_saved_bytes + logits.loss_saved_bytes
    phases = {
        # inside a decoder layer's forward: its short-lived buffers on top of what is saved
        "forward": {
            "gradients": accum_grads,
            "activations": acts + mask,
            "logits": 0,
            "transient": activations.forward_transient_bytes,
        },
        # the head and the loss at the end of forward; AdaLoRA's regulariser comes after the
        # loss, when only the logits and what the head and the loss saved are left
        "loss": {
            "gradients": accum_grads,
            "activations": acts + mask,
            "logits": logits.forward_peak_bytes,
            "transient": max(0, after_loss + adalora.orth_reg_bytes - logits.forward_peak_bytes)
            if adalora.orth_reg_bytes
            else 0,
        },
        # the loss and head backward (full fine-tuning: the head's gradient appears here)
        "loss_backward": {
            "gradients": live_grads,
            "activations": acts,
            "logits": logits.backward_peak_bytes,
            "transient": 0,
        },
        # the last decoder layer's backward (checkpointing: re-created first)
        "backward": {
            "gradients": live_grads,
            "activations": acts + activations.recompute_layer_bytes,
            "logits": 0,
            "transient": activations.backward_transient_bytes,
        },
        # the first decoder layer's backward: every gradient has been produced
        "backward_end": {
            "gradients": grads,
            "activations": last_layer,
            "logits": 0,
            "transient": activations.backward_transient_bytes,
        },
        "optimizer_step": {
            "gradients": grads,
            "activations": 0,
            "logits": 0,
            # AdaLoRA's update_and_allocate comes after the step, gradients still live
            "transient": max(optimizer.step_transient_bytes, adalora.update_transient_bytes),
        },
    }
    phase_totals = {name: static + sum(parts.values()) for name, parts in phases.items()}
    peak_phase = max(phase_totals, key=lambda name: phase_totals[name])
    rules_allocated = phase_totals[peak_phase]
    if simulation is not None:
        peak_allocated = simulation.peak_allocated_bytes[plan.allocator]
        peak_reserved = max(simulation.peak_reserved_bytes[plan.allocator], peak_allocated)
    else:
        peak_allocated = rules_allocated
        peak_reserved = peak_allocated + allocator_reserve_bytes(
            peak_allocated, calibration, plan.allocator
        )
    reserve = peak_reserved - peak_allocated
    eager = plan.attn == "eager" or inventory.model_type in NO_SDPA
    runtime = runtime_bytes(plan, eager, calibration)
    paged = paged_device_bytes(paged, calibration)
    device_total = (
        peak_reserved + runtime + calibration.driver_reserved_bytes + sharded.nccl_bytes + paged
    )
    by_rules = {
        "weights": sharded.weights_bytes,
        "adapters": adapters,
        "optimizer_states": sharded.optimizer_state_bytes,
        "rank_allocator": adalora.rank_allocator_bytes,
        **phases[peak_phase],
        "gathered_weights": sharded.gathered_weights_bytes,
        "comm_buffers": sharded.comm_buffer_bytes,
        "cublas_workspace": calibration.cublas_workspace_bytes,
    }
    by_rules = {name: int(by_rules[name]) for name in ALLOCATED}
    categories = (
        simulation.peak_categories.get(plan.allocator, {}) if simulation is not None else {}
    )
    components = {
        **attribute(by_rules, int(peak_allocated), categories),
        "allocator_reserve": reserve,
        "cuda_context": runtime,
        "driver_reserved": calibration.driver_reserved_bytes,
        "nccl": sharded.nccl_bytes,
        "paged_optimizer_states": paged,
    }
    components = {name: int(components[name]) for name in COMPONENTS}
    return MemoryEstimate(
        plan=plan,
        model_name=model_name,
        model_source=model_source,
        total_params=inventory.total_params_with_adapters,
        trainable_params=inventory.trainable_params,
        components=components,
        peak_allocated_bytes=int(peak_allocated),
        peak_reserved_bytes=int(peak_reserved),
        device_total_bytes=int(device_total),
        peak_phase=peak_phase,
        phase_allocated_bytes={k: int(v) for k, v in phase_totals.items()},
        assumptions=_assumptions(inventory, plan, weights)
        + (() if activations.exact else (f"APPROXIMATE activations: {activations.rule}",))
        + (_slack_assumption(plan, simulation),),
        allocator_model="simulated" if simulation is not None else "approximate",
        rules_components=by_rules,
        lora_targets=tuple(inventory.lora_targets) if plan.uses_adapters else (),
        simulated_peak_phase=simulation.peak_phase.get(plan.allocator)
        if simulation is not None
        else None,
        rules={
            "weights": weights.rule,
            "optimizer_states": optimizer.rule,
            "activations": activations.rule,
            "logits": logits.rule,
            "distributed": sharded.rule,
            **({"adalora": adalora.rule} if adalora.rule else {}),
            **{f"calibration.{k}": v for k, v in calibration.sources.items()},
        },
    )


def _slack_assumption(plan: TrainingPlan, simulation: AllocatorSimulation | None) -> str:
    mode = (
        "expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)"
        if plan.allocator == "expandable"
        else "the default caching allocator"
    )
    if simulation is not None and plan.num_gpus > 1:
        wrap, code = (
            ("deepspeed.initialize with the harness's DeepSpeed JSON", "DeepSpeed's own ZeRO code")
            if plan.strategy in worldsim.ZERO
            else (
                f"the {plan.strategy} wrap with accelerate's arguments",
                "FSDP1 itself; DDP's Reducer re-expressed",
            )
        )
        return (
            f"peak allocated and reserved bytes from rank 0's whole run (loading as rank 0 "
            f"does it, {wrap}, 3 optimizer steps) traced on fake tensors under torch's fake "
            f"process group ({code}) and replayed through a model of {mode}, one pool per stream"
        )
    if simulation is not None:
        text = (
            f"peak allocated and reserved bytes from the whole run (loading, 3 optimizer steps) "
            f"traced on fake tensors and replayed through a model of {mode}"
        )
        if plan.quant == "int8":
            text += (
                "; int8 outlier columns as random-init weights produce them (pretrained "
                "checkpoints have fewer: less memory)"
            )
        return text
    return (
        f"APPROXIMATE allocator slack under {mode}: a calibrated fraction of peak allocated, "
        "not a simulation of this run (--allocator-model approximate)"
    )


def _head_gradient_bytes(inventory: ModelInventory, plan: TrainingPlan) -> int:
    """Full fine-tuning: the output head's gradient appears while the logits' gradient is live."""
    if plan.method != "full":
        return 0
    head = inventory.params_by_role["lm_head"] or inventory.params_by_role["embedding"]
    return head * DTYPE_BYTES[trainable_dtype(plan)]


# what backs the multi-GPU figures: update when the report's multi-gpu figures change or real
# multi-GPU records are in data/measurements
MULTI_GPU_EVIDENCE = (
    "per-GPU memory of FSDP1 and DDP plans simulated (rank 0 traced under torch's fake process "
    "group) and checked against 49 simulated-world measurements on an H100 (rank 0 of 2 to 8 "
    "ranks on the fake process group: data/measurements/h100_world*_2026-12-06.jsonl; "
    "reports/world_memory.md): LoRA, QLoRA, full fine-tuning, DDP, fsdp-grad-op and CPU "
    "offload, both allocator modes, device total within +2.1 / -0.5 %, peak allocated within "
    "0.02 %; not yet against a real multi-GPU run (NCCL's buffers and real collectives are not "
    "in a fake world)"
)
ZERO_EVIDENCE = (
    "per-GPU memory of DeepSpeed ZeRO plans simulated with DeepSpeed's own code (rank 0 traced "
    "under torch's fake process group, trace/zerotrace.py) and checked against 36 "
    "simulated-world measurements on an H100 (rank 0 of 2 to 8 ranks running DeepSpeed 0.19.8 "
    "on the fake process group: data/measurements/h100_zero_2026-12-06.jsonl, 8 of them "
    "held out (h100_zerohold_2026-12-06.jsonl), 7 of int8 LoRA under ZeRO-3, 3 of them held "
    "out (h100_zeroint8*_2026-12-06.jsonl); reports/world_memory.md): ZeRO-1/2/3, ZeRO-Offload, "
    "LoRA, QLoRA and int8 LoRA (ZeRO-3 too), full fine-tuning, gradient accumulation, device "
    "total within +1.0 / -2.3 %, peak allocated within 0.2 %; not yet against a real "
    "multi-GPU run"
)


def _assumptions(
    inventory: ModelInventory, plan: TrainingPlan, weights: WeightsEstimate
) -> tuple[str, ...]:
    out = [
        "HF Trainer, bf16=True (forward/backward under bf16 autocast)"
        if plan.strategy not in worldsim.ZERO or plan.num_gpus == 1
        else "HF Trainer with DeepSpeed bf16 (the model cast to bf16, no autocast)",
        f"base weights loaded in {plan.dtype}"
        + (f", linear layers quantized to {plan.quant}" if plan.is_kbit else ""),
    ]
    if plan.is_kbit:
        out.append(
            "prepare_model_for_kbit_training: non-quantized parameters upcast to fp32"
            + (
                ", NF4 double quantization"
                if plan.quant in ("nf4", "fp4") and plan.double_quant
                else ""
            )
        )
    other = inventory.params_by_role["other"]
    if plan.is_kbit and other > 0.05 * inventory.total_params:
        out.append(
            f"WARNING: {other:,} parameters ({100 * other / inventory.total_params:.0f} %) are not plain nn.Linear "
            "weights (MoE expert tensors or nn.Linear subclasses), which this transformers version's "
            "bitsandbytes integration does not quantize: they stay in 16 bit and are upcast to fp32"
        )
    if plan.method == "adalora":
        out.append(
            f"PEFT AdaLoRA init_r={plan.init_rank} -> target_r={plan.target_rank} (tinit="
            f"{plan.tinit}, tfinal={plan.tfinal}, deltaT={plan.delta_t}, total_step="
            f"{plan.total_step if plan.total_step is not None else 'not given'}), "
            f"orth_reg_weight={plan.orth_reg_weight:g}, dropout={plan.dropout:g}, lora_A/E/B "
            f"fp32 on {', '.join(inventory.lora_targets)}"
            + (" (PEFT's AdaLoRA default targets)" if plan.targets is None else "")
            + (
                f", full trainable copies of {', '.join(plan.modules_to_save)}"
                if plan.modules_to_save
                else ""
            )
        )
        out.append(
            "AdaLoRA memory held at init_r for the whole run: pruned ranks are masked to zero "
            "in lora_E, no tensor shrinks; model.base_model.update_and_allocate(step) is called "
            "every optimizer step after optimizer.step() and before zero_grad() (peft's docs; "
            "a Trainer callback), its rank-allocator state (3 fp32 copies of the adapters) "
            "live from the first step until step total_step - tfinal"
        )
    elif plan.uses_adapters:
        out.append(
            f"PEFT LoRA r={plan.rank}, alpha={plan.lora_alpha:g}, dropout={plan.dropout:g}, "
            f"adapters fp32 on {', '.join(inventory.lora_targets)}"
            + (" (PEFT default targets)" if plan.targets is None else "")
            + (", DoRA magnitudes" if plan.dora else "")
            + (
                f", full trainable copies of {', '.join(plan.modules_to_save)}"
                if plan.modules_to_save
                else ""
            )
        )
    elif plan.method == "full":
        out.append(
            "full fine-tuning: "
            + (
                "fp32 master weights + bf16 autocast"
                if plan.dtype == "fp32"
                else f"pure {plan.dtype}"
            )
        )
    out.append(
        f"micro-batch {plan.batch_size} x {plan.seq_len} tokens, grad-accum {plan.grad_accum}, "
        f"attention {plan.attn}"
    )
    out.append(plan.checkpointing_note)
    out.append(f"optimizer {plan.optimizer}; states live from the first step on")
    if plan.num_gpus > 1:
        out.append(
            f"{plan.num_gpus} GPUs, {plan.strategy}"
            + (" with CPU offload" if plan.cpu_offload else "")
            + "; memory is per GPU, each running the full micro-batch"
        )
        out.append(MULTI_GPU_EVIDENCE if plan.strategy not in worldsim.ZERO else ZERO_EVIDENCE)
        out.append(NCCL_ASSUMPTION)
    out.append(
        "driver reserve, CUDA context and kernel modules, cuBLAS workspaces from "
        "data/calibration.json (measured on an H200)"
    )
    out.append(version_note())
    return tuple(out)
