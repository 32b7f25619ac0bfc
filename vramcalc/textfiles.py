"""The one reader of the text files people give vramcalc (``--from``, ``--cases``, a model's
``config.json``, ``adapter_config.json``, a DeepSpeed config).

Windows PowerShell's ``>`` writes UTF-16 with a byte-order mark, and editors save UTF-8 with
one; both are decoded by their mark (UTF-32 too). Anything else must be UTF-8: a file in
another encoding (a Latin-1 comment) is a ``TextFileError`` that says where the first bad
byte is and how to fix it, never a ``UnicodeDecodeError`` traceback.
"""

from __future__ import annotations

import codecs
from pathlib import Path

#: byte-order marks, longest first (UTF-32 LE starts with UTF-16 LE's mark)
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)


class TextFileError(ValueError):
    """A file's bytes are not text vramcalc can decode; the message is one sentence."""


def decode_text(data: bytes) -> str:
    """``data`` as text: decoded by its byte-order mark (UTF-8, UTF-16, UTF-32), else as
    UTF-8; a ``TextFileError`` otherwise."""
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom) :].decode(codec)
            except UnicodeDecodeError as err:
                raise TextFileError(
                    f"starts with a {name} byte-order mark but byte {err.start + len(bom)} "
                    f"is not {name}"
                ) from None
    if b"\x00" in data:
        raise TextFileError(
            "not UTF-8 text (it holds NUL bytes: UTF-16 without a byte-order mark?); save it as "
            "UTF-8"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise TextFileError(
            f"not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); save it as UTF-8 "
            "(or UTF-16 with a byte-order mark)"
        ) from None


def read_text(path: str | Path) -> str:
    """The text of ``path`` (see ``decode_text``); ``OSError`` when it cannot be read,
    ``TextFileError`` when it is not text in an encoding vramcalc reads."""
    return decode_text(Path(path).read_bytes())
