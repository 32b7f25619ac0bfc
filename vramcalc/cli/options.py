"""The click options the commands share: one training plan's (plan, sweep, fit, advise), the
GPU(s), the headroom, the run length, the report folders; ``plan_and_source`` reads them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from vramcalc.api import read_config
from vramcalc.budget import DEFAULT_HEADROOM
from vramcalc.configs import FilePlan
from vramcalc.training_plan import (
    ALLOCATORS,
    ATTNS,
    DTYPES,
    METHODS,
    OPTIMIZERS,
    PLAN_FIELDS,
    QUANTS,
    STRATEGIES,
    TrainingPlan,
    plan_from_values,
    suggest,
)

F = TypeVar("F", bound=Callable[..., Any])


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
    for option in reversed(_plan_option_list()):
        func = option(func)
    return func


def check_plan_options(func):
    """``check``'s plan options: ``--from`` takes several files or globs, and the other plan
    options, given, override every file."""
    for option in reversed(_plan_option_list(several_files=True)):
        func = option(func)
    return func


def _plan_option_list(several_files: bool = False) -> list:
    from_file = (
        click.option(
            "--from",
            "from_files",
            multiple=True,
            required=True,
            help="Training config(s) to check: axolotl, LLaMA-Factory, TRL or HF Trainer "
            "(YAML/JSON); repeat it, or give a glob such as 'configs/*.yaml' (quoted).",
        )
        if several_files
        else click.option(
            "--from",
            "from_file",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="Read the plan from a training config: axolotl, LLaMA-Factory, TRL or HF "
            "Trainer (YAML/JSON). Keys the file leaves out take that tool's defaults; flags "
            "given on the command line override the file.",
        )
    )
    options = [
        click.option(
            "--model",
            "-m",
            default=None,
            help="Catalog name or alias (see 'vramcalc models'), a local dir/config.json, or a hub id "
            "(online). Required unless --from names a config file.",
        ),
        from_file,
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
    return options


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


def plan_and_source(ctx: click.Context, options: dict) -> TrainingPlan | FilePlan:
    """What the plan options describe: the config file of ``--from`` with the flags given on
    top (``read_config``), or the plan of the flags alone. Pops the plan options."""
    path = options.pop("from_file", None)
    values = {name: options.pop(name) for name in PLAN_FIELDS if name in options}
    if path is not None:
        given = given_options(ctx)
        return read_config(path, **{name: values[name] for name in values if name in given})
    if not values.get("model"):
        raise click.UsageError("Missing option '-m' / '--model' (or give --from FILE).")
    return plan_from_values(values)


def option_group(*options: Callable[[F], F]) -> Callable[[F], F]:
    """Several click options as one decorator, in the order given."""

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def gpus_option(help: str) -> Callable[[F], F]:
    """``--gpu`` taking several GPUs (repeat or comma-separate)."""
    return click.option("--gpu", "gpus", multiple=True, help=help)


def gpu_option(help: str) -> Callable[[F], F]:
    """``--gpu`` naming the one GPU a command works on."""
    return click.option("--gpu", required=True, help=help)


headroom_option = click.option(
    "--headroom",
    default=f"{DEFAULT_HEADROOM:.0%}",
    show_default=True,
    help="Memory to leave free when judging fits, the same default in every command: 5% or "
    "0.05. A plan fits a GPU when its device total <= GPU memory x (1 - headroom).",
)


allocator_model_option = click.option(
    "--allocator-model",
    type=click.Choice(["simulate", "approximate"]),
    default=None,
    show_default="simulate",
    help="How peak reserved memory is found. simulate: the recipe's training step traced once "
    "on fake tensors and the run (loading, 3 steps) replayed through a model of PyTorch's "
    "caching allocator, for every plan (cached). approximate: a calibrated fraction of peak "
    "allocated instead, faster and a few per cent off; every output marks it.",
)

_QUIET: list[bool] = []


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        _QUIET.append(True)
    return value


quiet_option = click.option(
    "--quiet",
    "-q",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_set_quiet,
    help="No progress line on stderr (it shows only on a terminal, while the recipe is "
    "traced, the model built or runs replayed).",
)


def hide_status_line() -> None:
    """The command shows its own progress (sweep's bar): no status line."""
    _QUIET.append(True)


_SHOWN: list[status_line] = []  # the status line on the terminal now (echo clears it)


class status_line:  # noqa: N801 - used as a function: status_line()
    """Progress notes as one line on stderr, rewritten in place (a terminal only, and not
    under ``--quiet``); ``clear`` removes it, as ``echo`` does before any of the command's
    own output, which would otherwise start on the same line."""

    def __init__(self, stream: Any = None) -> None:
        import sys

        self.stream = stream or sys.stderr
        self.shown = False

    def __call__(self, message: str) -> None:
        if _QUIET or not getattr(self.stream, "isatty", lambda: False)():
            return
        import shutil

        width = max(shutil.get_terminal_size((100, 20)).columns - 1, 20)
        text = f"vramcalc: {message}"
        if len(text) > width:
            text = text[: width - 1] + "…"
        self.stream.write(f"\r\033[K{text}")
        self.stream.flush()
        self.shown = True
        if self not in _SHOWN:
            _SHOWN.append(self)

    def erase(self) -> None:
        """Take the line off the terminal (the next note writes it again)."""
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False
        if self in _SHOWN:
            _SHOWN.remove(self)

    def clear(self) -> None:
        """The command is done: the line erased, ``--quiet`` and ``hide_status_line`` reset."""
        self.erase()
        _QUIET.clear()


def echo(message: str = "", err: bool = False, nl: bool = True) -> None:
    """``click.echo`` for a command's output and warnings: the status line erased first,
    so that the output starts at the beginning of a line."""
    for line in list(_SHOWN):
        line.erase()
    click.echo(message, err=err, nl=nl)


def echo_result(result: Any, as_json: bool, render: Callable[[], str]) -> None:
    """A command's answer: its warnings on stderr (``Warning: ...``), then ``result.to_dict()``
    as JSON with ``--json``, else ``render()``."""
    for warning in result.warnings:
        echo(f"Warning: {warning}", err=True)
    echo(json.dumps(result.to_dict(), indent=2) if as_json else render())


def json_option(help: str = "Print one JSON object instead of the report.") -> Callable[[F], F]:
    return click.option("--json", "as_json", is_flag=True, help=help)


def run_length_options(dataset_help: str) -> Callable[[F], F]:
    """The run's length and price: ``--dataset-tokens``, ``--epochs``, ``--steps``,
    ``--price-per-hour``."""
    return option_group(
        click.option("--dataset-tokens", type=int, default=None, help=dataset_help),
        click.option(
            "--epochs", type=float, default=None, help="Passes over --dataset-tokens (default 1)."
        ),
        click.option(
            "--steps",
            type=int,
            default=None,
            help="Optimizer steps of the run, instead of --dataset-tokens.",
        ),
        click.option(
            "--price-per-hour",
            type=float,
            default=None,
            help="USD per GPU-hour, overriding the catalog's price for every GPU.",
        ),
    )


measurements_option = click.option(
    "--measurements",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of harness JSONL files (default: data/measurements/).",
)


def out_option(files: str) -> Callable[[F], F]:
    """``--out``: the report folder, whose committed report is the gate's baseline."""
    return click.option(
        "--out",
        "out_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("reports"),
        show_default=True,
        help=f"Where {files} are written. The report already there is the baseline the "
        "regression gate compares with.",
    )


no_gate_option = click.option(
    "--no-gate", is_flag=True, help="Write the report but exit 0 even if a figure regressed."
)
