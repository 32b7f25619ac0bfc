"""Third-party chatter kept off the terminal unless ``--verbose``.

transformers logs "The following generation flags are not valid and may be ignored" when it
builds a gemma-2 config, bitsandbytes' CPU backend logs about an optional kernels package,
and torch and peft raise Python warnings about things vramcalc does on purpose (meta
tensors, fake tensors). None of it is about the user's plan. A command runs inside
``libraries_quiet``: those libraries' loggers at ERROR and Python warnings ignored (vramcalc's
own warnings are ``Warning: ...`` lines, never the ``warnings`` module), restored afterwards.
With ``--verbose`` (``-v``) nothing is silenced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence

#: the libraries whose loggers are quieted
LIBRARIES = ("transformers", "peft", "bitsandbytes", "accelerate", "torch", "huggingface_hub")
VERBOSE_FLAGS = ("--verbose", "-v")


def asks_verbose(args: Sequence[str]) -> bool:
    """Whether a command line (after the command's name) asks for ``--verbose``."""
    return any(arg in VERBOSE_FLAGS for arg in args)


@contextlib.contextmanager
def libraries_quiet(quiet: bool = True) -> Iterator[None]:
    """Inside: the ``LIBRARIES``' logging at ERROR and Python warnings ignored (when
    ``quiet``); every level, filter and ``TRANSFORMERS_VERBOSITY`` as they were afterwards."""
    if not quiet:
        yield
        return
    # transformers sets its level from $TRANSFORMERS_VERBOSITY when it is first imported
    # (which happens inside, after this); one the user set is theirs to keep
    env_was = os.environ.get("TRANSFORMERS_VERBOSITY")
    if env_was is None:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    loggers = [logging.getLogger(name) for name in LIBRARIES]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        if env_was is None or logger.name != "transformers":
            logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if env_was is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
