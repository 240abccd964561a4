"""Bad input a new user tried (issue 24): each is one clear line, a warning, or a kept result."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from grid.cli import main
from grid.config import ROOT, compose
from grid.generators import PipelineInputs
from grid.generators.rpg import RPG
from grid.pipeline import build_tokenizer
from grid.sids import assign_sids
from grid.sweep import load_sweep, plan
from grid.tracking import wandb_mode
from tests.test_resume import model_folder, sasrec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private stage cache; subprocesses import this checkout's grid."""
    monkeypatch.setenv("GRID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))


def popularity(data) -> list[str]:
    """The cheapest real run: the popularity baseline (no training) on the Beauty slice."""
    return ["data=custom", f"data.path={data}", "generator=popularity", "trainer.logger=none"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def write_sweep(folder: Path, **fields) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished(small_beauty, tmp_path_factory) -> Path:
    """A finished popularity run on the Beauty slice."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRID_CACHE", str(tmp_path_factory.mktemp("cache")))
        assert main(["run", *popularity(small_beauty), "seed=1", "--out", str(out)]) == 0
    return out


# --- results lost or corrupted ---------------------------------------------------------------


@pytest.mark.slow
def test_killed_sweep_leaves_its_run_the_only_writer(small_beauty, tmp_path, capsys):
    """`kill -9` of a sweep leaves its `grid run` running; a second sweep must not start another
    in the same folder, and must quote that run's state, not a stale error."""
    path = write_sweep(
        tmp_path, grid={"data.max_history": [20]}, overrides=popularity(small_beauty)
    )
    out = tmp_path / "out"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "grid", "sweep", str(path), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not list(out.glob("*/run.pid")):
        assert sweep.poll() is None, "the run must still be going"
        time.sleep(0.05)
    (pid_file,) = out.glob("*/run.pid")
    folder, pid = pid_file.parent, int(pid_file.read_text())
    os.kill(sweep.pid, signal.SIGKILL)  # the sweep only: its run goes on, an orphan
    sweep.wait()
    os.kill(pid, signal.SIGSTOP)  # hold the orphan mid-run while the sweep is run again
    try:
        assert main(["sweep", str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"another process (pid {pid}) is writing {folder}" in err and err.count("\n") == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    while (folder / "run.pid").exists():  # the orphan finishes the run alone
        time.sleep(0.05)
    assert json.loads((folder / "metrics.json").read_text())["test/recall@10"] > 0
    assert (folder / "run.log").read_text().count("grid run ->") == 1
    assert not (folder / "error.txt").exists()
    assert main(["sweep", str(path), "--out", str(out)]) == 0  # finished: skipped


def test_bad_command_keeps_a_finished_run(finished, capsys):
    """A typo'd key or a missing experiment file fails before the earlier result is touched."""
    before = {p.name: p.read_bytes() for p in finished.iterdir() if p.is_file()}
    for args in (["tokenizer.levls=4"], ["missing.yaml"], ["seed=-1"]):
        assert main(["run", *args, "--out", str(finished)]) == 2
        one_error_line(capsys)
        assert {p.name: p.read_bytes() for p in finished.iterdir() if p.is_file()} == before


def test_unreadable_last_checkpoint_trains_from_the_start(small_beauty, tmp_path, caplog):
    steps = ["trainer.max_steps=6", "trainer.val_check_interval=3"]
    args = ["run", *sasrec(small_beauty, *steps), "--out", str(tmp_path / "a")]
    assert main(args) == 0
    folder = model_folder(tmp_path / "a")
    (folder / "DONE").unlink()  # as if that training had been cut short
    (folder / "last.ckpt").write_bytes((folder / "last.ckpt").read_bytes()[:1000])  # truncated
    with caplog.at_level(logging.WARNING, logger="grid.runner"):
        assert main(args) == 0
    assert f"cannot read {folder / 'last.ckpt'}" in caplog.text
    assert (folder / "DONE").is_file()
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] > 0


# --- one line instead of a traceback ---------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=-1", "seed=-1 is out of range; give an integer in [0, 4294967295]"),
        ("seed=4294967296", "seed=4294967296 is out of range"),
        ("trainer.devices=0", "trainer.devices=0 is out of range; set it to 1 or more, or -1"),
        ("trainer.val_users=-5", "trainer.val_users=-5 is out of range; set it to 1 or more"),
        (
            "trainer.val_users=0",
            "trainer.val_users=0 is out of range; set it to 1 or more, or null",
        ),
        ("trainer.batch_size=0", "trainer.batch_size=0 is out of range; set it to a value >= 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 trains nothing; set it to 1 or more"),
        ("trainer.patience=-1", "trainer.patience=-1 is out of range; set it to a value >= 0"),
        ("trainer.cuda_graphs=true", "trainer.cuda_graphs=true replays the compiled training"),
    ],
)
def test_bad_run_values_fail_before_any_stage(small_beauty, tmp_path, capsys, override, message):
    out = tmp_path / "out"
    args = ["data=custom", f"data.path={small_beauty}", override]
    assert main(["run", *args, "--out", str(out)]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("fields", "options", "message"),
    [
        ({"seeds": [1, -1]}, ["--dry-run"], "seeds holds -1, out of range; give seeds in [0, "),
        ({"seeds": [2**32]}, ["--dry-run"], f"seeds holds {2**32}, out of range"),
        ({"smoke": {"seeds": "one"}}, ["--smoke"], "smoke.seeds must be a list of integers"),
        ({"smoke": {"seeds": [-3]}}, ["--smoke"], "smoke.seeds holds -3, out of range"),
        ({"slurm": "gpu"}, [], "slurm must map fields to values, e.g. partition: gpu"),
        ({}, ["--max-parallel", "-1"], "--max-parallel -1 is out of range; give 1 or more"),
        ({}, ["--per-gpu", "0"], "--per-gpu 0 is out of range"),
    ],
)
def test_bad_sweep_input_is_one_line(tmp_path, capsys, fields, options, message):
    nowhere = ["data=custom", f"data.path={tmp_path / 'nowhere'}"]  # a run would fail at once
    path = write_sweep(tmp_path, grid={"tokenizer.levels": [2]}, overrides=nowhere, **fields)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), *options]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


