"""The ``vramcalc`` command line: each command parses its options, calls one function of
``vramcalc.api`` and renders the result (``vramcalc.render``). Nothing else.

Library errors (``VramcalcError``) become one ``Error: ...`` line here (exit 1); third-party
logging and warnings stay quiet unless ``--verbose`` (``cli/quiet.py``). Each command
lives in the module of its family and is imported when it runs (``vramcalc plan`` loads
neither the sweep nor the harness); ``measure`` comes from the harness when it is installed.
"""

from __future__ import annotations

import importlib

import click

from vramcalc.cli.options import status_line
from vramcalc.cli.quiet import asks_verbose, libraries_quiet
from vramcalc.collector import tune
from vramcalc.errors import VramcalcError
from vramcalc.progress import reporting

#: command name -> (module, attribute); optional modules may be missing (the harness)
COMMANDS = {
    "plan": ("vramcalc.cli.plan", "plan"),
    "models": ("vramcalc.cli.catalog", "models"),
    "gpus": ("vramcalc.cli.catalog", "gpus"),
    "sweep": ("vramcalc.cli.capacity", "sweep"),
    "fit": ("vramcalc.cli.capacity", "fit"),
    "advise": ("vramcalc.cli.advise", "advise"),
    "check": ("vramcalc.cli.check", "check"),
    "compare": ("vramcalc.cli.compare", "compare"),
    "serve": ("vramcalc.cli.serve", "serve"),
    "report": ("vramcalc.cli.report", "report"),
    "speed-report": ("vramcalc.cli.speed", "speed_report"),
    "speed-fit": ("vramcalc.cli.speed", "speed_fit"),
    "measure": ("vramcalc_harness.cli", "measure"),
}
OPTIONAL = ("vramcalc_harness.cli",)


class _Group(click.Group):
    """Commands loaded when they are used; every library error one ``Error: ...`` line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if self.get_command(ctx, name) is not None)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attribute = COMMANDS[cmd_name]
        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if module in OPTIONAL and err.name == module.split(".")[0]:
                return None  # not installed
            raise
        command: click.Command = getattr(loaded, attribute)
        return command

    def invoke(self, ctx: click.Context):

        line = status_line()
        # third-party logging and warnings off the terminal unless the command asks --verbose
        # (the command line after the command's name: click 8.2+ keeps it in _protected_args)
        protected = getattr(ctx, "_protected_args", None) or ctx.protected_args
        quiet = not asks_verbose([*protected[1:], *ctx.args])
        try:
            with reporting(line), libraries_quiet(quiet):
                return super().invoke(ctx)
        except VramcalcError as err:
            raise click.ClickException(str(err)) from err
        finally:
            line.clear()


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


def main() -> None:
    tune()  # the collector's thresholds for a planning process (vramcalc/collector.py)
    cli(prog_name="vramcalc")


if __name__ == "__main__":  # pragma: no cover
    main()
