"""``vramcalc models`` and ``vramcalc gpus``: the catalogs, as tables or JSON."""

from __future__ import annotations

import json

import click

from vramcalc import api
from vramcalc.cli.options import echo, json_option
from vramcalc.render.catalog import LINK_GPUS, render_gpus, render_models


@click.command()
@json_option("Print JSON instead of a table.")
def models(as_json: bool) -> None:
    """List the bundled model catalog (usable offline), with exact parameter counts."""
    entries = api.models()
    if as_json:
        echo(json.dumps([entry.to_dict() for entry in entries], indent=2))
    else:
        echo(render_models(entries))


@click.command()
@json_option("Print JSON instead of a table.")
def gpus(as_json: bool) -> None:
    """List the GPU catalog by memory: memory as the card reports it, peak bf16 and fp16
    (dense tensor) and fp32 TFLOP/s, bandwidth, the link between cards (NVLink, PCIe) with the
    NCCL bus bandwidth multi-GPU speed assumes over it, price."""
    table = api.gpus()
    if as_json:  # the catalog rows: interconnect columns with their sources
        echo(json.dumps([gpu.to_dict() for gpu in table], indent=2))
    else:
        echo(render_gpus(table, api.gpu_links(table, LINK_GPUS), LINK_GPUS))
