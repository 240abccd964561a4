"""`grid data fetch` and `data.text`: the metadata parser, the ASIN join and the download path,
on a small Beauty slice and a metadata fixture in the Amazon 2014 format (one dict literal a line).
"""

from __future__ import annotations

import gzip
import json

import pytest
from omegaconf import OmegaConf

from grid.cli import main
from grid.config import compose
from grid.data import load_dataset, read_items
from grid.errors import GridError
from grid.metadata import fetch, parse_record, text_fields
from grid.report import group, load_runs
from tests.conftest import beauty_slice

MISSING = 3  # catalogue items the fixture leaves out


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """The first 30 Beauty users and their items (real ASINs), plain format."""
    return beauty_slice(tmp_path_factory.mktemp("slice"), 30)


def record(asin: str, k: int) -> dict:
    """A metadata record shaped like the 2014 files' (key order varies there too)."""
    return {
        "asin": asin,
        "description": f"Description of item {k}.\nSecond line.",
        "title": f"Item {k} \u2013 Nail Lacquer",
        "price": 5.0 + k,
        "imUrl": f"http://example.invalid/{asin}.jpg",
        "related": {"also_bought": ["B000000000"], "also_viewed": [asin]},
        "salesRank": {"Beauty": 1000 + k},
        "categories": [["Beauty", "Makeup", "Nails"], ["Beauty", "Nail Polish"]],
        **({"brand": f"Brand {k % 4}"} if k % 2 else {}),
    }


@pytest.fixture(scope="module")
def metadata(catalogue, tmp_path_factory):
    """meta_Beauty.json.gz for the slice: every item but the first MISSING, plus 2 malformed
    lines, a blank line, a JSON line, a duplicate and records of items outside the catalogue."""
    ids, _ = read_items(catalogue / "items.jsonl")
    lines = [repr(record("B00NOTHERE", -1)), repr(record(ids[0], -2))[:60]]  # a line cut off
    for k, asin in enumerate(ids[MISSING:]):
        lines.append(repr(record(asin, k)))
    lines[5] = json.dumps({**record(ids[MISSING + 3], 3), "fragile": True, "gift": None})
    lines += ["", "__import__('os').system('touch HACKED')", repr(record(ids[-1], 999))]
    path = tmp_path_factory.mktemp("meta") / "meta_Beauty.json.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return path, ids


def data_cfg(catalogue, **fields):
    """The beauty data config pointed at the slice (its own name, so its own fetched file)."""
    overrides = ["data=beauty", f"data.path={catalogue}", "data.name=beauty_slice"]
    return compose(overrides=overrides + [f"data.{k}={v}" for k, v in fields.items()]).data


@pytest.fixture
def user_data(tmp_path, monkeypatch):
    monkeypatch.setenv("GRID_DATA", str(tmp_path / "userdata"))
    return tmp_path / "userdata"


