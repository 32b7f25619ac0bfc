"""Text for a plan read with ``--from FILE``: each field with where it came from, the keys
used, the keys ignored with the reason."""

from __future__ import annotations

from typing import Any

from vramcalc.configs import FilePlan
from vramcalc.render.tables import table

FORMAT_NAMES = {
    "axolotl": "axolotl",
    "llama-factory": "LLaMA-Factory",
    "trl": "TRL",
    "trainer": "HF Trainer",
}


def _value(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    if value is None:
        return "default"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def render_file_plan(source: FilePlan) -> str:
    """The provenance block ``plan`` prints above its report."""
    rows = []
    for name, field in source.sources.items():
        where = field.origin + (f" ({field.key})" if field.key else "")
        rows.append([name, _value(field.value), where, field.note])
    lines = [
        f"plan read from {source.path} ({FORMAT_NAMES[source.format]} config); "
        "flags given on the command line override it",
        "",
        table(rows, ["field", "value", "from", "note"]),
        "",
        f"keys used ({len(source.used_keys)}): " + ", ".join(source.used_keys),
        f"keys ignored ({len(source.ignored_keys)}):",
    ]
    by_reason: dict[str, list[str]] = {}
    for key, reason in source.ignored_keys.items():
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        lines.append(f"  - {', '.join(keys)}: {reason}")
    for note in source.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
