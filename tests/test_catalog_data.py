"""The bundled model catalog: configs load with built-in transformers classes and the
meta-device parameter count equals the independently derived ``params`` of each entry.

``params`` in ``data/models/catalog.yaml`` is not taken from transformers: it is a hand count
from the config (arithmetic in ``params_source``) cross-checked against published checkpoint
sizes. This test is the second, independent check that transformers builds the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

MODELS_DIR = Path(__file__).resolve().parent.parent / "data" / "models"
CATALOG = yaml.safe_load((MODELS_DIR / "catalog.yaml").read_text())
# Keys that describe a particular upload, not the architecture; they must not be bundled.
FORBIDDEN_KEYS = {"_name_or_path", "transformers_version", "quantization_config", "auto_map"}


def _config(entry: dict) -> dict:
    return json.loads((MODELS_DIR / entry["config"]).read_text())


def test_catalog_names_and_aliases_are_unique():
    keys = [k.lower() for e in CATALOG for k in (e["name"], *(e.get("aliases") or ()))]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("entry", CATALOG, ids=[e["name"] for e in CATALOG])
def test_entry_is_complete(entry):
    assert (MODELS_DIR / entry["config"]).is_file()
    assert entry["config"] == f"{entry['name']}/config.json"
    assert entry["config_source"] and entry["params_source"]
    assert isinstance(entry["params"], int) and entry["params"] > 0
    config = _config(entry)
    assert "model_type" in config
    assert not FORBIDDEN_KEYS & config.keys()


@pytest.mark.parametrize("entry", CATALOG, ids=[e["name"] for e in CATALOG])
def test_inventory_matches_catalog_params(entry):
    """vramcalc's own meta-device inventory (the estimator's path) gives the known count."""
    from vramcalc.inventory import build_inventory
    from vramcalc.training_plan import TrainingPlan

    inventory = build_inventory(
        _config(entry), TrainingPlan(entry["name"], method="full"), use_cache=False
    )
    assert inventory.total_params == entry["params"], (
        f"{entry['name']}: inventory {inventory.total_params:,} != catalog {entry['params']:,}"
    )
    assert inventory.tied_embeddings == bool(_config(entry).get("tie_word_embeddings", True)) or (
        inventory.params_by_role["lm_head"] > 0
    )
