"""The click options that describe one training plan, shared by plan, sweep and fit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from vramcalc.plan import (
    ALLOCATORS,
    ATTNS,
    DTYPES,
    METHODS,
    OPTIMIZERS,
    PLAN_FIELDS,
    QUANTS,
    STRATEGIES,
    TrainingPlan,
    parse_targets,
    suggest,
)

if TYPE_CHECKING:
    from vramcalc.configs import FilePlan


class SuggestingChoice(click.Choice):
    """``click.Choice`` whose error also suggests the closest valid values."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as err:
            hint = suggest(str(value), [str(c) for c in self.choices])
            if hint:
                self.fail(f"{err.message}{hint}", param, ctx)
            raise


def plan_options(func):
    """The options that describe one training plan (shared by plan and friends)."""
    options = [
        click.option(
            "--model",
            "-m",
            default=None,
            help="Catalog name or alias (see 'vramcalc models'), a local dir/config.json, or a hub id "
            "(online). Required unless --from names a config file.",
        ),
        click.option(
            "--from",
            "from_file",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="Read the plan from a training config: axolotl, LLaMA-Factory, TRL or HF Trainer "
            "(YAML/JSON). Keys the file leaves out take that tool's defaults; flags given on the "
            "command line override the file.",
        ),
        click.option(
            "--method",
            type=SuggestingChoice(METHODS),
            default="lora",
            show_default=True,
            help="full: train every weight; lora: 16-bit or INT8 base + adapters; qlora: 4-bit base "
            "+ adapters; adalora: peft AdaLoRA (SVD-form adapters pruned from --init-rank to "
            "--target-rank).",
        ),
        click.option(
            "--quant",
            type=SuggestingChoice(QUANTS),
            default=None,
            help="Base-weight quantization (bitsandbytes). Default: nf4 for qlora, none otherwise; int8 with --method lora is INT8-LoRA.",
        ),
        click.option(
            "--double-quant/--no-double-quant",
            default=True,
            show_default=True,
            help="Quantize the 4-bit absmax constants again (QLoRA double quantization).",
        ),
        click.option(
            "--dtype",
            type=SuggestingChoice(DTYPES),
            default="bf16",
            show_default=True,
            help="Dtype the base weights are loaded in; training runs under bf16 autocast (full + fp32 = fp32 master weights; full + bf16 = pure bf16).",
        ),
        click.option(
            "--rank",
            "-r",
            type=int,
            default=8,
            show_default=True,
            help="LoRA rank r (AdaLoRA: use --init-rank).",
        ),
        click.option(
            "--alpha",
            type=float,
            default=None,
            help="LoRA alpha (default: equal to --rank, PEFT's scaling 1).",
        ),
        click.option(
            "--dropout",
            type=float,
            default=0.0,
            show_default=True,
            help="LoRA dropout (0 keeps no dropout mask).",
        ),
        click.option(
            "--targets",
            default=None,
            help="LoRA target modules, comma-separated (q_proj,v_proj) or 'all-linear'. Default: PEFT's default for the architecture.",
        ),
        click.option(
            "--dora/--no-dora",
            default=False,
            show_default=True,
            help="Weight-decomposed LoRA (peft use_dora): adds a fp32 magnitude per output row of each adapted module.",
        ),
        click.option(
            "--modules-to-save",
            default=None,
            help="Modules trained in full next to LoRA (peft modules_to_save), comma-separated, e.g. lm_head,embed_tokens.",
        ),
        *adalora_options(),
        click.option(
            "--seq-len", type=int, default=2048, show_default=True, help="Tokens per sequence."
        ),
        click.option(
            "--batch-size",
            "-b",
            type=int,
            default=1,
            show_default=True,
            help="Per-device micro-batch size.",
        ),
        click.option(
            "--grad-accum",
            type=int,
            default=1,
            show_default=True,
            help="Gradient accumulation steps (gradients stay live across micro-batches).",
        ),
        click.option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            default=None,
            help="Recompute each decoder layer in backward (use_reentrant=False). Default: on "
            "for k-bit base weights (qlora, --quant int8), as prepare_model_for_kbit_training "
            "does; off otherwise.",
        ),
        click.option(
            "--optimizer",
            type=SuggestingChoice(OPTIMIZERS),
            default="adamw_torch_fused",
            show_default=True,
            help="Trainer optimizer (Trainer's default is adamw_torch_fused).",
        ),
        click.option(
            "--attn",
            type=SuggestingChoice(ATTNS),
            default="sdpa",
            show_default=True,
            help="Attention implementation.",
        ),
        click.option(
            "--num-gpus",
            type=int,
            default=1,
            show_default=True,
            help="Data-parallel GPUs; memory is reported per GPU (each runs --batch-size).",
        ),
        click.option(
            "--strategy",
            type=SuggestingChoice(STRATEGIES),
            default="ddp",
            show_default=True,
            help="How --num-gpus > 1 shares state: ddp replicates; fsdp / zero3 shard everything; fsdp-grad-op / zero2 shard gradients + optimizer; zero1 shards the optimizer.",
        ),
        click.option(
            "--cpu-offload",
            is_flag=True,
            help="Offload optimizer states (and fsdp/zero3 parameter shards) to CPU.",
        ),
        click.option(
            "--allocator",
            type=SuggestingChoice(ALLOCATORS),
            default="default",
            show_default=True,
            help="PyTorch caching-allocator mode the run uses: default, or expandable "
            "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, less fragmentation slack).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def adalora_options() -> list:
    """AdaLoRA's options (peft ``AdaLoraConfig``, its defaults); only --method adalora reads them."""
    return [
        click.option(
            "--init-rank",
            type=int,
            default=12,
            show_default=True,
            help="AdaLoRA: initial rank of every adapted module (peft init_r); memory is held at it.",
        ),
        click.option(
            "--target-rank",
            type=int,
            default=8,
            show_default=True,
            help="AdaLoRA: average rank the budget schedule prunes to (peft target_r).",
        ),
        click.option(
            "--tinit",
            type=int,
            default=0,
            show_default=True,
            help="AdaLoRA: warm-up steps before ranks are pruned.",
        ),
        click.option(
            "--tfinal",
            type=int,
            default=0,
            show_default=True,
            help="AdaLoRA: final steps at the pruned ranks.",
        ),
        click.option(
            "--delta-t",
            type=int,
            default=1,
            show_default=True,
            help="AdaLoRA: steps between two budget allocations (peft deltaT).",
        ),
        click.option(
            "--total-step",
            type=int,
            default=None,
            help="AdaLoRA: total training steps (peft requires it for training; the memory "
            "estimate does not depend on it).",
        ),
        click.option(
            "--orth-reg-weight",
            type=float,
            default=0.5,
            show_default=True,
            help="AdaLoRA: weight of the orthogonal regularisation of P and Q (0 switches it off).",
        ),
    ]


def given_options(ctx: click.Context) -> frozenset[str]:
    """The options the user set on the command line (or through the environment)."""
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return frozenset(name for name in ctx.params if ctx.get_parameter_source(name) in given)


def given_plan_values(options: dict, given: frozenset[str]) -> dict[str, Any]:
    """The plan fields the user set on the command line, typed as ``TrainingPlan`` takes them."""
    out = {}
    for name in PLAN_FIELDS:
        if name in given:
            value = options[name]
            out[name] = parse_targets(value) if name in ("targets", "modules_to_save") else value
    return out


def plan_and_source(ctx: click.Context, options: dict) -> tuple[TrainingPlan, FilePlan | None]:
    """The plan the options describe: from ``--from FILE`` with the given flags on top, or from
    the flags alone. Pops ``from_file`` from ``options``."""
    path = options.pop("from_file", None)
    if path is None:
        if not options.get("model"):
            raise click.UsageError("Missing option '-m' / '--model' (or give --from FILE).")
        return plan_from_options(options), None
    from vramcalc.configs import read_plan_file

    source = read_plan_file(path, given_plan_values(options, given_options(ctx)))
    return source.plan, source


def plan_from_options(options: dict) -> TrainingPlan:
    """A validated ``TrainingPlan`` from parsed plan options."""
    return TrainingPlan(
        model=options["model"],
        method=options["method"],
        quant=options["quant"],
        double_quant=options["double_quant"],
        dtype=options["dtype"],
        rank=options["rank"],
        alpha=options["alpha"],
        dropout=options["dropout"],
        targets=parse_targets(options["targets"]),
        dora=options["dora"],
        modules_to_save=parse_targets(options["modules_to_save"]),
        seq_len=options["seq_len"],
        batch_size=options["batch_size"],
        grad_accum=options["grad_accum"],
        gradient_checkpointing=options["gradient_checkpointing"],
        optimizer=options["optimizer"],
        attn=options["attn"],
        num_gpus=options["num_gpus"],
        strategy=options["strategy"],
        cpu_offload=options["cpu_offload"],
        allocator=options["allocator"],
        **{name: options[name] for name in ADALORA_FIELDS if name in options},
    )


ADALORA_FIELDS = (
    "init_rank",
    "target_rank",
    "tinit",
    "tfinal",
    "delta_t",
    "total_step",
    "orth_reg_weight",
)
