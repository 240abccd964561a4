"""The command line end to end on a small real subset of Beauty."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from grid.cli import main

KEYS = [
    f"{split}/{m}@{k}"
    for split in ("valid", "test")
    for m in ("recall", "ndcg")
    for k in (1, 5, 10, 20)
]
KEYS += ["infer/seconds", "infer/ms_per_user", "infer/users_per_s"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tiny(data, cache, *extra):
    return [
        "data=custom",
        f"data.path={data}",
        f"cache_dir={cache}",
        "tokenizer.levels=2",
        "tokenizer.codebook_size=16",
        "generator.d_model=32",
        "generator.num_heads=2",
        "generator.head_dim=16",
        "generator.d_ff=64",
        "generator.encoder_layers=1",
        "generator.decoder_layers=1",
        "generator.beam_width=20",
        "trainer.max_steps=20",
        "trainer.val_check_interval=10",
        "trainer.val_users=null",
        "trainer.logger=none",
        "trainer.progress_bar=false",
        *extra,
    ]


@pytest.mark.slow
def test_run_writes_config_and_metrics(small_beauty, cache, tmp_path):
    out = tmp_path / "run"
    assert main(["run", *tiny(small_beauty, cache), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(k in metrics for k in KEYS)
    assert all(0 <= metrics[k] <= 1 for k in KEYS[:-3]) and metrics["infer/users_per_s"] > 0
    assert metrics["test/warm_users/users"] + metrics["test/cold_users/users"] == 400
    assert "tokenizer.codebook_size" not in (out / "config.yaml").read_text()
    assert "codebook_size: 16" in (out / "config.yaml").read_text()
    report = json.loads((out / "tokenizer_report.json").read_text())
    assert report["sid_length"] == 3  # two levels + de-dup digit
    assert np.load(out / "sids.npz")["codes"].shape[1] == 3
    stages = json.loads((out / "stages.json").read_text())
    assert all((Path(stages[s]) / "DONE").is_file() for s in ("embeddings", "sids", "model"))
    # rerunning the saved config reuses every stage and reproduces the metrics
    again = tmp_path / "again"
    assert main(["run", str(out / "config.yaml"), "--out", str(again)]) == 0
    second = json.loads((again / "metrics.json").read_text())
    assert second["test/recall@10"] == metrics["test/recall@10"]


def test_failing_run_leaves_no_metrics(small_beauty, cache, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # stale output of an earlier run
    args = tiny(small_beauty, cache, "tokenizer.codebook_size=5000")
    assert main(["run", *args, "--out", str(out)]) == 2
    assert not (out / "metrics.json").exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: tokenizer.codebook_size=5000 exceeds the")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "tokenizer.levls=4"], "did you mean 'tokenizer.levels'"),
        (["run", "generator=nope"], "unknown generator 'nope'; available:"),
        (["config", "show", "seed=abc"], "seed must be of type int"),
        (["run", "missing.yaml"], "experiment file missing.yaml not found"),
        (["run", "data=custom", "data.path=/nowhere"], "data folder /nowhere does not exist"),
    ],
)
def test_bad_input_exits_with_one_line(args, message):
    proc = subprocess.run([sys.executable, "-m", "grid", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_help_and_config_show():
    proc = subprocess.run(
        [sys.executable, "-m", "grid", "run", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--out" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "grid", "config", "show", "tokenizer.levels=5"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "levels: 5" in proc.stdout


REPORT_KEYS = [
    "collision_rate",
    "max_collision_group",
    "independent_coding_rate",
    "utilization",
    "perplexity",
    "gini",
    "feature_fidelity",
    "fit_seconds",
    "encode_seconds",
    "bits_per_item",
    "sid_length",
]


def test_tokenize_writes_report_and_compares(small_beauty, cache, tmp_path, capsys, monkeypatch):
    data = [f"data.path={small_beauty}", f"cache_dir={cache}", "data=custom"]
    out = tmp_path / "tok"
    args = ["tokenize", *data, "tokenizer=opq", "tokenizer.subspaces=8", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "tokenizer_report.json").read_text())
    assert all(k in report for k in REPORT_KEYS)
    assert report["sid_length"] == 9 and len(report["utilization"]) == 8  # 8 codes + de-dup
    assert (out / "sids.npz").is_file()
    assert matplotlib.image.imread(out / "tokenizer_report.png").shape[:2] == (750, 500)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("defaults:\n  tokenizer: rkmeans\ntokenizer:\n  codebook_size: 16\n")
    b.write_text("defaults:\n  tokenizer: rkmeans\ntokenizer:\n  codebook_size: 32\n")
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # the default output folder goes to runs/ here
    assert main(["tokenize", *data, "--compare", str(a), str(b)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "a" in header.split() and "b" in header.split()
    (folder,) = (tmp_path / "runs").glob("*-custom-tokenize-compare")
    assert matplotlib.image.imread(folder / "tokenizer_comparison.png").shape[:2] == (750, 1000)

    # tokenizer names and experiment files mix; the overrides apply to every entry
    names = ["--compare", "rkmeans", str(a), "opq", "--out", str(tmp_path / "mixed")]
    assert main(["tokenize", *data, "tokenizer.codebook_size=16", *names]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[1:] == ["|", "rkmeans", "|", "a", "|", "opq"]
    reports = json.loads((tmp_path / "mixed" / "tokenizer_comparison.json").read_text())
    assert reports["opq"]["vocab_sizes"] == [16] * 32 and reports["rkmeans"]["sid_length"] == 4
    image = matplotlib.image.imread(tmp_path / "mixed" / "tokenizer_comparison.png")
    assert image.shape[:2] == (750, 1500)
    assert main(["tokenize", *data, "--compare", "rkmeans", "rkmean"]) == 2
    assert "'rkmean' is neither an experiment file nor a tokenizer" in one_error_line(capsys)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty stage cache and an output folder holding a stale metrics.json."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    monkeypatch.setenv("GRID_CACHE", str(cache))
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    return cache, out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def catalogue(folder: Path, items: int) -> Path:
    """A dataset of `items` items and as many users of 5 interactions each."""
    folder.mkdir()
    lines = [json.dumps({"item_id": f"i{k}", "title": f"lipstick shade {k}"}) for k in range(items)]
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    seqs = [f"u{u}\t" + " ".join(f"i{(u + t) % items}" for t in range(5)) for u in range(items)]
    (folder / "sequences.tsv").write_text("\n".join(seqs) + "\n")
    return folder


TINY, TWO = ["data=custom", "data.path=TINY"], ["data=custom", "data.path=TWO"]
FEWER_THAN_K = "the custom catalogue has 2 items, fewer than the largest K=20"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*TINY, "tokenizer.levels=0"], "tokenizer.levels=0 is out of range; set it to a value"),
        ([*TINY, "tokenizer.codebook_size=-5"], "tokenizer.codebook_size=-5 is out of range"),
        ([*TINY, "generator.beam_width=0"], "generator.beam_width=0 is out of range"),
        ([*TINY, "generator.decoding=greedy"], "generator.decoding='greedy' is not one of"),
        ([*TINY, "tokenizer.levels=null"], "tokenizer.levels cannot be null"),
        ([*TINY, "trainer.max_time=soon"], "trainer.max_time='soon' is not DD:HH:MM:SS"),
        (["data=custom"], "data.path is not set (??? in its config); add data.path=FOLDER"),
        ([*TWO, "generator=popularity"], FEWER_THAN_K),
        (TWO, FEWER_THAN_K),
    ],
)
def test_bad_input_fails_before_any_stage(isolated, tmp_path, capsys, args, message):
    cache, out = isolated
    folders = {"TINY": catalogue(tmp_path / "tiny", 30), "TWO": catalogue(tmp_path / "two", 2)}
    args = [f"data.path={folders[a[10:]]}" if a[10:] in folders else a for a in args]
    assert main(["run", *args, "--out", str(out)]) == 2
    assert message in one_error_line(capsys)
    # a run that started (config.yaml) removed the earlier result; one that failed composing
    # its config left the folder as it was
    assert (out / "metrics.json").exists() != (out / "config.yaml").exists()
    assert not (cache / "embeddings").exists()  # reported before the encoder ran


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_data_file(small_beauty, isolated, tmp_path, capsys, damage):
    cache, out = isolated
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "items.jsonl").write_text((small_beauty / "items.jsonl").read_text())
    data = gzip.compress((small_beauty / "sequences.tsv").read_bytes())
    cut = len(data) // 2
    data = data[:cut] if damage == "truncated" else data[:cut] + b"\x00" * 16 + data[cut + 16 :]
    (folder / "sequences.tsv.gz").write_bytes(data)
    assert main(["run", "data=custom", f"data.path={folder}", "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert f"{folder / 'sequences.tsv.gz'} is a truncated or corrupt gzip file" in line
    assert "download it again" in line and not (out / "metrics.json").exists()


def test_wandb_logger_without_wandb(isolated, tmp_path, monkeypatch, capsys):
    cache, out = isolated
    data = ["data=custom", f"data.path={catalogue(tmp_path / 'tiny', 30)}"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails as if not installed
    assert main(["run", *data, "trainer.logger=wandb", "--out", str(out)]) == 2
    assert "trainer.logger=wandb needs the wandb package: pip install wandb" in one_error_line(
        capsys
    )
    assert not (out / "metrics.json").exists() and not (cache / "embeddings").exists()


def test_out_is_a_file(isolated, tmp_path, capsys):
    data = ["data=custom", f"data.path={catalogue(tmp_path / 'tiny', 30)}"]
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    assert main(["run", *data, "--out", str(out)]) == 2
    assert f"the output folder {out} is an existing file; point --out at a folder" in (
        one_error_line(capsys)
    )
    assert out.read_text() == "keep me"
    assert main(["tokenize", *data, "--out", str(out / "sub")]) == 2
    assert f"cannot write to the output folder {out / 'sub'} (Not a directory)" in (
        one_error_line(capsys)
    )


@pytest.fixture
def read_only():
    """Make folders unwritable: chmod, and for root (whom chmod does not stop) chattr +i."""
    folders = []

    def make(folder: Path) -> Path:
        folder.mkdir(exist_ok=True)
        folder.chmod(0o555)
        folders.append(folder)
        if os.access(folder, os.W_OK):
            done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
            if done.returncode:
                pytest.skip("cannot make a folder read-only for this user")
        return folder

    yield make
    for folder in folders:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


@pytest.mark.parametrize("command", ["run", "tokenize"])
def test_read_only_out_or_cache(isolated, read_only, tmp_path, monkeypatch, capsys, command):
    cache, out = isolated
    data = ["data=custom", f"data.path={catalogue(tmp_path / 'tiny', 30)}"]
    read_only(out)
    assert main([command, *data, "--out", str(out)]) == 2
    assert f"cannot write to the output folder {out} (" in one_error_line(capsys)
    assert (out / "metrics.json").read_text() == "{}"  # could not be removed, but no run wrote it
    read_only(cache)
    assert main([command, *data, "--out", str(tmp_path / "elsewhere")]) == 2
    line = one_error_line(capsys)
    assert f"cannot write to the stage cache {cache} (" in line and "point GRID_CACHE at" in line
    assert not list(cache.iterdir())
