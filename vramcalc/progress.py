"""What a long computation is doing, told to whoever listens (the CLI: one line on stderr).

Tracing a recipe, building a model on the meta device or replaying a run through the
allocator model take from a fraction of a second to a minute. The library announces each
such step with ``note``; nothing is printed unless a caller installed a listener with
``reporting`` (the CLI does, on a terminal, unless ``--quiet``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

_LISTENERS: list[Callable[[str], None]] = []


def note(message: str) -> None:
    """Announce what starts now (e.g. "tracing the training step of Llama-2-13b QLoRA")."""
    for listener in _LISTENERS:
        listener(message)


@contextlib.contextmanager
def reporting(listener: Callable[[str], None]) -> Iterator[None]:
    """Call ``listener`` with every note made inside."""
    _LISTENERS.append(listener)
    try:
        yield
    finally:
        _LISTENERS.remove(listener)


def describe(model: str, method: str, quant: str | None) -> str:
    """A plan's recipe in a few words: "Llama-2-13b-hf QLoRA (nf4)"."""
    name = model.rstrip("/").rsplit("/", 1)[-1]
    label = {"qlora": "QLoRA", "lora": "LoRA", "adalora": "AdaLoRA", "full": "full fine-tuning"}
    text = f"{name} {label.get(method, method)}"
    return text + (f" ({quant})" if quant and quant != "none" else "")
