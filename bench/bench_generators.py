"""Every generator on full Beauty under one budget, one after another in one invocation.

Test Recall/NDCG, warm/cold Recall@10, coverage, training samples/s, inference users/s over all
test users and wall time, as `grid run` records them. Writes bench/results/generators_<trainer>.md
and .jsonl.
Usage: python bench/bench_generators.py [--trainer cpu|gpu] [--only NAME ...] [--infer-again]

`--infer-again` re-runs every row from its cached model (no training) and replaces only the
inference figures: run it on an idle machine for speeds measured together in one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from grid.profiling import cpu_name

ROOT = Path(__file__).resolve().parents[1]
# name -> overrides of the default experiment (or of experiments/gpu.yaml under trainer=gpu), or
# an experiment file and its overrides
RPG_448 = ["generator=rpg", "tokenizer=opq", "generator.lr=1e-3", "generator.tau=0.1"]
ROWS = {
    "TIGER (constrained beam 20)": [],
    "RPG d128 (exact)": ["experiments/rpg_cpu.yaml"],
    "RPG d128 (graph)": ["experiments/rpg_cpu.yaml", "generator.decoding=graph"],
    "RPG d448 (exact)": RPG_448,
    "RPG d448 (graph)": [*RPG_448, "generator.decoding=graph"],
    "SETRec": ["generator=setrec"],
    "SimGR": ["generator=simgr"],
    "SASRec": ["generator=sasrec"],
    "popularity": ["generator=popularity"],
}
COLUMNS = [
    ("R@5", "test/recall@5", ".4f"),
    ("R@10", "test/recall@10", ".4f"),
    ("N@5", "test/ndcg@5", ".4f"),
    ("N@10", "test/ndcg@10", ".4f"),
    ("warm R@10", "test/warm_users/recall@10", ".4f"),
    ("cold R@10", "test/cold_users/recall@10", ".4f"),
    ("coverage@10", "test/coverage@10", ".3f"),
    ("train samples/s", "train/samples_per_s", ",.0f"),
    ("train s", "train/seconds", ",.0f"),
    ("infer users/s", "infer/users_per_s", ",.0f"),
    ("run s", "run/seconds", ",.0f"),
]


def run(name: str, overrides: list[str], trainer: str, out: Path) -> dict:
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    folder = out / slug
    cmd = [sys.executable, "-m", "grid", "run", *overrides, f"trainer={trainer}"]
    cmd += ["trainer.progress_bar=false", "--out", str(folder)]
    print("$", " ".join(cmd[2:]), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:  # recorded, and the other rows still run
        return {"name": name, "overrides": overrides, "error": f"exit {done.returncode}"}
    metrics = json.loads((folder / "metrics.json").read_text())
    selection = folder / "selection.json"
    epoch = json.loads(selection.read_text())["epoch"] if selection.is_file() else None
    return {"name": name, "overrides": overrides, "wall_s": time.perf_counter() - start,
            "best_epoch": epoch, **metrics}  # fmt: skip


def table(rows: list[dict]) -> list[str]:
    head = ["generator", *(c for c, _, _ in COLUMNS), "x TIGER users/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    tiger = next((r.get("infer/users_per_s") for r in rows if r["name"].startswith("TIGER")), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |")
            continue
        cells = [r["name"]]
        for _, key, fmt in COLUMNS:
            cells.append(format(r[key], fmt) if key in r else "")
        speedup = r["infer/users_per_s"] / tiger if tiger else float("nan")
        cells.append(f"{speedup:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--only", nargs="*", help="row names to run, in this order (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_generators")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--infer-again", action="store_true", help="new inference figures only")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    saved = args.results / f"generators_{args.trainer}.jsonl"
    earlier = {}
    if args.infer_again:
        earlier = {r["name"]: r for r in map(json.loads, saved.read_text().splitlines())}
    rows = []
    for name in args.only or ROWS:
        row = run(name, ROWS[name], args.trainer, args.out / args.trainer)
        if name in earlier and "error" not in row:  # keep the training run's figures
            infer = {k: v for k, v in row.items() if k.startswith("infer/")}
            row = {**earlier[name], **infer, "infer_again": True}
        rows.append(row)
        write(rows, args.trainer, load, args.results)  # after every row: a cut run keeps its rows


def write(rows: list[dict], trainer: str, load: float, results: Path) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    lines = [
        f"# Generators on full Beauty (`bench/bench_generators.py --trainer {trainer}`)",
        "",
        f"{cpu_name()}, {os.cpu_count()} cores, {device}, torch {torch.__version__}; "
        f"1-min load average {load:.1f} at the start. `trainer={trainer}`; each row is "
        "`grid run` with the listed overrides, run one after another in this invocation. "
        "Metrics and inference users/s over all test users (the trainer's `eval_batch_size`); "
        "train samples/s excludes validation; each RPG (graph) row reuses the RPG (exact) model "
        "above it, so its run time excludes training."
        + (
            " Inference figures re-measured from the cached models in one later invocation."
            if any(r.get("infer_again") for r in rows)
            else ""
        ),
        "",
        *table(rows),
        "",
        "| generator | overrides | best epoch | test users warm / cold |",
        "|---|---|---|---|",
        *(
            f"| {r['name']} | `{' '.join(r['overrides']) or '(default)'}` | {r['best_epoch']} | "
            f"{r.get('test/warm_users/users', 0):.0f} / {r.get('test/cold_users/users', 0):.0f} |"
            for r in rows
            if "error" not in r
        ),
    ]
    results.mkdir(exist_ok=True)
    (results / f"generators_{trainer}.md").write_text("\n".join(lines) + "\n")
    with open(results / f"generators_{trainer}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
