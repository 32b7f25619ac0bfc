"""Sanity checks for the GPU catalog in data/gpus.csv.

The catalog is plain data with a source for every number; these tests only
check that it is well-formed and that the anchor readings are exact.
"""

import csv
import re
from pathlib import Path

import pytest

CSV_PATH = Path(__file__).resolve().parents[1] / "data" / "gpus.csv"

HEADER = [
    "name",
    "aliases",
    "vendor",
    "memory_bytes",
    "memory_source",
    "bf16_dense_tflops",
    "fp16_dense_tflops",
    "fp32_tflops",
    "memory_bandwidth_gbps",
    "price_per_hour_usd",
    "price_source",
    "price_date",
    "interconnect",
    "link_bidir_gbps",
    "pcie_bidir_gbps",
    "interconnect_source",
    "notes",
]

MiB = 2**20
GiB = 2**30
DATE_RE = re.compile(r"^\d{4}-\d{2}(-\d{2})?$")


def _read():
    with CSV_PATH.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [dict(zip(header, r, strict=True)) for r in reader]
        return header, rows


@pytest.fixture(scope="module")
def rows():
    return _read()[1]


def _by_name(rows):
    return {r["name"]: r for r in rows}


def test_header_exact():
    header, _ = _read()
    assert header == HEADER


def test_rows_have_all_columns():
    with CSV_PATH.open(newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f)):
            assert len(row) == len(HEADER), f"line {i + 1} has {len(row)} fields"


def test_names_unique_and_nonempty(rows):
    names = [r["name"] for r in rows]
    assert all(n.strip() == n and n for n in names)
    lowered = [n.lower() for n in names]
    assert len(set(lowered)) == len(lowered)


def test_aliases_do_not_collide(rows):
    # Every name and alias, compared case-insensitively, must map to exactly one row.
    owner = {r["name"].lower(): r["name"] for r in rows}
    for r in rows:
        aliases = [a for a in r["aliases"].split(";") if a != ""]
        assert all(a.strip() == a for a in aliases), r["name"]
        for a in aliases:
            key = a.lower()
            assert key not in owner, f"alias {a!r} of {r['name']} collides with {owner[key]}"
            owner[key] = r["name"]


def test_vendor(rows):
    assert {r["vendor"] for r in rows} <= {"NVIDIA", "AMD"}


def test_memory_bytes_whole_mib_and_in_range(rows):
    for r in rows:
        mem = int(r["memory_bytes"])
        assert mem % MiB == 0, r["name"]
        assert 8 * GiB <= mem <= 256 * GiB, r["name"]


@pytest.mark.parametrize(
    "column",
    [
        "bf16_dense_tflops",
        "fp16_dense_tflops",
        "fp32_tflops",
        "memory_bandwidth_gbps",
        "price_per_hour_usd",
        "link_bidir_gbps",
        "pcie_bidir_gbps",
    ],
)
def test_numbers_positive_where_present(rows, column):
    for r in rows:
        if r[column] != "":
            assert float(r[column]) > 0, (r["name"], column)


def test_every_row_is_sourced(rows):
    for r in rows:
        assert r["memory_source"].strip(), r["name"]
        assert r["price_source"].strip(), r["name"]
        if r["price_per_hour_usd"] != "":
            assert DATE_RE.match(r["price_date"]), (r["name"], r["price_date"])


def test_bf16_gaps_are_explained(rows):
    # An empty bf16 cell must be explained in the notes (e.g. T4: Turing has no BF16).
    for r in rows:
        if r["bf16_dense_tflops"] == "":
            assert "bf16" in r["notes"].lower() or "not sourced" in r["notes"].lower(), r["name"]


def test_t4_has_no_bf16(rows):
    assert _by_name(rows)["T4"]["bf16_dense_tflops"] == ""


def test_anchor_readings(rows):
    by = _by_name(rows)
    assert int(by["H100-80GB"]["memory_bytes"]) == 81559 * 2**20
    assert int(by["H200"]["memory_bytes"]) == 143771 * 2**20


INTERCONNECTS = ("nvswitch", "nvlink", "infinity-fabric", "pcie")
# PCIe x16 bidirectional rates as datasheets state them: Gen3 32, Gen4 64, Gen5 128 GB/s
PCIE_X16 = {32.0, 64.0, 128.0}


def test_every_row_says_how_its_gpus_talk_with_a_source(rows):
    for r in rows:
        assert r["interconnect"] in INTERCONNECTS, r["name"]
        assert float(r["pcie_bidir_gbps"]) in PCIE_X16, r["name"]
        assert len(r["interconnect_source"].strip()) > 40, r["name"]
        if r["interconnect"] == "pcie":
            assert r["link_bidir_gbps"] == "", r["name"]  # bridges join pairs: not assumed
        else:
            assert float(r["link_bidir_gbps"]) >= 300, r["name"]
            assert r["link_bidir_gbps"] in r["interconnect_source"].replace("GB/s", " "), r["name"]


def test_interconnect_anchor_readings(rows):
    by = _by_name(rows)
    assert (by["H100-80GB"]["interconnect"], by["H100-80GB"]["link_bidir_gbps"]) == (
        "nvswitch",
        "900",
    )
    assert by["H200"]["link_bidir_gbps"] == "900" and by["A100-80GB"]["link_bidir_gbps"] == "600"
    assert (by["H100-PCIe"]["interconnect"], by["H100-PCIe"]["pcie_bidir_gbps"]) == ("pcie", "128")
    assert by["RTX-4090"]["interconnect"] == "pcie" and by["T4"]["pcie_bidir_gbps"] == "32"


def test_the_loader_reads_the_interconnect():
    from vramcalc.catalog import find_gpu

    h100 = find_gpu("H100")
    assert (h100.interconnect, h100.link_bidir_gbps, h100.pcie_bidir_gbps) == (
        "nvswitch",
        900.0,
        128.0,
    )
    assert "NVLink" in h100.interconnect_source


def test_the_loader_refuses_an_unknown_interconnect(tmp_path, monkeypatch):
    from vramcalc import catalog
    from vramcalc.errors import CatalogError

    text = CSV_PATH.read_text(encoding="utf-8").replace(",nvswitch,900,", ",nvlinc,900,", 1)
    path = tmp_path / "gpus.csv"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(catalog, "GPUS_CSV", path)
    catalog.load_gpus.cache_clear()
    try:
        with pytest.raises(CatalogError, match="interconnect must be one of"):
            catalog.load_gpus()
    finally:
        catalog.load_gpus.cache_clear()
