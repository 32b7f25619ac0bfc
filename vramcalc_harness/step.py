"""Training steps: the recipes a case runs, on synthetic token batches.

``trainer`` (default) is the HF ``Trainer`` as a user would run it: mixed
precision (``bf16=True`` where the device supports bf16; ``fp16`` for fp16
plans; fp32 on a CPU without bf16 support), the plan's micro-batch size,
gradient accumulation, gradient checkpointing (``use_reentrant=False``) and
optimizer (``OPTIM_NAMES``), ``max_steps = warmup_steps + steps``, no eval,
no saving, no logging integrations. A ``TrainerCallback`` synchronizes the
device at the end of every optimizer step and times it.

``loop`` is a plain PyTorch loop doing the same work: ``torch.autocast``, the
optimizer Trainer would build (``Trainer.get_optimizer_cls_and_kwargs``),
gradient clipping at 1.0 as Trainer does, ``zero_grad(set_to_none=True)``.

AdaLoRA (``method: adalora``) needs ``model.base_model.update_and_allocate(step)`` after
``optimizer.step()`` and before ``zero_grad()`` (peft's docs): ``trainer`` makes the call
from a callback's ``on_optimizer_step`` (Trainer calls it right there), ``loop`` inline.

Batches are random token ids of exactly ``seq_len`` (seeded), labels = inputs,
no attention mask (every token attends causally, as in packed training).

Multi-GPU cases (one process per GPU, ``vramcalc_harness.agent``): Trainer wraps the
model as the launch env says (DDP, FSDP, DeepSpeed) and each rank gets its own
micro-batches; ``loop`` prepares model and optimizer with accelerate's
``Accelerator`` (DDP and FSDP), skipping the gradient all-reduce on
accumulation micro-batches as Trainer does. Under FSDP, adapter models get
peft's auto-wrap policy (each trainable leaf its own unit, see
``vramcalc_harness.distributed.fsdp_peft_wrap``). A simulated world (``vramcalc_harness.simworld``)
runs the same way as rank 0 of a fake group; on CPU its FSDP is FSDP2
``fully_shard`` in the loop. It also records rank 0's parameter, gradient and
optimizer-state bytes after each optimizer step (``RecipeResult.state_bytes``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from vramcalc.configs.sharding import MAX_GRAD_NORM
from vramcalc_harness.distributed import (
    decoder_layer_classes,
    fsdp_peft_wrap,
    is_distributed,
    rank_info,
)
from vramcalc_harness.errors import HarnessError
from vramcalc_harness.scenario import Case
from vramcalc_harness.simworld import fully_shard_model, state_bytes
from vramcalc_harness.trackers import is_cuda, synchronize

# our optimizer name -> (Trainer ``optim``, ``optim_args``)
OPTIM_NAMES: dict[str, tuple[str, str | None]] = {
    "adamw_torch": ("adamw_torch", None),
    "adamw_torch_fused": ("adamw_torch_fused", None),
    "adamw_8bit": ("adamw_bnb_8bit", None),
    "paged_adamw_32bit": ("paged_adamw_32bit", None),
    "paged_adamw_8bit": ("paged_adamw_8bit", None),
    "sgd": ("sgd", None),
    "sgd_momentum": ("sgd", "momentum=0.9"),
    "adafactor": ("adafactor", None),
}
SGD_MOMENTUM = 0.9


@dataclass(frozen=True)
class RecipeResult:
    """Seconds of every optimizer step (warm-up first) and the optimizer really built."""

    step_seconds_all: tuple[float, ...]
    warmup_steps: int
    optimizer_class: str
    # simulated world: this rank's parameter / gradient / optimizer-state bytes after the last step
    state_bytes: dict[str, int] | None = None

    @property
    def step_seconds_measured(self) -> tuple[float, ...]:
        return self.step_seconds_all[self.warmup_steps :]

    @property
    def step_seconds(self) -> float | None:
        measured = self.step_seconds_measured
        return statistics.median(measured) if measured else None


class SyntheticTokens:
    """A map-style dataset of random token ids of exactly ``seq_len``; labels = input_ids."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_len, self.vocab_size, self.seed = (
            num_samples,
            seq_len,
            vocab_size,
            seed,
        )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        ids = torch.randint(0, self.vocab_size, (self.seq_len,), generator=generator)
        return {"input_ids": ids, "labels": ids.clone()}


