"""`grid report` on a small real sweep: per-user rows, means and stds, paired tests, plots."""

import csv
import json
import math
import shutil

import matplotlib.image
import numpy as np
import pytest
import torch
from scipy import stats

from grid.cli import main
from grid.metrics import KS, RankingTotals, rank_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {  # folder prefix -> overrides; the rows of the report in this order
    "pop": ["generator=popularity"],
    "h8": ["generator=sasrec", "generator.hidden=8", "generator.blocks=1"],
    "h16": ["generator=sasrec", "generator.hidden=16", "generator.blocks=1"],
}
SEEDS = {"pop": [1], "h8": [1, 2], "h16": [1, 2]}


def tiny(data, *extra):
    """A few SASRec steps (or popularity) on the 400-user Beauty slice."""
    return [
        "data=custom",
        f"data.path={data}",
        "trainer.max_steps=6",
        "trainer.batch_size=64",
        "trainer.logger=none",
        "trainer.progress_bar=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def sweep(small_beauty, tmp_path_factory):
    """A sweep folder: popularity once, SASRec hidden 8 and 16 with seeds 1 and 2."""
    folder = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRID_CACHE", str(tmp_path_factory.mktemp("cache")))
        for name, overrides in CONFIGS.items():
            for seed in SEEDS[name]:
                args = tiny(small_beauty, *overrides, f"seed={seed}")
                assert main(["run", *args, "--out", str(folder / f"{name}-s{seed}")]) == 0
    return folder


def metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


def runs_of(sweep, name):
    return [sweep / f"{name}-s{seed}" for seed in SEEDS[name]]


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_per_user_rows_average_to_the_test_metrics(sweep):
    for run in sorted(sweep.iterdir()):
        m, rows = metrics(run), np.load(run / "per_user.npz")
        users = rows["user"]
        assert len(users) == 400 == m["test/warm_users/users"] + m["test/cold_users/users"]
        assert np.all(np.diff(users) > 0)  # each user once, sorted
        assert len(set(rows["user_id"])) == 400
        warm = rows["warm"]
        assert 0 < warm.sum() < 400
        for k in KS:
            for name in (f"recall@{k}", f"ndcg@{k}"):
                values = rows[name].astype(np.float64)
                assert values.mean() == pytest.approx(m[f"test/{name}"], rel=1e-6, abs=1e-9)
                warm_mean = values[warm].mean()
                assert warm_mean == pytest.approx(m[f"test/warm_users/{name}"], rel=1e-6, abs=1e-9)
                cold_mean = values[~warm].mean()
                assert cold_mean == pytest.approx(m[f"test/cold_users/{name}"], rel=1e-6, abs=1e-9)
    # trained models differ per user, so the paired test below compares real differences
    a, b = (np.load(sweep / f"h8-s{s}/per_user.npz")["ndcg@20"] for s in (1, 2))
    assert not np.array_equal(a, b)


def test_per_user_rows_are_sorted_once_each_and_leave_the_totals_alone():
    """Batches in any user order, then a padding batch that repeats users (as DDP's sampler)."""
    gen = torch.Generator().manual_seed(0)
    ranked, target = torch.randint(0, 30, (50, 20), generator=gen), torch.randint(0, 30, (50,))
    warm, user = torch.rand(50, generator=gen) < 0.7, torch.randperm(50, generator=gen) + 100
    plain, kept = RankingTotals(30), RankingTotals(30, per_user=True)
    for rows in (slice(20, 50), slice(0, 20)):
        plain.update(ranked[rows], target[rows], warm[rows])
        kept.update(ranked[rows], target[rows], warm[rows], user[rows])
    assert kept.results() == plain.results()
    kept.update(ranked[:3], target[:3], warm[:3], user[:3])  # a sampler's padding repeats users
    with pytest.raises(ValueError, match="user ids"):
        kept.update(ranked, target, warm)
    rows = kept.per_user_results()
    order = user.argsort()
    assert np.array_equal(rows["user"], user[order].numpy())
    assert np.array_equal(rows["warm"], warm[order].numpy())
    for name, values in rank_metrics(ranked, target).items():
        assert np.array_equal(rows[name], values[order].numpy()), name
    assert plain.rows is None and RankingTotals(30, per_user=False).per_user_results() == {}


def _paired_p(sweep, name, base, metric):
    def seed_mean(n):
        rows = [np.load(r / "per_user.npz")[metric] for r in runs_of(sweep, n)]
        return np.mean(np.array(rows, dtype=np.float64), axis=0)

    return stats.ttest_rel(seed_mean(name), seed_mean(base)).pvalue


def test_report_table_equals_a_direct_computation(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(sweep), "--out", str(out), "--baseline", "generator.hidden=8"]) == 0
    printed = capsys.readouterr().out
    rows = read_csv(out / "report.csv")
    assert list(rows[0])[:5] == ["row", "generator", "generator.hidden", "seeds", "runs"]
    assert [r["runs"] for r in rows] == [
        ";".join(p.name for p in runs_of(sweep, n)) for n in CONFIGS
    ]
    names = [
        k
        for k in metrics(sweep / "h8-s1")
        if k.startswith("test/") and not k.endswith(("/users", "/items")) and "random_" not in k
    ]
    # recall/ndcg@K overall, for warm and cold users and for warm and cold items; coverage and
    # item entropy@K
    assert len(names) == 48
    for row, name in zip(rows, CONFIGS, strict=True):
        assert int(row["seeds"]) == len(SEEDS[name])
        for key in [*names, "infer/users_per_s", "train/seconds", "run/seconds"]:
            if name == "pop" and key == "train/seconds":  # nothing trained
                assert row[key] == "nan"
                continue
            values = np.array([metrics(r)[key] for r in runs_of(sweep, name)])
            assert float(row[key]) == pytest.approx(values.mean(), rel=1e-12, abs=1e-15), key
            if len(values) > 1:
                assert float(row[f"{key} std"]) == pytest.approx(values.std(ddof=1), abs=1e-15)
            else:
                assert math.isnan(float(row[f"{key} std"]))
        for metric in ("ndcg@10", "recall@10"):
            p = float(row[f"p {metric}"])
            if name == "h8":  # the baseline
                assert math.isnan(p)
            else:
                assert p == pytest.approx(_paired_p(sweep, name, "h8", metric), rel=1e-12)
    assert float(rows[2]["p ndcg@10"]) < 1  # the two SASRecs do differ per user
    markdown = (out / "report.md").read_text()
    table = markdown.split("\n\n")[2]
    assert table in printed and "| 1 | sasrec | 8 | 2 |" in table and "baseline" in table
    assert "| 0 | popularity | — | 1 |" in table  # one seed: no ± std
    assert "±" not in table.splitlines()[2] and "±" in table.splitlines()[3]

    for png in ("report_metric.png", "report_speed.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
        image = matplotlib.image.imread(out / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_default_baseline_and_runs_given_one_by_one(sweep, tmp_path):
    runs = [str(p) for p in sorted(sweep.iterdir())]  # h16, h8, pop: reordered by the report
    assert main(["report", *runs, "--out", str(tmp_path), "--metric", "recall@20"]) == 0
    rows = read_csv(tmp_path / "report.csv")
    assert [r["generator.hidden"] for r in rows] == ["—", "8", "16"]
    assert math.isnan(float(rows[0]["p recall@10"]))  # row 0, popularity, is the baseline
    expected = _paired_p(sweep, "h16", "pop", "recall@10")
    assert float(rows[2]["p recall@10"]) == pytest.approx(expected, rel=1e-12)
    assert (tmp_path / "report_metric.png").is_file()
    # the default output folder is the first folder given
    assert main(["report", str(sweep / "pop-s1")]) == 0
    assert (sweep / "pop-s1" / "report.md").is_file()
    for name in ("report.md", "report.csv", "report_metric.png", "report_speed.png"):
        (sweep / "pop-s1" / name).unlink()


def test_unfinished_runs_and_missing_per_user_rows_are_warned_about(sweep, tmp_path, caplog):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("report*"))
    (copy / "h8-s2" / "metrics.json").unlink()  # killed before it finished
    (copy / "pop-s1" / "per_user.npz").unlink()  # made before runs wrote per-user rows
    assert main(["report", str(copy)]) == 0
    rows = read_csv(copy / "report.csv")
    assert [r["seeds"] for r in rows] == ["1", "1", "2"]
    assert all(math.isnan(float(r["p ndcg@10"])) for r in rows)  # pop is the baseline
    assert "left out 1 unfinished runs: ['h8-s2']" in caplog.text
    assert "pop-s1 has no per_user.npz" in caplog.text


def test_failed_run_leaves_no_per_user_rows(small_beauty, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "per_user.npz").write_text("stale")  # an earlier run's rows
    args = tiny(small_beauty, "generator=popularity", f"data.path={tmp_path / 'missing'}")
    assert main(["run", *args, "--out", str(out)]) == 2
    assert not (out / "per_user.npz").exists() and not (out / "metrics.json").exists()


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("empty", [], "no finished runs in"),
        ("unfinished", [], "config.yaml but no metrics.json"),
        (
            "sweep",
            ["--metric", "test/ndgc@10"],
            "unknown metric 'test/ndgc@10'; close: test/ndcg@10",
        ),
        ("sweep", ["--baseline", "generator.hidden=99"], "matches no configuration"),
        ("sweep", ["--baseline", "generator.name=sasrec"], "matches rows 1, 2"),
        ("sweep", ["--baseline", "generator.hiden=8"], "did you mean generator.hidden"),
        ("sweep", ["--baseline", "7"], "is not a row; rows are 0 to 2"),
        ("repeat", [], "repeat one configuration with the same seed"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(sweep, tmp_path, capsys, case, args, message):
    folders = [str(sweep)]
    if case in ("empty", "unfinished"):
        folders = [str(tmp_path / case)]
        (tmp_path / case / "a").mkdir(parents=True)
        if case == "unfinished":
            shutil.copy(sweep / "pop-s1" / "config.yaml", tmp_path / case / "a")
    if case == "repeat":
        shutil.copytree(sweep / "h8-s1", tmp_path / "copy")
        folders.append(str(tmp_path / "copy"))
    out = tmp_path / "out"
    assert main(["report", *folders, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()
