"""The versions a plan traces, and the versions the committed measurements ran."""

from __future__ import annotations

import json

from vramcalc import versions
from vramcalc.measurements import MEASUREMENTS_DIR


def test_calibration_lists_the_versions_every_committed_record_ran():
    seen: dict[str, set[str]] = {}
    for path in sorted(MEASUREMENTS_DIR.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                for name in versions.measured_versions():
                    if record.get(f"{name}_version"):
                        seen.setdefault(name, set()).add(record[f"{name}_version"])
    assert {name: {v} for name, v in versions.measured_versions().items()} == seen


def test_an_estimate_says_what_it_traced_and_warns_on_other_versions(monkeypatch):
    installed = dict(versions.installed_versions())
    monkeypatch.setattr(
        versions,
        "installed_versions",
        lambda: tuple({**installed, "transformers": "5.17.0", "peft": "0.21.0"}.items()),
    )
    assert versions.version_note() == (
        "traced with transformers 5.17.0, peft 0.21.0: the versions the committed GPU "
        "measurements ran"
    )
    monkeypatch.setattr(
        versions,
        "installed_versions",
        lambda: tuple({**installed, "transformers": "5.25.0", "peft": "0.21.0"}.items()),
    )
    assert versions.version_note() == (
        "WARNING: traced with transformers 5.25.0 (measured: 5.17.0): no committed GPU "
        "measurement ran these versions, so this estimate follows their code but is unchecked "
        "(other versions allocate differently)"
    )
