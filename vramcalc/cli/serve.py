"""``vramcalc serve``: parse, call ``serve_planner.serve_result``, render."""

from __future__ import annotations

import json
import sys

import click

from vramcalc.cli.options import SuggestingChoice
from vramcalc.plan import ATTNS, DTYPES, QUANTS, parse_targets
from vramcalc.serve_plan import CACHES, LOGITS, MODES
from vramcalc.serving.serve_planner import FIT_TARGETS

#: exit status when --fit finds nothing that fits (as ``vramcalc fit``)
NOTHING_FITS = 3


@click.command()
@click.option(
    "--model",
    "-m",
    default=None,
    help="Catalog name or alias, local dir/config.json, or hub id. Default with --adapter-dir: the adapters' base_model_name_or_path.",
)
@click.option(
    "--quant",
    type=SuggestingChoice(QUANTS),
    default="none",
    show_default=True,
    help="Base-weight quantization (bitsandbytes).",
)
@click.option(
    "--double-quant/--no-double-quant",
    default=True,
    show_default=True,
    help="4-bit double quantization of the absmax constants.",
)
@click.option(
    "--dtype",
    type=SuggestingChoice(DTYPES),
    default="bf16",
    show_default=True,
    help="Dtype of the weights (non-quantized), the compute and the KV cache.",
)
@click.option(
    "--adapters",
    "num_adapters",
    type=int,
    default=None,
    help="Serve N LoRA adapters of --rank and --targets (default 1; 0: the base alone).",
)
@click.option(
    "--rank", "-r", type=int, default=8, show_default=True, help="LoRA rank of --adapters."
)
@click.option(
    "--alpha",
    type=float,
    default=None,
    help="LoRA alpha of --adapters (no effect on memory or speed).",
)
@click.option(
    "--targets",
    default=None,
    help="LoRA target modules of --adapters, comma-separated or all-linear. Default: peft's for the architecture.",
)
@click.option(
    "--adapter-dir",
    type=click.Path(),
    default=None,
    help="Read the adapters' peft adapter_config.json files: the directory's own, or one per subdirectory.",
)
@click.option(
    "--mode",
    type=SuggestingChoice(MODES),
    default="unmerged",
    show_default=True,
    help="merged: each adapter merged into its own copy of the base; unmerged: adapters beside one base, one per batch; multi: adapters mixed in one batch.",
)
@click.option("--batch", "-b", type=int, default=1, show_default=True, help="Concurrent sequences.")
@click.option(
    "--context",
    type=int,
    default=None,
    help="Tokens per sequence, prompt + generated (default 4096).",
)
@click.option("--prompt-tokens", type=int, default=None, help="Prompt tokens per sequence.")
@click.option(
    "--new-tokens", type=int, default=None, help="Generated tokens per sequence (default 256)."
)
@click.option(
    "--cache",
    type=SuggestingChoice(CACHES),
    default="dynamic",
    show_default=True,
    help="generate's KV cache: dynamic grows; static pre-allocates the whole context.",
)
@click.option(
    "--logits",
    type=SuggestingChoice(LOGITS),
    default="last",
    show_default=True,
    help="last: generate's logits_to_keep=1; all: a plain forward's logits of every position.",
)
@click.option(
    "--attn",
    type=SuggestingChoice(ATTNS),
    default="sdpa",
    show_default=True,
    help="Attention implementation.",
)
@click.option(
    "--gpu",
    "gpus",
    multiple=True,
    help="GPU(s) to check (repeat or comma-separate). Default: every GPU of the catalog.",
)
@click.option(
    "--fit",
    "fit_target",
    type=SuggestingChoice(FIT_TARGETS),
    default=None,
    help="With one --gpu: find the largest batch (at --context) or context (at --batch and --new-tokens) that fits.",
)
@click.option(
    "--headroom",
    type=float,
    default=0.05,
    show_default=True,
    help="With --fit: fraction of the GPU's memory left free.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (schema in README).")
def serve(
    model, num_adapters, rank, alpha, targets, adapter_dir, context, prompt_tokens, new_tokens,
    gpus, fit_target, headroom, as_json, **options,
) -> None:  # fmt: skip
    """Estimate the GPU memory and speed of serving a base model with LoRA adapters.

    Counts the base and every adapter exactly on the meta device, sizes the KV cache
    as transformers' generate allocates it (GQA, sliding windows, dynamic or static),
    and prints the peak memory, the GPUs it fits with prefill and decode tokens/s, and
    the adapters' and a merged checkpoint's size on disk.

    \b
    Example:
      vramcalc serve --model meta-llama/Llama-2-13b --quant nf4 --adapters 20 --mode multi \\
                     --batch 16 --context 4096 --gpu L40S
      vramcalc serve --adapter-dir ./adapters/ --mode merged --gpu RTX-4090 --fit batch
    """
    from vramcalc.planner import choose_gpus
    from vramcalc.render.serve import render_serve_result
    from vramcalc.serve_plan import (
        ServePlan,
        context_split,
        read_adapter_dir,
        uniform_adapters,
    )
    from vramcalc.serving.serve_planner import serve_result

    if adapter_dir is not None and num_adapters is not None:
        raise click.UsageError("--adapters and --adapter-dir exclude each other.")
    if num_adapters is not None and num_adapters < 0:
        raise click.BadParameter("must be 0 or more", param_hint="--adapters")
    if adapter_dir is not None:
        adapters = read_adapter_dir(adapter_dir)
    else:
        adapters = uniform_adapters(
            1 if num_adapters is None else num_adapters, rank, alpha, parse_targets(targets)
        )
    if model is None:
        bases = {a.base_model for a in adapters if a.base_model}
        if len(bases) != 1:
            raise click.UsageError("Missing option '-m' / '--model'.")
        model = bases.pop()
    prompt, new = context_split(context, prompt_tokens, new_tokens)
    plan = ServePlan(
        model=model, adapters=adapters, prompt_tokens=prompt, new_tokens=new, **options
    )
    result = serve_result(plan, choose_gpus(list(gpus)), fit_target, headroom)
    for warning in result.warnings:
        click.echo(f"Warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(render_serve_result(result, all_gpus=bool(gpus)))
    if result.fit is not None and result.fit.value is None:
        sys.exit(NOTHING_FITS)
