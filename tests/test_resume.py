"""Interrupted training resumes to the uninterrupted result; concurrent runs share one model."""

import csv
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from grid.cli import main
from grid.data import LengthBucketSampler
from grid.generators.sasrec import SASRec

pytestmark = pytest.mark.usefixtures("one_thread")


def sasrec(data, *extra):
    """A tiny SASRec on the 400-user Beauty slice: 2 epochs, validated twice an epoch."""
    return [
        "data=custom",
        f"data.path={data}",
        "generator=sasrec",
        "generator.hidden=16",
        "generator.blocks=1",
        "trainer.batch_size=64",
        "trainer.max_epochs=2",
        "trainer.max_time=null",
        "trainer.val_check_interval=0.5",
        "trainer.val_users=null",
        "trainer.patience=100",
        "trainer.logger=none",
        "trainer.progress_bar=false",
        *extra,
    ]


def model_folder(out: Path) -> Path:
    return Path(json.loads((out / "stages.json").read_text())["model"])


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def results(out: Path) -> dict:
    """metrics.json without the timings."""
    metrics = json.loads((out / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if not k.startswith(("infer/", "run/", "train/"))}


def curve(out: Path) -> list[dict]:
    """The rows of logs/metrics.csv without the timings."""
    with open(out / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    timings = ("infer/", "run/", "train/seconds", "train/samples_per_s")
    return [{k: v for k, v in row.items() if not k.startswith(timings)} for row in rows]


def test_sampler_continues_an_epoch_from_its_state():
    lengths = torch.randint(1, 21, (2000,), generator=torch.Generator().manual_seed(0))
    sampler = LengthBucketSampler(lengths, 32, shuffle=True, seed=3)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and sorted(sum(epoch1, [])) == list(range(2000))

    sampler.set_epoch(1)
    batches = iter(sampler)
    head = [next(batches) for _ in range(10)]
    resumed = LengthBucketSampler(lengths, 32, shuffle=True, seed=3)
    resumed.load_state_dict(sampler.state_dict())
    resumed.set_epoch(1)  # what Lightning calls before the resumed epoch
    assert head + list(resumed) == epoch1
    resumed.set_epoch(2)
    assert len(list(resumed)) == len(resumed)  # the next epoch is whole again


def test_interrupted_training_resumes_to_the_uninterrupted_result(
    small_beauty, tmp_path, monkeypatch, capsys
):
    args = ["run", *sasrec(small_beauty, "trainer.logger=csv")]
    monkeypatch.setenv("GRID_CACHE", str(tmp_path / "cache_a"))
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "embeddings" not in json.loads((tmp_path / "a" / "stages.json").read_text())
    assert not (tmp_path / "cache_a" / "embeddings").exists()  # SASRec reads no embeddings

    # The same command in a fresh cache, stopped by Ctrl-C three quarters into the second epoch:
    # the latest checkpoint is the mid-epoch validation, so the resumed run must skip the
    # batches of that epoch it already trained on and draw the same dropout masks.
    monkeypatch.setenv("GRID_CACHE", str(tmp_path / "cache_b"))
    train_step, seen = SASRec.training_step, {}

    def ctrl_c(self, batch, batch_idx):
        n = self.trainer.num_training_batches
        if self.current_epoch == 1 and batch_idx == 3 * n // 4:
            seen["batches"] = n
            raise KeyboardInterrupt
        return train_step(self, batch, batch_idx)

    monkeypatch.setattr(SASRec, "training_step", ctrl_c)
    out = tmp_path / "b"
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and "same command" in err[0]
    assert not (out / "metrics.json").exists()
    (folder,) = (p for p in (tmp_path / "cache_b" / "model").iterdir() if p.is_dir())
    assert not (folder / "DONE").exists()
    n, last = seen["batches"], checkpoint(folder / "last.ckpt")
    assert last["global_step"] == n + n // 2
    # Lightning set the sampler's epoch and saved its position in it
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "position": n // 2}
    ]

    monkeypatch.setattr(SASRec, "training_step", train_step)
    assert main([*args, "--out", str(out)]) == 0
    assert model_folder(out) == folder and (folder / "DONE").is_file()
    assert results(out) == results(tmp_path / "a")
    # the log holds the whole training curve, the steps before the interruption too
    assert curve(out) == curve(tmp_path / "a") and len(curve(out)) > 4
    counted = [
        json.loads((model_folder(o) / "training.json").read_text()) for o in (out, tmp_path / "a")
    ]
    assert counted[0]["samples"] == counted[1]["samples"] > 0  # the resumed run counts it all
    assert json.loads((out / "metrics.json").read_text())["train/samples_per_s"] > 0
    for name in ("best.ckpt", "last.ckpt"):
        a = checkpoint(model_folder(tmp_path / "a") / name)["state_dict"]
        b = checkpoint(folder / name)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_last_checkpoint_is_the_latest_state_and_out_holds_one_run(
    small_beauty, tmp_path, monkeypatch
):
    """With lr=1e-12 only the first validation is a best; last.ckpt still follows every one."""
    monkeypatch.setenv("GRID_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    out.mkdir()
    for stale in ("sids.npz", "tokenizer_report.json", "model.ckpt"):  # an earlier TIGER run's
        (out / stale).write_text("stale")
    (out / "notes.txt").write_text("mine")
    args = sasrec(small_beauty, "generator.lr=1e-12", "trainer.max_epochs=1")
    assert main(["run", *args, "--out", str(out)]) == 0
    folder = model_folder(out)
    best, last = checkpoint(folder / "best.ckpt"), checkpoint(folder / "last.ckpt")
    n = last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    assert last["global_step"] == n and best["global_step"] == n // 2

    assert not (out / "sids.npz").exists() and not (out / "tokenizer_report.json").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert checkpoint(out / "model.ckpt")["global_step"] == n // 2


def _train_in_child(args: list[str], out: str, fits: str, barrier) -> None:
    """Run `grid run`, noting every Trainer.fit (slowed down, so that runs overlap)."""
    fit = L.Trainer.fit

    def noted_fit(self, *a, **kw):
        with open(fits, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return fit(self, *a, **kw)

    L.Trainer.fit = noted_fit
    torch.set_num_threads(1)
    barrier.wait()
    sys.exit(main(["run", *args, "--out", out]))


def test_concurrent_runs_train_a_model_once(small_beauty, tmp_path, monkeypatch):
    monkeypatch.setenv("GRID_CACHE", str(tmp_path / "cache"))
    ctx = multiprocessing.get_context("spawn")
    barrier, fits = ctx.Barrier(2), tmp_path / "fits.txt"
    args = sasrec(small_beauty, "trainer.max_epochs=1")
    runs = [
        ctx.Process(target=_train_in_child, args=(args, str(tmp_path / r), str(fits), barrier))
        for r in ("a", "b")
    ]
    for p in runs:
        p.start()
    for p in runs:
        p.join(timeout=300)
    assert [p.exitcode for p in runs] == [0, 0]
    assert len(fits.read_text().split()) == 1  # one trained, the other waited and reused it
    assert results(tmp_path / "a") == results(tmp_path / "b")
    assert model_folder(tmp_path / "a") == model_folder(tmp_path / "b")
