"""The progress line on a terminal (``cli/options.py::status_line``): notes rewrite one line
on stderr, and the command's own output never starts on that line."""

from __future__ import annotations

import io
import sys

from vramcalc.cli import cli
from vramcalc.cli.options import echo, status_line

ERASE = "\r\033[K"


class Terminal(io.StringIO):
    """stdout and stderr of one terminal."""

    def isatty(self) -> bool:
        return True


def test_echo_erases_the_shown_note_first(capsys):
    terminal = Terminal()
    line = status_line(terminal)
    line("tracing the training step of Llama-2-13b QLoRA")
    assert terminal.getvalue() == f"{ERASE}vramcalc: tracing the training step of Llama-2-13b QLoRA"
    echo("the answer")
    assert terminal.getvalue().endswith(f"QLoRA{ERASE}")
    assert capsys.readouterr().out == "the answer\n"
    line.clear()  # nothing shown: nothing more written
    assert terminal.getvalue().endswith(f"QLoRA{ERASE}")


def test_no_note_off_a_terminal():
    stream = io.StringIO()
    line = status_line(stream)
    line("tracing")
    echo("", err=True)
    assert stream.getvalue() == ""


def test_a_plans_answer_starts_on_a_line_of_its_own(monkeypatch, tiny_llama_dir, tmp_path):
    """A cold plan notes what it builds; its first line of output follows an erase, not the
    note (it used to continue the note's line)."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv("VRAMCALC_CACHE_DIR", str(tmp_path / "cache"))
    args = ["plan", "--model", str(tiny_llama_dir), "--method", "lora", "--seq-len", "256"]
    cli.main(args, standalone_mode=False)
    text = terminal.getvalue()
    assert text.startswith(f"{ERASE}vramcalc: building tiny-llama LoRA on the meta device")
    notes, _, answer = text.rpartition(ERASE)
    assert notes.count(ERASE) == notes.count("vramcalc:") >= 2  # each note rewrites the line
    assert answer.startswith(f"{tiny_llama_dir} — lora, seq 256 x batch 1")


def test_the_tracing_note_says_which_plans_are_traced_apart():
    from vramcalc.trace.recipe import regime_words
    from vramcalc.training_plan import TrainingPlan

    window = {"model_type": "mistral", "sliding_window": 4096}
    plan = TrainingPlan(model="m", batch_size=4, seq_len=2048)
    assert regime_words({}, plan) == "once per recipe"
    assert regime_words({}, plan.with_(batch_size=1)) == (
        "once per recipe; batch size 1 traced apart"
    )
    assert regime_words(window, plan) == (
        "once per recipe; sequences under 4,096 tokens traced apart"
    )
    assert regime_words(window, plan.with_(seq_len=8192, rank=1, batch_size=1)) == (
        "once per recipe; sequences of 4,096+ tokens, batch size 1, rank 1 traced apart"
    )