def dataset_for(case: Case, model: Any) -> SyntheticTokens:
    plan = case.plan
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    samples = case.total_steps * plan.batch_size * plan.grad_accum * plan.num_gpus
    return SyntheticTokens(samples, plan.seq_len, int(text_config.vocab_size), case.seed)


# -- precision -------------------------------------------------------------------------------------
def cpu_bf16_works() -> bool:
    """Whether bf16 autocast forward + backward runs on this CPU."""
    import torch

    try:
        layer = torch.nn.Linear(8, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(torch.randn(2, 8))
        out.float().sum().backward()
        return out.dtype == torch.bfloat16
    except (RuntimeError, TypeError):
        return False


def compute_dtype_for(case: Case, device: str) -> str:
    """The autocast dtype the recipe will use: ``bf16``, ``fp16`` or ``fp32``."""
    import torch

    if is_cuda(device):
        if case.plan.dtype == "fp16" or not torch.cuda.is_bf16_supported():
            return "fp16"
        return "bf16"
    return "bf16" if cpu_bf16_works() else "fp32"


# -- test hook ---------------------------------------------------------------------------------------
def simulate_failure(case: Case) -> None:
    """Fail on purpose at the first measured step (``case.simulate``); no-op otherwise.

    Only the last rank fails: in a multi-GPU case the others go on into the
    step's collectives and wait there, as they would for a real failure.
    """
    rank, _, world_size = rank_info()
    if case.simulate is None or rank != world_size - 1:
        return
    import torch

    if case.simulate == "oom":
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 1.00 GiB (simulated by the harness test hook)"
        )
    if case.simulate == "error":
        raise RuntimeError("simulated failure (harness test hook)")
    if case.simulate == "hang":
        print(f"[harness] simulated hang on rank {rank}", flush=True)
        while True:
            time.sleep(60)


# -- recipe: HF Trainer --------------------------------------------------------------------------------
def training_arguments(case: Case, device: str, compute_dtype: str, output_dir: str) -> Any:
    """``TrainingArguments`` of the default recipe (names adapted to the transformers version)."""
    from transformers import TrainingArguments

    plan = case.plan
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    optim, optim_args = OPTIM_NAMES[plan.optimizer]
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "max_steps": case.total_steps,
        "per_device_train_batch_size": plan.batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "optim": optim,
        "optim_args": optim_args,
        "bf16": compute_dtype == "bf16",
        "fp16": compute_dtype == "fp16",
        "seed": case.seed,
        "data_seed": case.seed,
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "max_grad_norm": MAX_GRAD_NORM,
        "use_cpu": not is_cuda(device),
    }
    checkpointing = (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )
    kwargs[checkpointing] = plan.gradient_checkpointing
    if plan.gradient_checkpointing:
        kwargs[f"{checkpointing}_kwargs"] = {"use_reentrant": False}
    if "use_cpu" not in names:  # transformers < 4.34
        kwargs["no_cuda"] = kwargs.pop("use_cpu")
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in names})


def _optimizer_class(optimizer: Any) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)
    return type(inner).__name__


def _check_optimizer(case: Case, optimizer: Any) -> None:
    if case.plan.optimizer == "sgd_momentum":
        momentum = optimizer.param_groups[0].get("momentum")
        if momentum != SGD_MOMENTUM:
            raise HarnessError(
                f"Trainer built SGD with momentum {momentum!r}, not {SGD_MOMENTUM}: this transformers "
                "version ignores optim_args for sgd."
            )


