"""`grid reproduce` on the 400-user Beauty slice: rows keyed by device, failures, time budget."""

import json

import pytest

import grid.reproduce as rp
from grid.cli import main
from grid.config import ROOT
from grid.sweep import load_sweep

from .test_sweep import popularity, sasrec, write_sweep

SPEC = {"table": "slice", "epochs": {"popularity": 0, "sasrec": 1}, "published": []}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private stage cache and operator counts; subprocesses import this checkout's grid."""
    monkeypatch.setenv("GRID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(tmp_path)
    counts = {
        "generator": "sasrec",
        "train_fixed": {"cuda_ops": 200},
        "eval_fixed": {"cuda_ops": 100},
    }
    (tmp_path / "overhead.jsonl").write_text(json.dumps(counts) + "\n")
    monkeypatch.setattr(rp, "OVERHEAD", tmp_path / "overhead.jsonl")


def reproduce(path, results, *args) -> int:
    return main(["reproduce", str(path), "--results", str(results), "--out", "out", *args])


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_are_recorded_once_failed_ones_too(small_beauty, tmp_path, capsys):
    missing = tmp_path / "no_such_data"
    args = [a for a in popularity(small_beauty) if not a.startswith("data.path")]
    grid = {"data.path": [str(small_beauty), str(missing)]}
    path = write_sweep(tmp_path, grid=grid, seeds=[0], overrides=args, reproduce=SPEC)
    results = tmp_path / "results.jsonl"
    assert reproduce(path, results, "--archive", "runs.tar.gz") == 0
    good, bad = lines(results)
    assert (good["status"], good["device_kind"], good["seed"]) == ("finished", "cpu", 0)
    assert good["metrics"]["test/recall@10"] > 0 and good["torch"] and good["device"]
    assert bad["status"] == "failed" and str(missing) in bad["error"] and "metrics" not in bad
    assert (tmp_path / "runs.tar.gz").is_file()
    capsys.readouterr()
    assert reproduce(path, results) == 0  # every row is in the results: nothing runs again
    assert len(lines(results)) == 2 and capsys.readouterr().out.count("done ") == 2
    # a row measured on another device kind does not count for this one
    results.write_text(json.dumps({**good, "device_kind": "gpu"}) + "\n")
    assert reproduce(path, results, "--dry-run") == 0
    assert capsys.readouterr().out.count("start ") == 2


def test_rows_that_do_not_fit_are_skipped_and_overruns_not_recorded(
    small_beauty, tmp_path, capsys, monkeypatch
):
    spec = {**SPEC, "epochs": {"sasrec": 1}}
    counts = {
        "generator": "sasrec",
        "train_fixed": {"cuda_ops": 10**8},
        "eval_fixed": {"cuda_ops": 1},
    }
    slow = tmp_path / "overhead.jsonl"
    slow.write_text(json.dumps(counts) + "\n")  # an hour a step: never fits
    path = write_sweep(
        tmp_path, grid={"generator.blocks": [1]}, seeds=[0], overrides=sasrec(small_beauty)
    )
    results = tmp_path / "results.jsonl"
    path.write_text(path.read_text() + "reproduce: " + json.dumps(spec) + "\n")
    assert reproduce(path, results, "--minutes", "5") == 0
    out = capsys.readouterr().out
    assert "skipped generator.blocks=1 seed=0: projected" in out and not results.exists()
    slow.write_text(slow.read_text().replace("100000000", "1"))
    monkeypatch.setattr(rp, "STARTUP_S", 0.0)  # projected to fit, then stopped by the clock
    assert reproduce(path, results, "--minutes", "0.02") == 0  # killed after ~1 s
    assert "not recorded, resumes next time" in capsys.readouterr().out
    assert not results.exists()


def test_table_puts_seeds_together_beside_the_published_figure(tmp_path):
    spec = {**SPEC, "published": [{"match": {"generator": "sasrec"}, "test/recall@10": 0.05}]}
    path = write_sweep(tmp_path, grid={"generator": ["sasrec"]}, seeds=[0, 1], reproduce=spec)
    results = tmp_path / "results.jsonl"
    for seed, recall in ((0, 0.04), (1, 0.06)):
        rp.append_row(
            results,
            {
                "table": "slice",
                "row": "generator=sasrec",
                "values": {"generator": "sasrec"},
                "seed": seed,
                "device_kind": "gpu",
                "device": "H100",
                "status": "finished",
                "best_epoch": 3,
                "metrics": {"test/recall@10": recall, "test/ndcg@10": 0.02},
            },
        )
    row = rp.table(path, results).splitlines()[-1]
    assert row == (
        "| generator=sasrec | gpu: H100 | 2 | 0.0500 ± 0.0141 | 0.0200 ± 0.0000 | 0.0500 | 3/3 "
        "| – | – |"
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"epochs": {"tiger": 5}}, "needs a table name and epochs"),
        ({"table": "t", "epochs": {"tiger": -1}}, "reproduce.epochs.tiger=-1 must be"),
        ({"table": "t", "epochs": {}, "published": [{"recall": 1}]}, "must list {match"),
        ({"table": "t", "epochs": {}, "extra": 1}, "must hold table, epochs, published"),
    ],
)
def test_bad_reproduce_sections_are_one_line(tmp_path, spec, message):
    path = write_sweep(tmp_path, grid={"x": [1]}, reproduce=spec)
    with pytest.raises(Exception, match=message.replace("{", r"\{")):
        load_sweep(path)
