"""The README matches the code: every key ``plan --json`` emits is documented, the layout
lists every module, the set-up commands are the ones CI runs, no internal machine details."""

from __future__ import annotations

import ast
import doctest
import json
import re
from pathlib import Path

from click.testing import CliRunner

from vramcalc.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(title)
    following = README.find("\n## ", start + len(title))
    nxt = README.find("\n### ", start + len(title))
    ends = [i for i in (following, nxt) if i != -1]
    return README[start : min(ends) if ends else len(README)]


def _documented() -> set[str]:
    return set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", _section("### `--json` schema")))


def _keys(value, prefix: str = "") -> set[str]:
    """Every key of ``value``, nested objects and the objects inside lists included."""
    out: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            out.add(key)
            if key not in ("rules",):  # rule names are free text per component
                out |= _keys(item)
    elif isinstance(value, list):
        for item in value:
            out |= _keys(item)
    return out


def test_every_emitted_json_key_is_documented():
    model = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"  # activations > 40 %: a hint
    args = ["plan", "--model", model, "--batch-size", "2", "--seq-len", "2048", "--steps", "10"]
    result = CliRunner().invoke(cli, [*args, "--strategy", "fsdp", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["hints"] and data["warnings"] and data["cost"]["gpus"]  # every part present
    keys = _keys({k: v for k, v in data.items() if k != "rules"})
    missing = sorted(keys - _documented())
    assert missing == []
    phases = set(data["phase_allocated_bytes"])
    row = next(line for line in README.splitlines() if line.startswith("| `peak_phase`"))
    assert set(re.findall(r"`([a-z_]+)`", row)) - {"peak_phase"} == phases


def _layout_blocks() -> dict[str, str]:
    """The Layout section's text per folder: ``vramcalc/`` and ``vramcalc_harness/`` start at the left
    margin, their subfolders (``  cli/``) are indented by two."""
    blocks: dict[str, str] = {}
    top = current = ""
    for line in _section("## Layout").splitlines():
        if re.match(r"^[a-z_]+/ ", line):
            top = current = line.split("/")[0]
        elif re.match(r"^  [a-z_]+/ ", line):
            current = f"{top}/{line.split('/')[0].strip()}"
        blocks[current] = blocks.get(current, "") + line + "\n"
    return blocks


def test_the_layout_draws_the_package_tree():
    """Every folder of the packages has its block in the layout, and every module is named in
    its own folder's block."""
    blocks = _layout_blocks()
    for package in (ROOT / "vramcalc", ROOT / "vramcalc_harness"):
        for folder in sorted({p.parent for p in package.rglob("__init__.py")}):
            key = str(folder.relative_to(ROOT))
            assert key in blocks, f"{key}/ has no block in the README layout"
            for path in sorted(folder.glob("*.py")):
                if path.name == "__init__.py" and len(ast.parse(path.read_text()).body) <= 1:
                    continue  # a docstring: the folder's line says it
                assert re.search(rf"\b{re.escape(path.name)}", blocks[key]), (
                    f"{key}/{path.name} is missing from its block of the README layout"
                )
    assert "memory/memtrace.py" in blocks["tests"]


def test_setup_commands_and_ci():
    assert (
        'pip install torch==2.13.0 && pip install -e ".[export]" && vramcalc plan --model '
        "meta-llama/Llama-2-13b --method qlora --rank 16" in README
    )
    test_command = 'pip install torch==2.13.0 && pip install -e ".[test]" -c constraints.txt && python -m pytest'
    assert test_command in README
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == test_command


def test_no_internal_details_of_our_machines():
    for text in (README, (ROOT / "data" / "gpus.csv").read_text()):
        for needle in ("KINDS.md", "device machine", "our machines", "/work/"):
            assert needle not in text


def _usage_lines(command: str) -> list[str]:
    block = _section("## Usage")
    return [line for line in block.splitlines() if line.startswith(f"vramcalc {command} --model")]


def test_readme_plan_examples_fit_something_except_the_one_said_not_to():
    lines = [line for line in _usage_lines("plan") if "./my-model-dir/" not in line]
    assert len(lines) == 5  # the AdaLoRA example included
    for line in lines:
        command, _, comment = line.partition("#")
        args = command.split()[1:]
        result = CliRunner().invoke(cli, [a for a in args if a != "--json"] + ["--json"])
        assert result.exit_code == 0, result.output
        fitting = [g["name"] for g in json.loads(result.stdout)["gpus"] if g["fits"]]
        assert bool(fitting) is ("fits no single GPU" not in comment), line


def test_readme_fit_examples_say_what_fit_answers():
    lines = _usage_lines("fit")
    assert len(lines) == 2
    for line in lines:
        command, _, comment = line.partition("#")
        result = CliRunner().invoke(cli, [*command.split()[1:], "--json"])
        assert result.exit_code == 0, result.output
        value = json.loads(result.stdout)["value"]
        assert comment.strip().endswith(f": {value:,}"), (line, value)


def test_the_python_api_example_runs():
    """The README's notebook example, run as a doctest: the outputs shown are the outputs."""
    section = _section("## Python API")
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "the Python API section has no python example"
    test = doctest.DocTestParser().get_doctest(code.group(1), {}, "README", "README.md", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False) == (0, len(test.examples))
