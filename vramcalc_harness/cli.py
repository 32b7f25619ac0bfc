"""``vramcalc measure``: the click command of the harness (parse, call the launcher, render)."""

from __future__ import annotations

from pathlib import Path

import click

from vramcalc.errors import VramcalcError
from vramcalc_harness.caselist import load_cases, select_split
from vramcalc_harness.errors import CaseError
from vramcalc_harness.launcher import (
    DEFAULT_TIMEOUT_S,
    DEVICES,
    check_models,
    plan_run,
    resolve_device,
    run_cases,
)
from vramcalc_harness.scenario import SPLITS, Case, simulated
from vramcalc_harness.serve_case import ServeCase

HELP = """Measure real fine-tuning steps of every case in CASES and append one JSON line
per case to OUTPUT.

CASES is a YAML or CSV file of training plans (the estimator's fields: model,
method, quant, rank, targets, seq_len, batch_size, grad_accum,
gradient_checkpointing, optimizer, ...) plus steps, warmup_steps, seed, split
(calibration|validation) and recipe (trainer|loop). YAML may hold grids: each
list value is a set of options and the grid expands to their cross product.

\b
The recipe, for each case, in a fresh process:
  1. build: the model's catalog config -> AutoModelForCausalLM.from_config
     with random weights (seed 0), saved once per model and dtype under
     --scratch, then from_pretrained with the plan's dtype and attention;
     int8/nf4/fp4 load through bitsandbytes (NF4/FP4 with double quant as
     asked), then prepare_model_for_kbit_training; LoRA/QLoRA add peft
     adapters (r, alpha, dropout, targets); full trains every weight.
  2. train: HF Trainer (recipe 'trainer', default) or a plain PyTorch loop
     ('loop'), bf16 autocast where supported, the plan's micro-batch,
     gradient accumulation, checkpointing (use_reentrant=False) and
     optimizer, on random token ids of exactly seq_len, labels = inputs;
     warmup_steps untimed, then steps timed with a device synchronize.
  3. track: peak max_memory_allocated / max_memory_reserved, device-wide
     used memory (NVML or mem_get_info, CUDA context included), memory after
     load, median step seconds, tokens/s, parameter counts, provenance.

\b
Multi-GPU cases (num_gpus > 1; strategy ddp|fsdp|fsdp-grad-op|zero1|zero2|
zero3; cpu_offload) run one process per GPU: python -m vramcalc_harness.agent turns a
generated accelerate config (under --scratch/launch/<case_id>/) into the env
of accelerate launch and starts torch.distributed.run. ddp is MULTI_GPU;
fsdp/fsdp-grad-op are FSDP FULL_SHARD/SHARD_GRAD_OP with transformer-layer
wrap, use_orig_params, CPU-RAM-efficient loading (4-bit weights stored as
the plan's dtype); zero1/2/3 write a DeepSpeed JSON (deepspeed must be
installed); cpu_offload is FSDP offload_params / ZeRO offload_optimizer.
Each rank measures its own GPU; the record holds the maximum over ranks
(per-GPU figures), tokens_per_second per GPU, tokens_per_second_all_gpus
and per_rank. An OOM on any rank makes the case "oom"; a timeout kills
every rank. NVLink multicast stays off (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).

\b
Simulated worlds (--simulate-world N, or a case's simulate_world: N) run
one process as rank 0 of an N-GPU world on one device (torch's fake
process group: collectives move no data): per-GPU memory of the plan with
num_gpus N under ddp (pass-through comm hook), fsdp or fsdp-grad-op (on
CUDA accelerate's FSDP, as the real path; on CPU FSDP2 fully_shard in
recipe loop). Records carry simulated_world_size, simulated_world_limits
and rank 0's parameter/gradient/optimizer-state bytes; their tokens/s are
not a speed measurement.

\b
Serving cases (kind: serve, vramcalc_harness.serve_case) load the base the same way,
add LoRA adapters with random A and B, apply them by mode (merged: one
merged copy; unmerged: set_adapter; multi: adapter_names per sequence) and
time generate: prefill (max_new_tokens=1) and decode of new_tokens, greedy,
static or dynamic cache. Records: kind "serve", the peaks, prefill and
decode tokens/s.

An out-of-memory case is recorded as status "oom", a case over --timeout-s
as "timeout", any other failure as "error" with the traceback's tail; the run
goes on. Rerunning skips cases already in OUTPUT for the same device. On CPU,
GPU memory figures are null (not measured). On CUDA the memory instrument is
checked first: a known 1 GiB allocation must read back within 1 %.
"""


