"""The ``vramcalc`` command line: parse, call the library, render. Nothing else."""

from __future__ import annotations

import json
import sys

import click

from vramcalc.errors import VramcalcError
from vramcalc.plan import (
    ATTNS,
    DTYPES,
    METHODS,
    OPTIMIZERS,
    QUANTS,
    STRATEGIES,
    TrainingPlan,
    parse_targets,
    suggest,
)


class _Choice(click.Choice):
    """``click.Choice`` whose error also suggests the closest valid values."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as err:
            hint = suggest(str(value), [str(c) for c in self.choices])
            if hint:
                self.fail(f"{err.message}{hint}", param, ctx)
            raise


class _Group(click.Group):
    """Turn every library error into one ``Error: ...`` line (exit 1)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VramcalcError as err:
            raise click.ClickException(str(err)) from err


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vramcalc")
def cli() -> None:
    """How much GPU memory an LLM fine-tuning run needs, before you rent the GPU.

    \b
    Examples:
      vramcalc plan --model meta-llama/Llama-2-13b --method qlora --rank 16
      vramcalc plan --model Qwen/Qwen2.5-7B --method full --gpu H100-80GB --json
      vramcalc models        # the bundled model catalog (works offline)
      vramcalc gpus          # the GPU catalog
    """


def plan_options(func):
    """The options that describe one training plan (shared by plan and friends)."""
    options = [
        click.option("--model", "-m", required=True, help="Catalog name or alias (see 'vramcalc models'), a local dir/config.json, or a hub id (online)."),
        click.option("--method", type=_Choice(METHODS), default="lora", show_default=True, help="full: train every weight; lora: 16-bit or INT8 base + adapters; qlora: 4-bit base + adapters."),
        click.option("--quant", type=_Choice(QUANTS), default=None, help="Base-weight quantization (bitsandbytes). Default: nf4 for qlora, none otherwise; int8 with --method lora is INT8-LoRA."),
        click.option("--double-quant/--no-double-quant", default=True, show_default=True, help="Quantize the 4-bit absmax constants again (QLoRA double quantization)."),
        click.option("--dtype", type=_Choice(DTYPES), default="bf16", show_default=True, help="Dtype the base weights are loaded in; training runs under bf16 autocast (full + fp32 = fp32 master weights; full + bf16 = pure bf16)."),
        click.option("--rank", "-r", type=int, default=8, show_default=True, help="LoRA rank r."),
        click.option("--alpha", type=float, default=None, help="LoRA alpha (default: equal to --rank, PEFT's scaling 1)."),
        click.option("--dropout", type=float, default=0.0, show_default=True, help="LoRA dropout (0 keeps no dropout mask)."),
        click.option("--targets", default=None, help="LoRA target modules, comma-separated (q_proj,v_proj) or 'all-linear'. Default: PEFT's default for the architecture."),
        click.option("--seq-len", type=int, default=2048, show_default=True, help="Tokens per sequence."),
        click.option("--batch-size", "-b", type=int, default=1, show_default=True, help="Per-device micro-batch size."),
        click.option("--grad-accum", type=int, default=1, show_default=True, help="Gradient accumulation steps (gradients stay live across micro-batches)."),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False, show_default=True, help="Recompute each decoder layer in backward (use_reentrant=False)."),
        click.option("--optimizer", type=_Choice(OPTIMIZERS), default="adamw_torch_fused", show_default=True, help="Trainer optimizer (Trainer's default is adamw_torch_fused)."),
        click.option("--attn", type=_Choice(ATTNS), default="sdpa", show_default=True, help="Attention implementation."),
        click.option("--num-gpus", type=int, default=1, show_default=True, help="Data-parallel GPUs; memory is reported per GPU (each runs --batch-size)."),
        click.option("--strategy", type=_Choice(STRATEGIES), default="ddp", show_default=True, help="How --num-gpus > 1 shares state: ddp replicates; fsdp / zero3 shard everything; fsdp-grad-op / zero2 shard gradients + optimizer; zero1 shards the optimizer."),
        click.option("--cpu-offload", is_flag=True, help="Offload optimizer states (and fsdp/zero3 parameter shards) to CPU."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


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
        seq_len=options["seq_len"],
        batch_size=options["batch_size"],
        grad_accum=options["grad_accum"],
        gradient_checkpointing=options["gradient_checkpointing"],
        optimizer=options["optimizer"],
        attn=options["attn"],
        num_gpus=options["num_gpus"],
        strategy=options["strategy"],
        cpu_offload=options["cpu_offload"],
    )