def test_export_wandb_to_an_unwritable_path(tmp_path, capsys):
    path = write_sweep(tmp_path, grid={"tokenizer.levels": [2]})
    (tmp_path / "file").write_text("keep me")
    spec = tmp_path / "file" / "spec.yaml"
    assert main(["sweep", str(path), "--export-wandb", str(spec)]) == 2
    assert f"cannot write the wandb sweep spec {spec} (" in one_error_line(capsys)
    assert main(["sweep", str(path), "--export-wandb", str(tmp_path)]) == 2  # a folder
    assert "give --export-wandb a writable file path" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "sweep.yaml"]


def test_damaged_results_table_is_rebuilt(small_beauty, finished, tmp_path, caplog):
    path = write_sweep(
        tmp_path, grid={"data.max_history": [20]}, seeds=[1], overrides=popularity(small_beauty)
    )
    out = tmp_path / "out"
    (run,) = plan(load_sweep(path), out)
    shutil.copytree(finished, run.folder)  # that run, finished
    (out / "results.jsonl").write_text('{"run_id": "abc", "test/rec')  # cut mid-write
    with caplog.at_level(logging.WARNING, logger="grid.sweep"):
        assert main(["sweep", str(path), "--out", str(out)]) == 0
    assert f"{out / 'results.jsonl'}:1: damaged row dropped" in caplog.text
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert row["run_id"] == run.run_id and row["seed"] == 1 and row["test/recall@10"] > 0


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ('{"test/recall@10": 0.1', "cannot read {}"),
        ("[0.1, 0.2]", "{} holds a list, not a mapping of metric names to values"),
    ],
)
def test_report_on_a_damaged_metrics_file(finished, tmp_path, capsys, damage, message):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "metrics.json").write_text(damage)
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 2
    assert message.format(run / "metrics.json") in one_error_line(capsys)
    assert not (tmp_path / "report").exists()


