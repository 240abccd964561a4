"""The command line end to end on a small real subset of Beauty."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from grid.cli import main

from .conftest import BEAUTY

KEYS = [
    f"{split}/{m}@{k}"
    for split in ("valid", "test")
    for m in ("recall", "ndcg")
    for k in (1, 5, 10, 20)
]
KEYS += ["infer/seconds", "infer/ms_per_user", "infer/users_per_s"]


@pytest.fixture(scope="module")
def small_beauty(tmp_path_factory):
    """The first 400 Beauty users and the items they touch, in the plain format."""
    folder = tmp_path_factory.mktemp("small_beauty")
    with gzip.open(BEAUTY / "sequences.tsv.gz", "rt") as f:
        lines = [next(f) for _ in range(400)]
    used = {i for line in lines for i in line.split("\t")[1].split()}
    with gzip.open(BEAUTY / "items.jsonl.gz", "rt") as f:
        items = [line for line in f if json.loads(line)["item_id"] in used]
    (folder / "sequences.tsv").write_text("".join(lines))
    (folder / "items.jsonl").write_text("".join(items))
    return folder


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
        "generator.beam_width=5",
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
    assert metrics["test/warm/users"] + metrics["test/cold/users"] == 400
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


def test_tokenize_writes_report_and_compares(small_beauty, cache, tmp_path, capsys):
    data = [f"data.path={small_beauty}", f"cache_dir={cache}", "data=custom"]
    out = tmp_path / "tok"
    args = ["tokenize", *data, "tokenizer=opq", "tokenizer.subspaces=8", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "tokenizer_report.json").read_text())
    assert all(k in report for k in REPORT_KEYS)
    assert report["sid_length"] == 9 and len(report["utilization"]) == 8  # 8 codes + de-dup
    assert (out / "sids.npz").is_file()
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("defaults:\n  tokenizer: rkmeans\ntokenizer:\n  codebook_size: 16\n")
    b.write_text("defaults:\n  tokenizer: rkmeans\ntokenizer:\n  codebook_size: 32\n")
    capsys.readouterr()
    assert main(["tokenize", *data, "--compare", str(a), str(b)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "a" in header.split() and "b" in header.split()
