"""DDP: every process takes its share of the data; a 2-process run scores each user exactly once,
equals the single-process evaluation of its checkpoint and resumes to the uninterrupted result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grid.cache import StageCache
from grid.cli import main
from grid.config import compose
from grid.data import LengthBucketSampler, SequenceDataModule
from grid.generators import GENERATORS, PipelineInputs
from grid.pipeline import component, params, prepare
from grid.runner import _evaluate
from tests.conftest import ROOT, beauty_slice
from tests.test_resume import checkpoint, model_folder, results, sasrec

pytestmark = pytest.mark.usefixtures("one_thread")


# `grid run` with a Ctrl-C three quarters into the second epoch, in both processes (Lightning's
# DDP launcher re-runs this script in the second one).
CTRL_C = """
import sys
from grid.cli import main
from grid.generators.sasrec import SASRec

train_step = SASRec.training_step


def ctrl_c(self, batch, batch_idx):
    if self.current_epoch == 1 and batch_idx == 3 * self.trainer.num_training_batches // 4:
        raise KeyboardInterrupt
    return train_step(self, batch, batch_idx)


SASRec.training_step = ctrl_c
sys.exit(main(sys.argv[1:]))
"""


def grid_run(args: list[str], cwd: Path, cache: Path, script: Path | None = None):
    """`grid run ARGS` in a new process, as a user starts it (or `script` in place of grid)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GRID_CACHE": str(cache)}
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "grid"]
    return subprocess.run(
        [*command, "run", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def odd_beauty(tmp_path_factory):
    """The first 401 Beauty users: an odd count, so that padding to equal shares would show."""
    return beauty_slice(tmp_path_factory.mktemp("odd_beauty"), 401)


def test_evaluation_shards_are_a_partition_of_the_users():
    lengths = torch.randint(1, 21, (1001,), generator=torch.Generator().manual_seed(0))
    whole = list(LengthBucketSampler(lengths, 64, shuffle=False))
    sorted_order = torch.argsort(lengths, stable=True).tolist()
    assert sum(whole, []) == sorted_order  # one process: the whole length-sorted order, as before
    shards = [list(LengthBucketSampler(lengths, 64, False, num_replicas=2, rank=r)) for r in (0, 1)]
    users = [sum(s, []) for s in shards]
    assert [len(u) for u in users] == [501, 500]
    assert sorted(users[0] + users[1]) == list(range(1001))  # each user exactly once
    assert users[0] == sorted_order[0::2] and users[1] == sorted_order[1::2]
    for r, shard in enumerate(shards):
        assert len(shard) == len(LengthBucketSampler(lengths, 64, False, num_replicas=2, rank=r))


def test_training_shards_step_together_and_cover_the_epoch():
    lengths = torch.randint(1, 21, (1001,), generator=torch.Generator().manual_seed(1))
    whole = list(LengthBucketSampler(lengths, 32, shuffle=True, seed=3))  # 32 batches
    shards = [
        list(LengthBucketSampler(lengths, 32, shuffle=True, seed=3, num_replicas=3, rank=r))
        for r in range(3)
    ]
    assert [len(s) for s in shards] == [11, 11, 11]  # ceil(32 / 3): the same number of steps
    padded = whole + whole[:1]  # the list padded with its first batch, then dealt round-robin
    assert [shards[i % 3][i // 3] for i in range(33)] == padded


def test_more_devices_than_gpus_is_one_line(small_beauty, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    args = ["data=custom", f"data.path={small_beauty}", "generator=popularity"]
    for devices in (["trainer.devices=2"], ["trainer.accelerator=gpu", "trainer.devices=3"]):
        capsys.readouterr()
        assert main(["run", *args, *devices, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "but 1 are visible" in err[0] and "accelerator=cpu" in err[0]
        assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.fixture(scope="module")
def ddp_run(odd_beauty, tmp_path_factory):
    """A tiny SASRec trained and evaluated by 2 processes (gloo), in the default run folder."""
    folder = tmp_path_factory.mktemp("ddp")
    overrides = sasrec(
        odd_beauty,
        "trainer.batch_size=128",
        "trainer.eval_batch_size=64",  # 401 users: 7 batches, which a padding sampler deals 4 + 4
        "trainer.accelerator=cpu",
    )
    ddp = [*overrides, "trainer.devices=2", "trainer.strategy=ddp"]
    done = grid_run(ddp, folder, folder / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    (out,) = (folder / "runs").iterdir()  # both processes wrote to the one default folder
    return overrides, ddp, out, folder / "cache"


def single_process_metrics(overrides: list[str], checkpoint, cache, out) -> dict[str, float]:
    """Evaluate `checkpoint` in this process, on one device, the way `grid run` evaluates."""
    cfg = compose(None, [*overrides, "trainer.devices=1", "trainer.strategy=auto"])
    generator_cls = component(GENERATORS, cfg.generator, "generator")
    stages = prepare(cfg, StageCache(cache), generator_cls.consumes, 20)
    t = cfg.trainer
    datamodule = SequenceDataModule(
        stages.split, cfg.data.max_history, cfg.data.sliding_window, t.batch_size,
        t.eval_batch_size, t.bucket_by_length, cfg.seed, t.val_users,
    )  # fmt: skip
    inputs = PipelineInputs(stages.dataset.num_items, stages.dataset.num_users, stages.split.train)
    model = generator_cls.build(inputs, **params(cfg.generator))
    model.load_checkpoint(checkpoint)
    return _evaluate(cfg, model, datamodule, out, False)


@pytest.mark.slow
def test_two_process_run_scores_each_user_once_and_equals_one_process(ddp_run, tmp_path):
    overrides, _, out, cache = ddp_run
    # run.lock: the main process held it for the run; the added one never took it
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml", "metrics.json", "model.ckpt", "run.lock", "selection.json", "stages.json"
    ]  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["infer/devices"] == 2 and metrics["train/devices"] == 2
    for split in ("valid", "test"):
        assert metrics[f"{split}/warm_users/users"] + metrics[f"{split}/cold_users/users"] == 401

    single = single_process_metrics(overrides, out / "model.ckpt", cache, tmp_path)
    assert single["infer/devices"] == 1
    scores = [k for k in single if k.startswith(("valid/", "test/"))]
    assert len(scores) > 40
    for name in scores:
        assert metrics[name] == pytest.approx(single[name], abs=1e-6), name


@pytest.mark.slow
def test_interrupted_two_process_run_resumes_to_the_uninterrupted_result(ddp_run, tmp_path):
    _, ddp, uninterrupted, _ = ddp_run
    script, out, cache = tmp_path / "ctrl_c.py", tmp_path / "run", tmp_path / "cache"
    script.write_text(CTRL_C)
    stopped = grid_run([*ddp, "--out", str(out)], tmp_path, cache, script)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert not (out / "metrics.json").exists()
    (folder,) = (p for p in (cache / "model").iterdir() if p.is_dir())
    last = checkpoint(folder / "last.ckpt")  # the mid-epoch validation of the second epoch
    assert last["epoch"] == 1 and not (folder / "DONE").exists()
    (rng,) = (v for k, v in last["callbacks"].items() if "RandomState" in k)
    assert len(rng["ranks"]) == 2  # each process's dropout RNG, not only the first one's

    done = grid_run([*ddp, "--out", str(out)], tmp_path, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert results(out) == results(uninterrupted)
    trained = [
        json.loads((model_folder(o) / "training.json").read_text()) for o in (out, uninterrupted)
    ]
    assert trained[0]["samples"] == trained[1]["samples"] > 0
