"""`grid sweep` on the 400-user Beauty slice: expansion, run ids, resume, concurrency, launchers."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from grid.cli import main
from grid.config import GROUPS, ROOT, compose
from grid.generators import GENERATORS
from grid.pipeline import build_tokenizer, params
from grid.sweep import (
    cells,
    load_sweep,
    local_slots,
    plan,
    run_id,
    submitit_parameters,
    wandb_spec,
)

HANDBOOK = sorted((ROOT / "experiments" / "grid_handbook").glob("sweep_*.yaml"))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private stage cache; subprocesses import this checkout's grid."""
    monkeypatch.setenv("GRID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(tmp_path)


def popularity(data) -> list[str]:
    """The cheapest real run: the popularity baseline (no training) on the Beauty slice."""
    return ["data=custom", f"data.path={data}", "generator=popularity", "trainer.logger=none"]


def sasrec(data) -> list[str]:
    """A tiny SASRec trained for a few steps on the Beauty slice."""
    return [
        "data=custom",
        f"data.path={data}",
        "generator=sasrec",
        "generator.blocks=1",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.val_users=null",
        "trainer.logger=none",
        "trainer.progress_bar=false",
    ]


def write_sweep(folder: Path, name: str = "sweep", **fields) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def metrics(folder: Path) -> dict:
    """metrics.json without the timings."""
    values = json.loads((folder / "metrics.json").read_text())
    return {k: v for k, v in values.items() if not k.startswith(("infer/", "run/", "train/"))}


def test_expansion_is_the_product_crossed_with_zip_and_seeds(tmp_path):
    grid = {"tokenizer": ["rkmeans", "rvq"], "tokenizer.levels": [2, 3]}
    zipped = {"tokenizer.codebook_size": [16, 32, 64], "generator.beam_width": [20, 30, 40]}
    path = write_sweep(tmp_path, grid=grid, zip=zipped, seeds=[7, 8])
    sweep = load_sweep(path)
    expected = [
        {"tokenizer": t, "tokenizer.levels": lv, "tokenizer.codebook_size": c,
         "generator.beam_width": b, "seed": s}
        for t, lv in itertools.product(*grid.values())
        for c, b in zip(*zipped.values(), strict=True)
        for s in (7, 8)
    ]  # fmt: skip
    assert cells(sweep) == expected
    runs = plan(sweep, tmp_path / "out")
    assert len({r.run_id for r in runs}) == len(runs) == 2 * 2 * 3 * 2
    for run, cell in zip(runs, expected, strict=True):
        cfg = compose(None, run.args)  # what `grid run ARGS` composes
        assert run_id(cfg) == run.run_id and run.folder == tmp_path / "out" / run.run_id
        assert cfg.tokenizer.name == cell["tokenizer"] and cfg.seed == cell["seed"]
        assert cfg.tokenizer.levels == cell["tokenizer.levels"]
        assert cfg.tokenizer.codebook_size == cell["tokenizer.codebook_size"]
        assert cfg.generator.beam_width == cell["generator.beam_width"]


def test_run_ids_are_stable_and_follow_every_resolved_value(tmp_path):
    path = write_sweep(tmp_path, grid={"tokenizer.levels": [2, 3]}, seeds=[1, 2])
    ids = [r.run_id for r in plan(load_sweep(path), tmp_path / "out")]
    assert ids == [r.run_id for r in plan(load_sweep(path), tmp_path / "out")]
    shown = subprocess.run(
        [sys.executable, "-m", "grid", "sweep", str(path), "--dry-run", "--out", "o"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout  # a fresh process, another folder: the same ids
    assert [line.split()[0] for line in shown.splitlines()[2:]] == ids
    # another seed changes only its runs' ids; one changed field changes every id
    reseeded = write_sweep(tmp_path, "b", grid={"tokenizer.levels": [2, 3]}, seeds=[1, 3])
    other = [r.run_id for r in plan(load_sweep(reseeded), tmp_path / "out")]
    assert other[0] == ids[0] and other[2] == ids[2] and not {other[1], other[3]} & set(ids)
    lr = write_sweep(tmp_path, "c", grid={"tokenizer.levels": [2, 3]}, seeds=[1, 2],
                     overrides=["generator.lr=0.002"])  # fmt: skip
    assert not {r.run_id for r in plan(load_sweep(lr), tmp_path / "out")} & set(ids)
    assert run_id(compose(None, ["seed=1"])) != run_id(
        compose(None, ["seed=1", "data.max_history=19"])
    )


def test_dry_run_lists_runs_and_their_status(tmp_path, capsys):
    path = write_sweep(tmp_path, grid={"data.max_history": [10, 20, 30]}, seeds=[0])
    out = tmp_path / "out"
    runs = plan(load_sweep(path), out)
    (runs[0].folder).mkdir(parents=True)
    (runs[0].folder / "metrics.json").write_text("{}")
    (runs[1].folder).mkdir(parents=True)
    (runs[1].folder / "error.txt").write_text("boom (exit code 2)\n")
    assert main(["sweep", str(path), "--dry-run", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(f"3 runs (1 finished, 1 failed, 1 pending) -> {out}")
    assert lines[2:] == [
        f"  {runs[0].run_id}  finished  data.max_history=10 seed=0",
        f"  {runs[1].run_id}  failed    data.max_history=20 seed=0",
        f"  {runs[2].run_id}  pending   data.max_history=30 seed=0",
    ]
    assert not (out / "results.csv").exists() and not runs[2].folder.exists()


def test_interrupted_sweep_resumes_without_rerunning_finished_runs(small_beauty, tmp_path):
    path = write_sweep(
        tmp_path, grid={"data.max_history": [10, 20]}, seeds=[0], overrides=popularity(small_beauty)
    )
    out = tmp_path / "out"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "grid", "sweep", str(path), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    while not list(out.glob("*/metrics.json")) and sweep.poll() is None:
        time.sleep(0.1)
    os.killpg(sweep.pid, signal.SIGKILL)  # the sweep and the run it had started
    sweep.wait()
    done = list(out.glob("*/metrics.json"))
    assert len(done) == 1, "the kill must come between the two runs"
    stamp = done[0].stat().st_mtime_ns

    assert main(["sweep", str(path), "--out", str(out)]) == 0
    runs = plan(load_sweep(path), out)
    assert all((r.folder / "metrics.json").is_file() for r in runs)
    assert done[0].stat().st_mtime_ns == stamp  # the finished run was not run again
    assert all((r.folder / "run.log").read_text().count("grid run ->") == 1 for r in runs[:1])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["run_id"], r["data.max_history"], r["seed"]) for r in rows] == [
        (run.run_id, h, 0) for run, h in zip(runs, (10, 20), strict=True)
    ]
    assert (
        rows[1]["test/recall@10"]
        == json.loads((runs[1].folder / "metrics.json").read_text())["test/recall@10"]
    )
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["run_id", "data.max_history", "seed"] and "test/ndcg@10" in header


def test_failing_run_is_recorded_and_the_others_go_on(small_beauty, tmp_path, capsys):
    """Through submitit's LocalExecutor: the code path of --launcher slurm, jobs run here."""
    missing = tmp_path / "no_such_data"
    grid = {"data.path": [str(small_beauty), str(missing)]}
    args = [a for a in popularity(small_beauty) if not a.startswith("data.path")]
    path = write_sweep(tmp_path, grid=grid, seeds=[0], overrides=args)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--launcher", "submitit-local"]) == 2
    good, bad = plan(load_sweep(path), out)
    assert metrics(good.folder)["test/recall@10"] > 0 and not (bad.folder / "metrics.json").exists()
    assert len(list((out / ".submitit").glob("*/*_result.pkl"))) == 2  # both went through submitit
    error = (bad.folder / "error.txt").read_text()
    assert error.count("\n") == 1 and str(missing) in error and "exit code 2" in error
    assert (bad.folder / "overrides.txt").read_text().splitlines()[-2:] == [
        f"data.path={missing}",
        "seed=0",
    ]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 of 2 runs failed" in err
    assert len((out / "results.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_two_sweeps_at_once_share_runs_and_caches(small_beauty, tmp_path):
    out, env = tmp_path / "out", {**os.environ, "OMP_NUM_THREADS": "1"}
    paths = [
        write_sweep(tmp_path, name, grid={"generator.hidden": hidden}, seeds=[0],
                    overrides=sasrec(small_beauty))
        for name, hidden in (("a", [16, 8]), ("b", [16, 24]))
    ]  # fmt: skip
    sweeps = [
        subprocess.Popen(
            [sys.executable, "-m", "grid", "sweep", str(p), "--out", str(out)],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        for p in paths
    ]
    assert [s.wait(timeout=300) for s in sweeps] == [0, 0]
    a, b = (plan(load_sweep(p), out) for p in paths)
    assert a[0].run_id == b[0].run_id  # both started with this run at the same moment
    runs = [*a, b[1]]
    for run in runs:  # each run executed once: the other sweep waited on its lock and skipped it
        assert (run.folder / "run.log").read_text().count("grid run ->") == 1
        stages = json.loads((run.folder / "stages.json").read_text())
        assert (Path(stages["model"]) / "DONE").is_file()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["run_id"] for r in rows) == sorted(r.run_id for r in runs)
    assert {r["generator.hidden"] for r in rows} == {8, 16, 24}
    cache = tmp_path / "cache"
    assert not list(cache.rglob(".tmp-*"))
    assert all((key / "DONE").is_file() for key in cache.glob("*/*") if key.is_dir())
    assert len({json.dumps(metrics(run.folder)) for run in runs}) == 3


def test_wandb_spec_runs_the_same_grid(tmp_path):
    path = write_sweep(
        tmp_path,
        grid={"tokenizer": ["rkmeans", "rvq"]},
        zip={"tokenizer.levels": [2, 3], "data.sliding_window": [True, False]},
        seeds=[1, 2],
        overrides=["trainer.max_epochs=1"],
    )
    out = tmp_path / "spec.yaml"
    assert main(["sweep", str(path), "--export-wandb", str(out)]) == 0
    spec = yaml.safe_load(out.read_text())
    assert spec["method"] == "grid" and spec["command"][-1] == "${args_no_hyphens}"
    params = spec["parameters"]
    assert params["tokenizer"]["values"] == ["rkmeans", "rvq"]
    assert params["tokenizer.levels,data.sliding_window"]["values"] == ["[2, true]", "[3, false]"]
    assert params["seed"]["values"] == [1, 2]
    # what an agent runs for each combination: `grid run FIXED... key=value ...`
    fixed = spec["command"][5:-1]
    agent = {
        run_id(compose(None, fixed + [f"{k}={v}" for k, v in zip(params, combo, strict=True)]))
        for combo in itertools.product(*(p["values"] for p in params.values()))
    }
    assert agent == {r.run_id for r in plan(load_sweep(path), tmp_path / "o")}
    assert wandb_spec(load_sweep(path))["name"] == "sweep"


BAD = [
    ({"grid": {"tokenizer.levl": [2]}}, [], "did you mean 'tokenizer.levels'"),
    ({"grid": {"tokenizer": ["rkmeans", "nope"]}}, [], "unknown tokenizer 'nope'"),
    ({"grid": {}}, [], "the grid is empty"),
    ({"grid": {"tokenizer.levels": []}}, [], "tokenizer.levels has no values"),
    ({"grid": {"seed": [1]}, "zip": {}}, [], "list seeds under seeds:"),
    ({"zip": {"tokenizer.levels": [2, 3], "seed": [1]}}, [], "list seeds under seeds:"),
    ({"zip": {"tokenizer.levels": [2, 3], "tokenizer.codebook_size": [8]}}, [], "differ in length"),
    ({"grid": {"tokenizer.levels": [2]}, "seeds": [1, 2, 1]}, [], "seed 1 is listed twice"),
    ({"grid": {"tokenizer.levels": [2]}, "seed": [1]}, [], "did you mean 'seeds'"),
    ({"grid": {"tokenizer.levels": [2]}}, ["--smoke"], "has no smoke: section"),
    ({"grid": {"tokenizer.levels": [2]}}, ["--gpus", "1"], "none is visible"),
    ({"grid": {"tokenizer.levels": [2]}}, ["--per-gpu", "2"], "none is visible"),
    ({"grid": {"tokenizer.levels": [2]}}, ["--launcher", "slurm"], "--launcher local"),
]


@pytest.mark.parametrize("fields, options, message", BAD)
def test_bad_input_is_one_line_and_leaves_nothing(
    tmp_path, capsys, monkeypatch, fields, options, message
):
    path = write_sweep(tmp_path, **fields)
    out = tmp_path / "out"
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch: outside a cluster
    assert main(["sweep", str(path), "--out", str(out), *options]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_slurm_without_submitit(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` fails
    path = write_sweep(tmp_path, grid={"tokenizer.levels": [2]})
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install submitit" in err
    assert not (tmp_path / "o").exists()


def test_slurm_section_gives_valid_submitit_parameters(tmp_path):
    from submitit import AutoExecutor, SlurmExecutor

    slurm = {"partition": "gpu", "time": "1-02:00:30", "gpus_per_run": 2, "cpus_per_run": 8,
             "mem_gb": 64, "array_parallelism": 4, "additional": {"account": "lab"}}  # fmt: skip
    params = submitit_parameters(slurm, "grid-x")
    valid = AutoExecutor._valid_parameters() | {
        f"slurm_{p}" for p in SlurmExecutor._valid_parameters()
    }
    assert set(params) <= valid
    assert params["timeout_min"] == 24 * 60 + 2 * 60 + 1 and params["gpus_per_node"] == 2
    assert params["slurm_partition"] == "gpu" and params["slurm_additional_parameters"] == {
        "account": "lab"
    }
    assert submitit_parameters({"time": "90"}, "x")["timeout_min"] == 90
    path = write_sweep(tmp_path, grid={"tokenizer.levels": [2]}, slurm={"gpu_per_run": 1})
    with pytest.raises(Exception, match="did you mean 'gpus_per_run'"):
        load_sweep(path)


def test_local_slots_spread_runs_over_the_visible_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert local_slots() == ["3", "5"]
    assert local_slots(per_gpu=2) == ["3", "5", "3", "5"]
    assert local_slots(gpus=1, per_gpu=3) == ["3", "3", "3"]
    assert local_slots(per_gpu=2, max_parallel=3) == ["3", "5", "3"]
    with pytest.raises(Exception, match="--gpus 3 but only 2 GPU"):
        local_slots(gpus=3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert local_slots() == [None] and local_slots(max_parallel=2) == [None, None]


def test_zipped_override_needs_one_value_per_key():
    cfg = compose(None, ["tokenizer.levels,tokenizer.codebook_size=[4, 64]"])
    assert (cfg.tokenizer.levels, cfg.tokenizer.codebook_size) == (4, 64)
    with pytest.raises(Exception, match="names 2 keys; give 2 values"):
        compose(None, ["tokenizer.levels,tokenizer.codebook_size=[4]"])


@pytest.mark.parametrize("path", HANDBOOK, ids=lambda p: p.stem)
def test_handbook_sweeps_expand_and_their_smoke_runs_compose(path, tmp_path):
    sweep = load_sweep(path)
    cells_per_seed = len(list(itertools.product(*sweep.grid.values())))
    assert len(sweep.seeds) == 5 and cells_per_seed >= 2
    assert len(plan(sweep, tmp_path)) == 5 * cells_per_seed
    smoke = plan(sweep, tmp_path, smoke=True, extra=["data=sports"])
    assert len(smoke) == cells_per_seed  # every cell once, first seed
    cfg = compose(sweep.base, smoke[0].args[1:])
    assert cfg.data.name == "amazon14_sports" and cfg.trainer.max_steps == 20
    assert cfg.generator.d_model == 32 and cfg.seed == sweep.seeds[0]
    for key, values in sweep.grid.items():
        assert OmegaConf.select(cfg, f"{key}.name" if key in GROUPS else key) == values[0]
    for run in smoke + plan(sweep, tmp_path)[:: len(sweep.seeds)]:  # every cell, full and smoke
        cfg = compose(sweep.base, run.args[1:])
        build_tokenizer(cfg.tokenizer)  # the components' own field checks, as `grid run` does
        GENERATORS[cfg.generator.name].check_params(**params(cfg.generator))
