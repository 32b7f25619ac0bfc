"""``vramcalc serve``: parse, call ``vramcalc.api.serve``, render."""

from __future__ import annotations

import sys

import click

from vramcalc import api
from vramcalc.cli.options import (
    SuggestingChoice,
    echo_result,
    gpus_option,
    headroom_option,
    json_option,
)
from vramcalc.render.serve import render_serve_result
from vramcalc.serve_plan import CACHES, LOGITS, MODES
from vramcalc.serving.serve_planner import FIT_TARGETS
from vramcalc.training_plan import ATTNS, DTYPES, QUANTS

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
@gpus_option("GPU(s) to check (repeat or comma-separate). Default: every GPU of the catalog.")
@click.option(
    "--fit",
    "fit_target",
    type=SuggestingChoice(FIT_TARGETS),
    default=None,
    help="With one --gpu: find the largest batch (at --context) or context (at --batch and --new-tokens) that fits.",
)
@headroom_option
@click.option(
    "--allocator-model",
    type=click.Choice(["simulate", "approximate"]),
    default=None,
    show_default="simulate",
    help="How peak allocated and reserved memory are found. simulate: the run the harness "
    "measures (loading, the adapters, 1 warm-up and 3 timed rounds of generate) traced on fake "
    "tensors and replayed through a model of PyTorch's caching allocator (cached; seconds to a "
    "minute the first time). approximate: rules for the forward's temporaries and a calibrated "
    "fraction for the allocator's slack; every output marks it.",
)
@json_option("Print one JSON object (schema in docs/json-schema.md).")
def serve(
    model, num_adapters, rank, alpha, targets, adapter_dir, context, prompt_tokens, new_tokens,
    gpus, fit_target, headroom, allocator_model, as_json, **options,
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
    result = api.serve(
        model,
        adapters=num_adapters,
        adapter_dir=adapter_dir,
        rank=rank,
        alpha=alpha,
        targets=targets,
        context=context,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        gpus=gpus,
        fit=fit_target,
        headroom=headroom,
        allocator_model=allocator_model,
        **options,
    )
    echo_result(result, as_json, lambda: render_serve_result(result, all_gpus=bool(gpus)))
    if result.fit is not None and result.fit.value is None:
        sys.exit(NOTHING_FITS)