def test_report_out_is_a_file_or_unwritable(finished, tmp_path, capsys):
    (tmp_path / "report.txt").write_text("keep me")
    assert main(["report", str(finished), "--out", str(tmp_path / "report.txt")]) == 2
    assert "the report folder" in one_error_line(capsys)
    assert (tmp_path / "report.txt").read_text() == "keep me"
    assert main(["report", str(finished), "--out", str(tmp_path / "report.txt" / "sub")]) == 2
    assert "cannot write to the report folder" in one_error_line(capsys)


def test_wandb_server_out_of_reach_logs_offline_at_once(tmp_path, monkeypatch, caplog):
    """With an API key but no server, wandb would wait ~100 s and fail the run."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    cfg = compose(None, [])
    with caplog.at_level(logging.WARNING, logger="grid.tracking"):
        assert wandb_mode(cfg) == "online"  # the server answers
        assert not caplog.records
        listener.close()  # now nothing listens on that port
        start = time.perf_counter()
        assert wandb_mode(cfg) == "offline"
    assert time.perf_counter() - start < 5
    (record,) = caplog.records
    assert f"cannot reach the wandb server http://127.0.0.1:{port}" in record.getMessage()
    assert "logging offline" in record.getMessage()


# --- accepted silently -----------------------------------------------------------------------


def test_report_leaves_a_metric_empty_when_some_seeds_lack_it(finished, tmp_path, caplog):
    seeds = []
    for seed in (1, 2):  # one configuration, two seeds (popularity ignores them)
        run = tmp_path / f"s{seed}"
        shutil.copytree(finished, run)
        config = (run / "config.yaml").read_text().replace("seed: 1\n", f"seed: {seed}\n")
        (run / "config.yaml").write_text(config)
        seeds.append(run)
    metrics = json.loads((seeds[1] / "metrics.json").read_text())
    del metrics["test/ndcg@10"]
    (seeds[1] / "metrics.json").write_text(json.dumps(metrics))
    with caplog.at_level(logging.WARNING, logger="grid.report"):
        assert main(["report", *map(str, seeds), "--out", str(tmp_path / "report")]) == 0
    assert "test/ndcg@10 missing from some of its 2 runs" in caplog.text
    rows = (tmp_path / "report" / "report.csv").read_text().splitlines()
    head, row = rows[0].split(","), rows[1].split(",")
    assert row[head.index("seeds")] == "2"
    assert row[head.index("test/ndcg@10")] == "nan"
    assert float(row[head.index("test/recall@10")]) > 0  # both seeds have it


@pytest.mark.parametrize(("tokenizer", "warned"), [("rkmeans", True), ("opq", False)])
def test_rpg_on_short_ordered_sids_is_warned_about(beauty_embeddings, caplog, tokenizer, warned):
    overrides = [f"tokenizer={tokenizer}", "tokenizer.codebook_size=16"]
    overrides += ["tokenizer.levels=2"] if tokenizer == "rkmeans" else ["tokenizer.subspaces=4"]
    fitted, strategy, _ = build_tokenizer(compose(None, overrides).tokenizer)
    X = beauty_embeddings[:500]
    fitted.fit(X)
    sids = assign_sids(fitted.encode(X), fitted.vocab_sizes, strategy, fitted.ordered)
    inputs = PipelineInputs(num_items=500, num_users=1, train_sequences=[], sids=sids)
    with caplog.at_level(logging.WARNING, logger="grid.generators.rpg"):
        RPG.build(inputs, hidden=16, heads=2, d_ff=32, layers=1)
    assert ("designed for long unordered OPQ codes" in caplog.text) == warned
    if warned:
        assert f"these SIDs are {sids.length} ordered codes" in caplog.text


# --- misleading messages ---------------------------------------------------------------------


def test_item_id_with_a_space_is_named(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    items = [{"item_id": "lip stick", "title": "a"}] + [
        {"item_id": f"i{k}", "title": "b"} for k in range(30)
    ]
    (data / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (data / "sequences.tsv").write_text("u1\tlip stick i1 i2 i3 i4\n")
    assert main(["run", "data=custom", f"data.path={data}", "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert f"{data / 'items.jsonl'}:1: item_id 'lip stick' is empty or holds whitespace" in line
    assert "'lip'" not in line
