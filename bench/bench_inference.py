"""Inference speed of finished runs, measured one after another in one process over all test users.

Each RUN_DIR is a finished `grid run` folder (config.yaml, model.ckpt, metrics.json); its stages
come from the cache. The test metrics are recomputed and must equal the run's, so the speed is
that of the model the run reported. Writes bench/results/inference.md.
Usage: python bench/bench_inference.py RUN_DIR ... [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import lightning as L
import torch
from bench_tiger import cpu_name
from omegaconf import OmegaConf

from grid.cache import StageCache
from grid.data import SequenceDataModule
from grid.generators import GENERATORS
from grid.pipeline import component, params, prepare

ROOT = Path(__file__).resolve().parents[1]


def measure(run: Path) -> dict:
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
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (m,) = trainer.test(model.eval(), dm.test_dataloader(), verbose=False)
    for key in ("test/recall@10", "test/ndcg@10"):
        assert math.isclose(m[key], reported[key], abs_tol=1e-6), (run, key, m[key], reported[key])
    return {"run": run.name, **m}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "inference.md")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = [measure(run) for run in args.runs]
    base = rows[0]["infer/users_per_s"]
    lines = [
        "# Inference over all Beauty test users (`bench/bench_inference.py`)",
        "",
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; 1-min load average {load:.1f} at the start. "
        "Trained runs re-evaluated one after another in one process (test metrics checked "
        "equal to the runs'); eval batch = each run's `trainer.eval_batch_size`.",
        "",
        f"| run | test R@10 | users/s | ms/user | x {rows[0]['run']} |",
        "|---|---|---|---|---|",
        *(
            f"| {r['run']} | {r['test/recall@10']:.4f} | {r['infer/users_per_s']:,.0f} | "
            f"{r['infer/ms_per_user']:.3f} | {r['infer/users_per_s'] / base:.1f} |"
            for r in rows
        ),
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