def run_trainer(
    model: Any,
    case: Case,
    device: str,
    compute_dtype: str,
    on_warmup_end: Any = None,
    on_step_end: Any = None,
) -> RecipeResult:
    """Run ``warmup_steps`` + at least ``steps`` optimizer steps with HF Trainer; time each one.

    Measured steps go on until ``case.measured_enough`` (``steps`` and ``min_seconds``).
    ``on_warmup_end`` is called when the first measured step begins (the memory
    tracker restarts its peaks there); ``on_step_end(n)`` after the n-th step.
    """
    from transformers import Trainer, TrainerCallback

    times: list[float] = []
    seen: dict[str, str] = {}
    counted: dict[str, int] = {}

    class StepTimer(TrainerCallback):
        last = 0.0

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001
            if optimizer is not None:
                _check_optimizer(case, optimizer)
                seen["optimizer"] = _optimizer_class(optimizer)

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if state.global_step == case.warmup_steps:
                if on_warmup_end is not None:
                    on_warmup_end()
                simulate_failure(case)
            if state.global_step == 0:
                synchronize(device)
                self.last = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
            if case.simulate_world is not None:  # gradients are still there (zero_grad follows)
                counted.update(state_bytes(kwargs["model"], kwargs["optimizer"]))

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            synchronize(device)
            now = time.perf_counter()
            times.append(now - self.last)
            self.last = now
            if on_step_end is not None:
                on_step_end(len(times))
            if case.measured_enough(times[case.warmup_steps :]):
                control.should_training_stop = True

    allocate = rank_allocation(model, case)

    class RankAllocation(TrainerCallback):
        """AdaLoRA: after optimizer.step(), before zero_grad() (Trainer's on_optimizer_step)."""

        def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
            allocate(state.global_step)

    callbacks: list[Any] = [StepTimer()] + ([RankAllocation()] if allocate else [])
    with tempfile.TemporaryDirectory(prefix="vramcalc-trainer-") as output_dir:
        args = training_arguments(case, device, compute_dtype, output_dir)
        trainer = Trainer(
            model=model, args=args, train_dataset=dataset_for(case, model), callbacks=callbacks
        )
        if getattr(trainer, "is_fsdp_enabled", False):
            fsdp_peft_wrap(trainer.model, _fsdp_plugin(trainer.accelerator))
        trainer.train()
        optimizer_class = seen.get("optimizer") or _optimizer_class(trainer.optimizer)
        engine = getattr(trainer, "deepspeed", None)  # DeepSpeedEngine under ZeRO, else None
        if engine is not None and hasattr(engine, "skipped_steps"):
            counted["deepspeed_skipped_steps"] = int(engine.skipped_steps)
    return RecipeResult(tuple(times), case.warmup_steps, optimizer_class, counted or None)


def rank_allocation(model: Any, case: Case) -> Any:
    """AdaLoRA: peft's ``update_and_allocate(global_step)`` of ``model`` (None otherwise)."""
    if case.plan.method != "adalora":
        return None
    peft_model = getattr(model, "module", model)  # DDP / accelerate wrappers
    return peft_model.base_model.update_and_allocate