@click.command(
    "measure",
    help=HELP,
    short_help="Measure real training steps of a case list on one GPU or several.",
)
@click.argument("cases", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON-lines file the results are appended to, e.g. data/measurements/h100.jsonl.",
)
@click.option(
    "--timeout-s",
    type=click.FloatRange(min=1),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Seconds a case may take (a case's own timeout_s wins).",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="Where to train: cuda, cpu, or cuda when visible.",
)
@click.option(
    "--scratch",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for random-init checkpoints and worker logs "
    "[default: $VRAMCALC_SCRATCH or <tmp>/vramcalc-scratch].",
)
@click.option(
    "--only-split",
    type=click.Choice(SPLITS),
    default=None,
    help="Run only the cases of this split.",
)
@click.option(
    "--retry-errors",
    is_flag=True,
    help="Run again cases whose last result is error or timeout (not oom).",
)
@click.option(
    "--stop-after-s",
    type=click.FloatRange(min=0),
    default=None,
    help="Start no new case after this many seconds (to fit a time slot); rerun to go on.",
)
@click.option(
    "--skip-instrument-check",
    is_flag=True,
    help="Do not check the memory instrument (1 GiB read back within 1 %) before a CUDA run.",
)
@click.option(
    "--simulate-world",
    type=click.IntRange(min=2),
    default=None,
    metavar="N",
    help="Run every case as rank 0 of an N-GPU world on one device (fake process group): "
    "per-GPU memory of the plan with num_gpus N under its strategy (ddp, fsdp, fsdp-grad-op); "
    "no speed, no NCCL buffers.",
)
@click.option(
    "--sparse-checkpoints",
    is_flag=True,
    help="When a model's random-init checkpoint cannot fit the scratch disk (a 70B model is "
    "~140 GB in bf16), write a sparse all-zero one instead: save_pretrained's files, names, "
    "shapes and dtypes, every tensor a file hole; loaded by the normal path. Records say "
    "checkpoint_weights: zeros.",
)
@click.option(
    "--dry-run", is_flag=True, help="List the cases and whether each is done; run nothing."
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def measure(
    cases: Path,
    output: Path,
    timeout_s: float,
    device: str,
    scratch: Path | None,
    only_split: str | None,
    retry_errors: bool,
    stop_after_s: float | None,
    skip_instrument_check: bool,
    simulate_world: int | None,
    sparse_checkpoints: bool,
    dry_run: bool,
    no_progress: bool,
) -> None:
    try:
        selected = select_split(load_cases(cases), only_split)
        if simulate_world is not None:
            serving = [c.case_id for c in selected if isinstance(c, ServeCase)]
            if serving:
                raise CaseError(
                    [f"--simulate-world runs training cases; {len(serving)} serving cases given."]
                )
            selected = tuple(simulated(case, simulate_world) for case in selected)  # type: ignore[arg-type]
        problems = check_models(selected)
        if dry_run:
            resolved = resolve_device(device)
            planned = plan_run(selected, output, resolved, retry_errors)
            for item in planned:
                click.echo(("done  " if item.done else "todo  ") + describe(item.case))
            todo = sum(not p.done for p in planned)
            click.echo(
                f"{len(planned)} cases: {todo} to run, {len(planned) - todo} done on {resolved} -> {output}"
            )
        if problems:
            raise click.ClickException("models that do not resolve: " + " | ".join(problems))
        if dry_run:
            return
        summary = run_cases(
            selected,
            output,
            device=device,
            timeout_s=timeout_s,
            scratch_dir=scratch,
            retry_errors=retry_errors,
            stop_after_s=stop_after_s,
            progress=not no_progress,
            check_instrument=not skip_instrument_check,
            sparse_checkpoints=sparse_checkpoints,
        )
    except CaseError as err:
        raise click.ClickException(
            f"invalid cases in {cases}:\n" + "\n".join(f"  - {p}" for p in err.problems)
        ) from err
    except VramcalcError as err:
        raise click.ClickException(str(err)) from err
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.statuses.items())) or "nothing new"
    click.echo(
        f"ran {summary.ran} ({counts}), skipped {summary.skipped} already done, "
        f"{summary.left} left, on {summary.device} -> {summary.output}"
        + (" (stopped early: --stop-after-s)" if summary.stopped_early else "")
    )


def describe(case: Case | ServeCase) -> str:
    """One line of ``--dry-run``: id, split, recipe and the plan's key choices."""
    if isinstance(case, ServeCase):
        return case.describe()
    plan = case.plan
    if plan.uses_adapters:
        targets = ",".join(plan.targets) if plan.targets else "default"
        method = f"{plan.method}/{plan.quant} r{plan.rank} {targets}"
    else:
        method = f"{plan.method}/{plan.quant}"
    gpus = ""
    if plan.num_gpus > 1:
        gpus = f" gpus {plan.num_gpus} {plan.strategy}" + (" offload" if plan.cpu_offload else "")
        if case.simulate_world is not None:
            gpus += " simulated"
    return (
        f"{case.split:<11} {case.case_id} {case.recipe:<7} {plan.model} {method} "
        f"seq {plan.seq_len} bs {plan.batch_size} ga {plan.grad_accum} "
        f"gc {'on' if plan.gradient_checkpointing else 'off'} {plan.optimizer}{gpus}"
    )
