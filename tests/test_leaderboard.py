"""The leaderboard: sweep cells, peak memory, Pareto fronts, the leaderboard table and plots, and
inference re-timed in one process, on real runs over the 400-user Beauty slice."""

import json
import math

import matplotlib.image
import pytest
import yaml

from grid.cli import main
from grid.config import ROOT, compose
from grid.report import pareto_front
from grid.runner import measure_inference
from grid.sweep import cells, load_sweep, plan, run_id

pytestmark = pytest.mark.usefixtures("one_thread")

LEADERBOARD = ROOT / "experiments" / "sweep_leaderboard.yaml"


def write_sweep(folder, **fields):
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def test_cells_cross_the_grid_and_seeds_and_swept_values_pick_them(tmp_path):
    listed = [{"tokenizer": "opq", "generator": "rpg"}, {"generator": "sasrec"}]
    path = write_sweep(tmp_path, cells=listed, grid={"data": ["beauty", "toys"]}, seeds=[1, 2])
    sweep = load_sweep(path)
    assert sweep.keys == ["tokenizer", "generator", "data", "seed"]
    assert cells(sweep) == [
        cell | {"data": data, "seed": seed}
        for cell in listed
        for data in ("beauty", "toys")
        for seed in (1, 2)
    ]
    runs = plan(sweep, tmp_path / "out")
    for run, cell in zip(runs, cells(sweep), strict=True):
        cfg = compose(None, run.args)  # what `grid run ARGS` composes
        assert run_id(cfg) == run.run_id and cfg.generator.name == cell["generator"]
        assert cfg.tokenizer.name == cell.get("tokenizer", "rkmeans") and cfg.seed == cell["seed"]
    # swept values on the command line pick cells; the runs keep the full sweep's ids
    picked = plan(sweep, tmp_path / "out", extra=["data=toys", "seed=2", "trainer.val_users=9"])
    assert [r.values for r in picked] == [
        cell | {"data": "toys", "seed": 2} for cell in listed
    ]  # fmt: skip
    assert all("trainer.val_users=9" in r.args for r in picked)
    same = plan(sweep, tmp_path / "out", extra=["generator=sasrec"])
    assert {r.run_id for r in same} == {r.run_id for r in runs[4:]}


def test_leaderboard_sweep_plans_its_cells_at_both_sizes(tmp_path):
    sweep = load_sweep(LEADERBOARD)
    assert len(cells(sweep)) == 10 * 3 * 3  # cells x datasets x seeds
    beauty = plan(sweep, tmp_path, extra=["data=beauty", "seed=1"])
    pairs = [(r.values["generator"], r.values.get("tokenizer")) for r in beauty]
    assert pairs == [
        ("tiger", "rkmeans"), ("tiger", "rvq"), ("tiger", "rqvae"), ("tiger", "mq"),
        ("rpg", "opq"), ("simgr", "rkmeans"), ("simgr", "rqvae"),
        ("setrec", None), ("sasrec", None), ("popularity", None),
    ]  # fmt: skip
    cpu = {r.values["generator"]: compose(None, r.args) for r in beauty}
    assert cpu["tiger"].generator.encoder_layers == 2 and cpu["tiger"].trainer.max_epochs == 2
    assert cpu["rpg"].generator.hidden == 128 and cpu["rpg"].tokenizer.name == "opq"
    gpu = plan(sweep, tmp_path, extra=["data=beauty", "seed=1", "trainer=gpu"])
    tiger = compose(None, gpu[0].args)  # the GRID handbook's TIGER, trained to early stopping
    assert tiger.generator.encoder_layers == 4 and tiger.trainer.max_epochs == 200
    smoke = plan(sweep, tmp_path, smoke=True, extra=["data=toys"])  # first seed only
    assert len(smoke) == 10 and compose(None, smoke[4].args).trainer.max_steps == 20


@pytest.mark.parametrize(
    "fields, options, message",
    [
        ({"cells": []}, [], "cells must be a non-empty list"),
        ({"cells": ["tiger"]}, [], "cells[0] must map keys to values"),
        ({"cells": [{"generator": "sasrec", "seed": 1}]}, [], "list seeds under seeds:"),
        ({"cells": [{"generator": "sasrec"}] * 2}, [], "cells[1] repeats cells[0]"),
        (
            {"cells": [{"data": "toys"}], "grid": {"data": ["beauty"]}},
            [],
            "data is both in cells and grid/zip",
        ),
        ({"cells": [{"generator": "sasrec"}]}, ["generator=tiger"], "matches no cell"),
        ({"cells": [{"generator": "sasrec"}]}, ["--export-wandb", "w.yaml"], "cannot express"),
    ],
)
def test_bad_cells_are_one_line(tmp_path, capsys, fields, options, message):
    path = write_sweep(tmp_path, **fields)
    argv = ["sweep", str(path), *options, "--out", str(tmp_path / "out"), "--dry-run"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "w.yaml").exists()