# -- recipe: plain PyTorch loop --------------------------------------------------------------------------
def enable_checkpointing(model: Any) -> None:
    """Gradient (activation) checkpointing with ``use_reentrant=False``, any transformers 4/5."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def run_loop(
    model: Any,
    case: Case,
    device: str,
    compute_dtype: str,
    on_warmup_end: Any = None,
    on_step_end: Any = None,
) -> RecipeResult:
    """The same steps as a plain PyTorch loop (autocast, Trainer's optimizer, clipping)."""
    import torch
    from transformers import Trainer

    plan = case.plan
    with tempfile.TemporaryDirectory(prefix="vramcalc-loop-") as output_dir:
        args = training_arguments(case, device, compute_dtype, output_dir)  # before Accelerator:
        # TrainingArguments resets accelerate's state
    if plan.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    fsdp2 = case.simulate_world is not None and plan.strategy != "ddp" and not is_cuda(device)
    accelerator = None if fsdp2 else _loop_accelerator(model, case, device, compute_dtype)
    fsdp = accelerator is not None and _fsdp_plugin(accelerator) is not None
    if fsdp2:  # simulated world on CPU: FSDP2 fully_shard stands in for accelerate's FSDP1
        model = fully_shard_model(model, case, decoder_layer_classes(plan))
    elif fsdp:
        model = accelerator.prepare(model)  # FSDP: the optimizer sees the sharded parameters
    elif not is_cuda(device):
        model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = optimizer_cls(params, **optimizer_kwargs)
    _check_optimizer(case, optimizer)
    if accelerator is not None:
        if fsdp:
            optimizer = accelerator.prepare(optimizer)
        else:
            model, optimizer = accelerator.prepare(model, optimizer)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[compute_dtype]
    device_type = "cuda" if is_cuda(device) else "cpu"
    scaler = (
        torch.amp.GradScaler(device_type)
        if compute_dtype == "fp16" and accelerator is None
        else None
    )
    data = dataset_for(case, getattr(model, "module", model))  # DDP hides the config
    allocate = rank_allocation(model, case)
    rank, _, _ = rank_info()
    sample = rank * case.total_steps * plan.batch_size * plan.grad_accum  # this rank's share
    times: list[float] = []
    counted: dict[str, int] = {}
    synchronize(device)
    last = time.perf_counter()
    for step in range(case.total_steps):
        if step == case.warmup_steps:
            if on_warmup_end is not None:
                on_warmup_end()
            simulate_failure(case)
        for micro in range(plan.grad_accum):
            items = [data[sample + i] for i in range(plan.batch_size)]
            sample += plan.batch_size
            input_ids = torch.stack([it["input_ids"] for it in items]).to(device, non_blocking=True)
            labels = torch.stack([it["labels"] for it in items]).to(device, non_blocking=True)
            last_micro = micro == plan.grad_accum - 1
            with (
                accelerator.no_sync(model)
                if accelerator is not None and not last_micro
                else contextlib.nullcontext()
            ):
                with torch.autocast(device_type, dtype=dtype, enabled=compute_dtype != "fp32"):
                    loss = model(input_ids=input_ids, labels=labels).loss / plan.grad_accum
                if accelerator is not None:
                    accelerator.backward(loss)
                else:
                    (scaler.scale(loss) if scaler else loss).backward()
        if accelerator is not None:
            accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)  # as Trainer
            optimizer.step()
        else:
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        if allocate is not None:  # AdaLoRA: after the step, before zero_grad (peft's docs)
            allocate(step)
        if case.simulate_world is not None:  # gradients are still there
            counted = state_bytes(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        now = time.perf_counter()
        times.append(now - last)
        last = now
        if on_step_end is not None:
            on_step_end(len(times))
        if step >= case.warmup_steps and case.measured_enough(times[case.warmup_steps :]):
            break
    return RecipeResult(
        tuple(times), case.warmup_steps, _optimizer_class(optimizer), counted or None
    )


def _loop_accelerator(model: Any, case: Case, device: str, compute_dtype: str) -> Any:
    """accelerate's ``Accelerator`` for a multi-GPU loop (the launch env picks DDP or FSDP)."""
    if not is_distributed(case.plan):
        return None
    from accelerate import Accelerator

    accelerator = Accelerator(
        mixed_precision="no" if compute_dtype == "fp32" else compute_dtype,
        cpu=not is_cuda(device),
    )
    fsdp_peft_wrap(model, _fsdp_plugin(accelerator))
    return accelerator


def _fsdp_plugin(accelerator: Any) -> Any:
    return getattr(accelerator.state, "fsdp_plugin", None)


RECIPES = {"trainer": run_trainer, "loop": run_loop}
