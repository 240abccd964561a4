"""Inference speed of finished runs, measured one after another in one process over all test users.

Each RUN_DIR is a finished `grid run` folder (config.yaml, model.ckpt, metrics.json); its stages
come from the cache. The test metrics are recomputed and must equal the run's, so the speed is
that of the model the run reported. The runs are evaluated in turn for `--rounds` rounds and each
reports its median users/s, so a slow moment of the machine cannot decide a ratio.
Writes bench/results/inference.md.
Usage: python bench/bench_inference.py RUN_DIR ... [--rounds 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from grid.cache import StageCache
from grid.data import SequenceDataModule
from grid.generators import GENERATORS
from grid.pipeline import component, params, prepare
from grid.profiling import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def load(run: Path) -> tuple:
    """The run's model (weights and chosen beta loaded), its test loader and reported metrics."""
    cfg = OmegaConf.load(run / "config.yaml")
    reported = json.loads((run / "metrics.json").read_text())
    cls = component(GENERATORS, cfg.generator, "generator")
    stages = prepare(cfg, StageCache(os.environ.get("GRID_CACHE", cfg.cache_dir)), cls.consumes)
    t = cfg.trainer
    dm = SequenceDataModule(stages.split, cfg.data.max_history, eval_batch_size=t.eval_batch_size)
    inputs = stages.inputs()
    model = cls.build(inputs, **params(cfg.generator))
    if model.trainable:
        model.load_checkpoint(run / "model.ckpt")
    if "setrec/beta" in reported:  # chosen on validation by the run
        model.beta = reported["setrec/beta"]
    return model.eval(), dm.test_dataloader(), reported


def measure(run: Path, model, loader, reported: dict) -> dict:
    """Test metrics of one evaluation over all test users, checked equal to the run's."""
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (m,) = trainer.test(model, loader, verbose=False)
    for key in ("test/recall@10", "test/ndcg@10"):
        assert math.isclose(m[key], reported[key], abs_tol=1e-6), (run, key, m[key], reported[key])
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "inference.md")
    args = parser.parse_args()
    load_avg = os.getloadavg()[0]
    runs = {run: load(run) for run in args.runs}
    speeds = {run: [] for run in args.runs}
    for _ in range(args.rounds):
        for run, loaded in runs.items():
            m = measure(run, *loaded)
            speeds[run].append(m["infer/users_per_s"])
    rows = [
        {"run": run.name, "recall": loaded[2]["test/recall@10"], "speeds": speeds[run]}
        for run, loaded in runs.items()
    ]
    for row in rows:
        row["users_per_s"] = statistics.median(row["speeds"])
    base = rows[0]["users_per_s"]
    lines = [
        "# Inference over all Beauty test users (`bench/bench_inference.py`)",
        "",
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; 1-min load average {load_avg:.1f} at the start. "
        f"Trained runs re-evaluated one after another in one process, {args.rounds} rounds "
        "(test metrics checked equal to the runs' every time); users/s is each run's median "
        "round; eval batch = each run's `trainer.eval_batch_size`.",
        "",
        f"| run | test R@10 | users/s | ms/user | x {rows[0]['run']} | rounds (users/s) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['run']} | {r['recall']:.4f} | {r['users_per_s']:,.0f} | "
            f"{1000 / r['users_per_s']:.3f} | {r['users_per_s'] / base:.1f} | "
            f"{', '.join(f'{v:,.0f}' for v in r['speeds'])} |"
            for r in rows
        ),
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
