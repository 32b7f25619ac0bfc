"""Case files: YAML (cases, grids, defaults) and CSV, of training cases (``scenario.Case``) and
serving cases (``serve_case.ServeCase``, ``kind: serve``), one file possibly holding both."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from vramcalc.csvrows import CsvRow, column_name, read_csv
from vramcalc.training_plan import FIELD_KINDS, text_value
from vramcalc_harness.errors import CaseError
from vramcalc_harness.scenario import Case, case_from_mapping
from vramcalc_harness.serve_case import ServeCase, serve_case_from_mapping


def any_case_from_mapping(data: Mapping[str, Any], where: str) -> Case | ServeCase:
    """A training ``Case``, or a ``ServeCase`` when the mapping says ``kind: serve``."""
    if data.get("kind") == "serve":
        return serve_case_from_mapping(data, where)
    return case_from_mapping(data, where)


def case_from_dict(data: Mapping[str, Any]) -> Case | ServeCase:
    """``to_dict`` output of either kind of case back into its case (the worker's spec)."""
    return any_case_from_mapping(data, where="case")


# -- files -----------------------------------------------------------------------------------
def load_cases(path: str | Path) -> tuple[Case | ServeCase, ...]:
    """All cases of a ``.yaml``/``.yml`` or ``.csv`` file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise CaseError([f"cases file {path} does not exist."])
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise CaseError([f"{path}: not valid YAML ({err})"]) from err
        return cases_from_yaml_data(raw, source=path.name)
    if suffix == ".csv":
        try:
            table = read_csv(path)
        except (OSError, UnicodeDecodeError) as err:
            raise CaseError([f"{path}: cannot read it ({err})."]) from err
        return _cases_from_rows(table.rows, source=path.name)
    raise CaseError([f"cases file {path} must end in .yaml, .yml or .csv."])


def cases_from_yaml_data(raw: Any, source: str = "input") -> tuple[Case | ServeCase, ...]:
    """Cases from parsed YAML: a list of cases, or ``defaults``/``cases``/``grids``."""
    if raw is None:
        raise CaseError([f"{source}: the file holds no cases."])
    if isinstance(raw, list):
        raw = {"cases": raw}
    if not isinstance(raw, dict):
        raise CaseError([f"{source}: expected a list of cases or a mapping with cases/grids."])
    problems = []
    unknown = sorted(set(raw) - {"defaults", "cases", "grids", "rule", "notes"})
    problems += [
        f"{source}: unknown top-level key {k!r} (use defaults, cases, grids)." for k in unknown
    ]
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append(f"{source}: defaults must be a mapping of field: value.")
        defaults = {}
    entries: list[tuple[str, dict[str, Any]]] = []
    for i, item in enumerate(_as_list(raw.get("cases"), f"{source}: cases", problems)):
        if isinstance(item, dict):
            entries.append((f"{source} cases[{i}]", {**defaults, **item}))
        else:
            problems.append(f"{source} cases[{i}]: a case must be a mapping, got {item!r}.")
    for i, grid in enumerate(_as_list(raw.get("grids"), f"{source}: grids", problems)):
        if not isinstance(grid, dict):
            problems.append(f"{source} grids[{i}]: a grid must be a mapping, got {grid!r}.")
            continue
        expanded = expand_grid({**defaults, **grid}, f"{source} grids[{i}]", problems)
        entries.extend(expanded)
    return _build_all(entries, problems, source)


def expand_grid(
    grid: Mapping[str, Any], where: str, problems: list[str]
) -> list[tuple[str, dict[str, Any]]]:
    """Cross product of the grid's list values (scalars fixed), each with its label."""
    varying = {k: v for k, v in grid.items() if isinstance(v, list)}
    for key, options in varying.items():
        if not options:
            problems.append(f"{where}: {key} has an empty list of options.")
    if any(not options for options in varying.values()):
        return []
    fixed = {k: v for k, v in grid.items() if k not in varying}
    out = []
    for combo in itertools.product(*varying.values()):
        chosen = dict(zip(varying, combo, strict=True))
        label = ", ".join(f"{k}={_short(v)}" for k, v in chosen.items())
        out.append((f"{where} ({label})", {**fixed, **chosen}))
    return out


def cases_from_csv_rows(
    rows: Iterable[Mapping[str | None, Any]], source: str = "input"
) -> tuple[Case | ServeCase, ...]:
    """Cases from CSV rows as ``csv.DictReader`` gives them (text; empty cells mean the
    default; cells beyond the header under ``None``)."""
    table = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        cells = {column_name(k): str(v).strip() for k, v in row.items() if k is not None and v}
        extra = tuple(str(v) for v in (row.get(None) or ()) if str(v).strip())
        table.append(CsvRow(line, {k: v for k, v in cells.items() if v}, extra))
    return _cases_from_rows(table, source)


def _cases_from_rows(rows: Iterable[CsvRow], source: str) -> tuple[Case | ServeCase, ...]:
    problems: list[str] = []
    entries = []
    for row in rows:
        where = f"{source} line {row.line}"
        if row.extra:
            problems.append(f"{where}: more cells than header columns.")
        values = {
            name: _parse_cell(name, text, where, problems) for name, text in row.cells.items()
        }
        if values:
            entries.append((where, values))
    return _build_all(entries, problems, source)


#: what a cell of each field is, beyond the plan's fields (``training_plan.FIELD_KINDS``)
_CELL_KINDS = {
    **{name: "str" if kind == "tuple" else kind for name, kind in FIELD_KINDS.items()},
    **dict.fromkeys(("steps", "warmup_steps", "seed", "simulate_world"), "int"),
    **dict.fromkeys(("timeout_s", "min_seconds"), "float"),
    "record_trace": "bool",
    # serving cases (vramcalc_harness.serve_case)
    **dict.fromkeys(("adapters", "batch", "context", "prompt_tokens", "new_tokens"), "int"),
}
_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false"}


def _parse_cell(name: str, text: str, where: str, problems: list[str]) -> Any:
    """A cell read as its field's kind (``training_plan.text_value``, the reader of every plan
    value); ``default`` for quant is unset."""
    if name == "quant" and text.lower() == "default":
        return None
    kind = _CELL_KINDS.get(name, "str")
    try:
        return text_value(kind, text)
    except ValueError:
        problems.append(f"{where}: {name} must be {_KIND_WORDS[kind]}, got {text!r}.")
        return None


def _build_all(
    entries: list[tuple[str, dict[str, Any]]], problems: list[str], source: str
) -> tuple[Case | ServeCase, ...]:
    cases: list[Case | ServeCase] = []
    seen: dict[str, str] = {}
    for where, values in entries:
        values = {k: v for k, v in values.items() if v is not None or k == "targets"}
        try:
            case = any_case_from_mapping(values, where)
        except CaseError as err:
            problems.extend(err.problems)
            continue
        if case.case_id in seen:
            problems.append(
                f"{where}: repeats {seen[case.case_id]} (same plan, steps, seed, recipe)."
            )
            continue
        seen[case.case_id] = where
        cases.append(case)
    if not cases and not problems:
        problems.append(f"{source}: the file holds no cases.")
    if problems:
        raise CaseError(problems)
    return tuple(cases)


def select_split(
    cases: Iterable[Case | ServeCase], split: str | None
) -> tuple[Case | ServeCase, ...]:
    """The cases of one split (all cases when ``split`` is None)."""
    return tuple(c for c in cases if split is None or c.split == split)


def _as_list(value: Any, where: str, problems: list[str]) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        problems.append(f"{where} must be a list.")
        return []
    return value


def _short(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)