def test_parse_record_reads_literals_and_json_without_evaluating(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = "{'asin': 'B01', 'price': 8.35, 'categories': [['Beauty', 'Skin Care']]}"
    assert parse_record(line) == {
        "asin": "B01",
        "price": 8.35,
        "categories": [["Beauty", "Skin Care"]],
    }
    assert parse_record('{"asin": "B02", "gift": true, "brand": null}')["gift"] is True
    for bad in [
        "{'asin': 'B03', 'title': 'cut",
        "__import__('os').system('touch HACKED')",
        "[1, 2]",
        "{'title': 'no asin'}",
        "{'asin': 7}",
    ]:
        assert parse_record(bad) is None
    assert not (tmp_path / "HACKED").exists()


def test_text_fields_flatten_categories_and_drop_empty_values():
    fields = text_fields(
        {
            "asin": "B01",
            "title": "  Red  Polish ",
            "brand": "",
            "price": float("nan"),
            "categories": [["Beauty", "Makeup"], ["Beauty", "Nails"]],
        }
    )
    assert fields == {
        "title": "Red Polish",
        "brand": None,
        "categories": ["Beauty", "Makeup", "Nails"],
        "price": None,
        "description": None,
    }


def test_fetch_joins_by_asin_into_the_user_data_folder(catalogue, metadata, user_data):
    path, ids = metadata
    bundled = (catalogue / "items.jsonl").read_bytes()
    result = fetch(data_cfg(catalogue), "beauty", source=path, say=lambda _: None)
    n = len(ids)
    assert result.items_file == user_data / "beauty_slice" / "items.jsonl.gz"
    assert result.with_text == n - MISSING and len(result.scan.records) == n - MISSING
    assert result.scan.malformed == 2 and result.scan.first_malformed == 2
    assert result.scan.duplicates == 1  # the last record repeats an ASIN: the first one is kept
    assert result.field_counts["title"] == n - MISSING
    assert result.field_counts["brand"] == sum(k % 2 for k in range(n - MISSING))
    assert (catalogue / "items.jsonl").read_bytes() == bundled  # the bundled file is untouched

    out_ids, items = read_items(result.items_file)
    assert out_ids == ids
    first = items[MISSING]
    assert first["title"] == "Item 0 \u2013 Nail Lacquer" and first["price"] == 5.0
    assert first["categories"] == ["Beauty", "Makeup", "Nails", "Nail Polish"]
    assert first["description"] == "Description of item 0. Second line."
    assert first["pseudo_text_idgenrec"]  # the bundled fields stay
    assert items[-1]["title"] == f"Item {n - MISSING - 1} \u2013 Nail Lacquer"  # not 999
    assert items[MISSING + 3]["title"] == "Item 3 \u2013 Nail Lacquer"  # the JSON line
    for missing in items[:MISSING]:
        assert missing["title"] is None and missing["pseudo_text_idgenrec"]
    provenance = json.loads((user_data / "beauty_slice" / "metadata.json").read_text())
    assert provenance["items_with_text"] == n - MISSING and provenance["malformed_lines"] == 2


def test_download_from_a_file_url_gives_the_same_items(catalogue, metadata, user_data, tmp_path):
    path, _ = metadata
    by_hand = fetch(data_cfg(catalogue), "beauty", source=path, say=lambda _: None)
    first = by_hand.items_file.read_bytes()
    said = []
    cfg = data_cfg(catalogue, metadata_url=path.as_uri())
    result = fetch(cfg, "beauty", say=said.append)
    assert result.source == user_data / "beauty_slice" / "meta_Beauty.json.gz"
    assert result.source.read_bytes() == path.read_bytes()
    assert said[0].startswith(f"downloaded {path.as_uri()} -> {result.source}")
    assert result.items_file.read_bytes() == first  # byte-identical: same embedding cache key
    assert not list(result.source.parent.glob("*.part"))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "is a truncated or corrupt gzip file"),
        ("other", "only 0 of the"),
        ("garbage", "holds no metadata records"),
        ("sha", "data.metadata_sha256 is"),
    ],
)
def test_fetch_refuses_a_bad_file(catalogue, metadata, user_data, tmp_path, damage, message):
    path, _ = metadata
    bad, fields = tmp_path / "meta.json.gz", {}
    if damage == "truncate":
        bad.write_bytes(path.read_bytes()[:-200])
    elif damage == "other":
        bad.write_text(repr(record("B00NOTHERE", 1)) + "\n")
    elif damage == "garbage":
        bad.write_text("<html>not found</html>\n")
    else:
        bad, fields = path, {"metadata_sha256": "0" * 64}
    with pytest.raises(GridError, match=message):
        fetch(data_cfg(catalogue, **fields), "beauty", source=bad, say=lambda _: None)
    assert not (user_data / "beauty_slice" / "items.jsonl.gz").exists()


def test_data_text_selects_the_item_file(catalogue, metadata, user_data):
    with pytest.raises(GridError, match="run `grid data fetch sports` first"):
        load_dataset(compose(overrides=["data=sports", "data.text=metadata"]).data)
    with pytest.raises(GridError, match="beauty_slice/items.jsonl.gz does not exist"):
        load_dataset(data_cfg(catalogue, text="metadata"))
    fetch(data_cfg(catalogue), "beauty", source=metadata[0], say=lambda _: None)
    pseudo = load_dataset(data_cfg(catalogue))
    real = load_dataset(data_cfg(catalogue, text="metadata"))
    assert pseudo.item_ids == real.item_ids and pseudo.users == real.users
    assert pseudo.items[MISSING]["title"] is None and real.items[MISSING]["title"]
    assert pseudo.fingerprint != real.fingerprint  # so the embedding cache key differs
    with pytest.raises(GridError, match="data.text='real' is not one of pseudo, metadata"):
        load_dataset(OmegaConf.merge(data_cfg(catalogue), {"text": "real"}))


def test_cli_fetch_then_report_keeps_text_sources_apart(
    catalogue, metadata, user_data, tmp_path, capsys
):
    path, ids = metadata
    slice_args = [f"data.path={catalogue}", "data.name=beauty_slice"]
    assert main(["data", "fetch", "beauty", *slice_args, "--from", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"read {path}: {len(ids) + 1:,} lines, 2 malformed")
    assert out[1].startswith(f"{len(ids) - MISSING} of {len(ids)} beauty_slice items got text")
    offline = "http://127.0.0.1:9/meta_Beauty.json.gz"  # nothing listens on the discard port
    assert main(["data", "fetch", "beauty", *slice_args, "--url", offline]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot download {offline}" in err[0] and "--from FILE" in err[0]

    base = ["data=beauty", *slice_args, "generator=popularity", "trainer.logger=none"]
    env = [f"cache_dir={tmp_path / 'cache'}"]
    for text in ("pseudo", "metadata"):
        for seed in (1, 2):
            args = [*base, *env, f"data.text={text}", f"seed={seed}"]
            assert main(["run", *args, "--out", str(tmp_path / "runs" / f"{text}{seed}")]) == 0
    configs = group(load_runs([tmp_path / "runs"]))
    assert [c.settings for c in configs] == [{"data.text": "metadata"}, {"data.text": "pseudo"}]
    assert [len(c.runs) for c in configs] == [2, 2]