def test_pareto_front_by_hand():
    cost = [1.0, 2.0, 2.0, 3.0, 0.5, 4.0, math.nan]
    quality = [0.1, 0.3, 0.2, 0.3, 0.05, 0.4, 0.9]
    # (2, 0.2) is beaten by (2, 0.3), (3, 0.3) by (2, 0.3); NaN is never on it
    assert pareto_front(cost, quality) == [True, True, False, False, True, True, False]
    assert pareto_front([1.0, 1.0], [0.2, 0.2]) == [True, True]  # ties beat no one


def tiny(data, *extra):
    """A few training steps on the Beauty slice, with fast collaborative item embeddings."""
    return [
        "data=custom",
        f"data.path={data}",
        "encoder=cf/mf",
        "encoder.epochs=5",
        "tokenizer.levels=2",
        "tokenizer.codebook_size=8",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.batch_size=64",
        "trainer.logger=none",
        "trainer.progress_bar=false",
        *extra,
    ]


TINY_MODELS = {
    "pop": ["generator=popularity"],
    "sasrec": ["generator=sasrec", "generator.hidden=8", "generator.blocks=1"],
    "simgr": ["generator=simgr", "generator.d_model=16", "generator.layers=1"],
    "setrec": [
        "generator=setrec",
        "generator.hidden=8",
        "generator.ae_hidden=[32]",
    ],  # beta on valid
}


@pytest.fixture(scope="module")
def board(small_beauty, tmp_path_factory):
    """A sweep folder with one run of popularity, SASRec, SimGR x RK-Means and SETRec; its cache
    stays GRID_CACHE while the module's tests run."""
    folder = tmp_path_factory.mktemp("board")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRID_CACHE", str(tmp_path_factory.mktemp("cache")))
        for name, overrides in TINY_MODELS.items():
            args = tiny(small_beauty, *overrides)
            assert main(["run", *args, "--out", str(folder / name)]) == 0
        yield folder


def metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_runs_record_their_peak_memory(board):
    for name in TINY_MODELS:
        peak = metrics(board / name)["run/peak_rss_mb"]
        assert 100 < peak < 64_000  # torch alone takes a few hundred MB
        assert "run/peak_gpu_mb" not in metrics(board / name)  # CPU runs


def test_leaderboard_ranks_labels_and_marks_the_fronts(board, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(board), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    board_md = (out / "leaderboard.md").read_text()
    assert board_md.split("\n\n", 1)[1] in printed
    assert board_md.startswith("# Leaderboard\n\ncustom: 6-step CPU budget. Ranked by mean")
    lines = [line for line in board_md.splitlines() if line.startswith("| ")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    labels = {
        "popularity": "pop",
        "sasrec": "sasrec",
        "simgr x rkmeans": "simgr",
        "setrec": "setrec",
    }
    assert sorted(r[1] for r in rows) == sorted(labels)
    ndcg = [metrics(board / labels[r[1]])["test/ndcg@10"] for r in rows]
    assert ndcg == sorted(ndcg, reverse=True)
    for row in rows:
        m = metrics(board / labels[row[1]])  # one seed: the values themselves, no ± std
        assert row[3:6] == [f"{m['test/recall@10']:.4f}", f"{m['test/ndcg@10']:.4f}",
                            f"{m['infer/users_per_s']:.0f}"]  # fmt: skip
        assert row[7] == (f"{m['run/peak_rss_mb']:.0f}")
        assert row[8] == f"{m['test/coverage@10']:.4f}"
        assert row[6] == ("" if row[1] == "popularity" else f"{m['train/seconds']:.1f}")
    front = {r[1]: r[-1] for r in rows}
    assert "speed" in front["popularity"]  # nothing ranks faster than a fixed list
    assert "training" not in front["popularity"]  # no training time: not on that front
    best = rows[0][1]  # the best NDCG is dominated by no one
    assert "speed" in front[best] and (best == "popularity" or "training" in front[best])
    assert "## Leaderboard" in (out / "report.md").read_text()
    for png in ("report_speed.png", "report_training.png"):
        image = matplotlib.image.imread(out / png)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500


def test_remeasured_inference_reproduces_the_test_metrics(board, tmp_path, capsys):
    folders = [board / name for name in TINY_MODELS]
    tested = measure_inference(folders, rounds=2)  # the stages from the board's cache
    for folder, again in zip(folders, tested, strict=True):
        recorded = metrics(folder)
        for name in ("test/recall@10", "test/ndcg@10", "test/coverage@10", "test/warm_users/users"):
            assert again[name] == pytest.approx(recorded[name], abs=1e-7), (folder.name, name)
        assert again["infer/users_per_s"] > 0
    assert main(["report", str(board), "--out", str(tmp_path), "--remeasure", "-1"]) == 2
    assert "give 1 or more rounds" in capsys.readouterr().err