@cli.command()
@plan_options
@click.option("--gpu", "gpus", multiple=True, help="GPU(s) to check the fit and speed on (repeat or comma-separate). Default: every GPU of the catalog.")
@click.option("--dataset-tokens", type=int, default=None, help="Tokens in the training set: prices the run (with --epochs) on every GPU that fits.")
@click.option("--epochs", type=float, default=None, help="Passes over --dataset-tokens (default 1).")
@click.option("--steps", type=int, default=None, help="Optimizer steps of the run, instead of --dataset-tokens.")
@click.option("--price-per-hour", type=float, default=None, help="USD per GPU-hour, overriding the catalog's price for every GPU.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (schema in README) instead of the report.")
def plan(gpus, dataset_tokens, epochs, steps, price_per_hour, as_json, **options) -> None:
    """Estimate the GPU memory, speed and cost of one fine-tuning run.

    Counts every parameter exactly on the meta device (no weights, no GPU, no
    network for catalog models), applies each memory component's rule, and
    prints peak allocated / reserved / device-total memory, which GPUs it fits
    with their predicted tokens/s, and — given --dataset-tokens or --steps —
    the wall time and dollars on each GPU that fits.

    \b
    Example:
      vramcalc plan --model meta-llama/Llama-2-13b --method qlora --rank 16 \\
                    --seq-len 2048 --batch-size 4 --gpu RTX-4090 --dataset-tokens 50000000
    """
    from vramcalc.cost import RunLength
    from vramcalc.planner import choose_gpus, plan_result
    from vramcalc.render import render_plan_result

    the_plan = plan_from_options(options)
    wants_cost = dataset_tokens is not None or steps is not None or epochs is not None
    run = RunLength(dataset_tokens, epochs, steps) if wants_cost else None
    result = plan_result(the_plan, choose_gpus(list(gpus)), run, price_per_hour)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else render_plan_result(result))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models(as_json: bool) -> None:
    """List the bundled model catalog (usable offline), with exact parameter counts."""
    from vramcalc.catalog import model_catalog

    entries = model_catalog()
    if as_json:
        click.echo(json.dumps([{"name": e.name, "aliases": list(e.aliases), "params": e.params} for e in entries], indent=2))
        return
    click.echo(f"{'model':<52}{'parameters':>16}  aliases")
    for e in entries:
        params = f"{e.params:,}" if e.params else "?"
        click.echo(f"{e.name:<52}{params:>16}  {', '.join(e.aliases)}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def gpus(as_json: bool) -> None:
    """List the GPU catalog: memory as the card reports it, peak bf16 TFLOP/s, price."""
    from vramcalc.catalog import load_gpus
    from vramcalc.render import gib

    table = load_gpus()
    if as_json:
        click.echo(json.dumps([g.__dict__ | {"aliases": list(g.aliases)} for g in table], indent=2))
        return
    click.echo(f"{'GPU':<16}{'memory':>14}{'bf16 TFLOP/s':>14}{'$/hour':>9}  aliases")
    for g in table:
        tflops = f"{g.peak_tflops:g}" if g.peak_tflops else "-"
        price = f"{g.price_per_hour_usd:.2f}" if g.price_per_hour_usd else "-"
        click.echo(f"{g.name:<16}{gib(g.memory_bytes):>14}{tflops:>14}{price:>9}  {', '.join(g.aliases)}")


def _register_commands() -> None:
    """Commands that live in their own modules (each a thin click layer too)."""
    import importlib

    for module, names in (
        ("vramcalc.cli_capacity", ("sweep", "fit")),
        ("vramcalc.cli_report", ("report",)),
        ("harness.cli", ("measure",)),
    ):
        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real missing dependency inside the module
                raise
            continue
        for name in names:
            cli.add_command(getattr(loaded, name))


_register_commands()


def main() -> None:
    cli(prog_name="vramcalc")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
