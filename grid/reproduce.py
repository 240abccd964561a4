"""`grid reproduce`: train a published table's rows to early stopping within a time budget.

A row is one run of a sweep file (its cells x seeds); the sweep file's `reproduce:` section names
the table, each generator's expected epochs to early stopping and the published figures. The
driver keeps a results file of JSON lines, one per finished or failed row, keyed by table, row,
seed and device kind (a CPU row never stands in for a GPU row). It skips the rows that file
already holds for this device, projects each other row's time from its generator's operator
counts (`bench/results/overhead.jsonl`, at `2 ms + 37 µs` an operator: the H100 fit; on a CPU
a lower bound) and its epochs, starts rows in order while their projection fits the time left,
stops a row that runs
past the time left, and appends a row only once it has ended: an interrupted driver leaves no
half-written row, and the row's cached `last.ckpt` resumes it next time.
"""

from __future__ import annotations

import json
import math
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from grid import sweep as sw
from grid.config import ROOT, compose
from grid.errors import GridError

OVERHEAD = ROOT / "bench" / "results" / "overhead.jsonl"
LAUNCH_S, PER_OP_S = 2e-3, 37e-6  # one H100 step: 2 ms + 37 µs per operator
STARTUP_S = 60.0  # a run's stages (cached embeddings and SIDs), model build and test pass
# what an archive keeps of each run folder
ARCHIVED = ("config.yaml", "metrics.json", "selection.json", "stages.json", "error.txt")
ARCHIVED_LOGS = "logs/metrics.csv"


@dataclass
class Row:
    """One planned row: its sweep run, label, seed and projected seconds."""

    run: sw.Run
    label: str
    seed: int
    generator: str
    projected_s: float


def device() -> tuple[str, str]:
    """This machine's device kind (`gpu` or `cpu`) and name."""
    import torch

    from grid.profiling import cpu_name

    if torch.cuda.is_available():
        return "gpu", torch.cuda.get_device_name(0)
    return "cpu", cpu_name()


def label(run: sw.Run) -> str:
    """A row's name: its swept values without the seed, e.g. `generator=tiger tokenizer=rvq`."""
    return " ".join(f"{k}={sw.format_value(v)}" for k, v in run.values.items() if k != "seed")


def operator_counts(path: Path | None = None) -> dict[str, dict[str, int]]:
    """Operators a fixed-shape training step and evaluation batch run, by generator name."""
    path = path or OVERHEAD
    if not path.is_file():
        raise GridError(f"{path} is missing; run python bench/bench_overhead.py first")
    counts = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "generator" in row:
            counts[row["generator"]] = {
                "train": row["train_fixed"]["cuda_ops"],
                "eval": row["eval_fixed"]["cuda_ops"],
            }
    return counts


def project(cfg, epochs: float, ops: dict[str, int] | None) -> float:
    """Seconds a run of `cfg` is expected to take: `epochs` (within the trainer's epoch and step
    limits) of training steps and validations at the operator model's step times, plus the
    stages and the test pass."""
    if ops is None:  # a generator without training (popularity): the stages and one test pass
        return STARTUP_S
    from grid.data import training_samples
    from grid.pipeline import load_split

    _, split = load_split(cfg.data)
    samples = len(training_samples(split.train, cfg.data.max_history, cfg.data.sliding_window)[0])
    t = cfg.trainer
    users = len(split.valid[1]) if t.val_users is None else min(t.val_users, len(split.valid[1]))
    per_epoch = math.ceil(samples / t.batch_size)
    if t.max_epochs > 0:
        epochs = min(epochs, t.max_epochs)
    steps = epochs * per_epoch if t.max_steps <= 0 else min(epochs * per_epoch, t.max_steps)
    interval = t.val_check_interval  # a fraction of an epoch, or a number of steps
    validations = steps / interval if interval > 1 else steps / (per_epoch * interval)
    step_s = LAUNCH_S + PER_OP_S * ops["train"]
    valid_s = math.ceil(users / t.eval_batch_size) * (LAUNCH_S + PER_OP_S * ops["eval"])
    return STARTUP_S + steps * step_s + validations * valid_s


def read_results(path: Path) -> list[dict]:
    """The results file's rows; a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_row(path: Path, row: dict) -> None:
    """Append one row as one line, flushed to disk before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def table_name(sweep: sw.Sweep, smoke: bool) -> str:
    """The results' table name: a smoke pass is a table of its own, never the real one."""
    return sweep.reproduce["table"] + ("-smoke" if smoke else "")


def plan(
    sweep: sw.Sweep, out: Path, results: Path, extra: list[str], smoke: bool = False
) -> tuple[list[Row], list[str]]:
    """The rows still to run on this device kind, projected, and lines saying which are done."""
    spec = sweep.reproduce
    kind, _ = device()
    done = {
        (r["row"], r["seed"])
        for r in read_results(results)
        if r.get("table") == table_name(sweep, smoke) and r.get("device_kind") == kind
    }
    counts = operator_counts()
    rows, notes = [], []
    for run in sw.plan(sweep, out, smoke=smoke, extra=extra):
        name, seed = label(run), int(run.values["seed"])
        if (name, seed) in done:
            notes.append(f"done    {name} seed={seed} (in {results})")
            continue
        cfg = compose(sweep.base, run.args[1:] if sweep.base else run.args)
        generator = cfg.generator.name
        epochs = spec["epochs"].get(generator)
        if epochs is None:
            raise GridError(
                f"{sweep.path}: reproduce.epochs has no estimate for generator {generator!r}; "
                f"add {generator}: N (epochs to early stopping)"
            )
        ops = counts.get(generator)
        if ops is None and generator != "popularity":  # popularity trains nothing
            raise GridError(
                f"{OVERHEAD} has no operator counts for {generator!r}; "
                "run python bench/bench_overhead.py"
            )
        rows.append(Row(run, name, seed, generator, project(cfg, epochs, ops)))
    return rows, notes


def result_row(table: str, row: Row, error: str | None, wall_s: float) -> dict:
    """The results line of an ended row: device, versions, timing, epochs and every metric."""
    import torch

    kind, name = device()
    out = {
        "table": table,
        "row": row.label,
        "seed": row.seed,
        "device_kind": kind,
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "status": "failed" if error else "finished",
        "error": error,
        "wall_s": round(wall_s, 1),
        "projected_s": round(row.projected_s, 1),
        "run_id": row.run.run_id,
        "values": {k: v for k, v in row.run.values.items() if k != "seed"},
    }
    if error is None:
        metrics = json.loads((row.run.folder / "metrics.json").read_text())
        selection = row.run.folder / "selection.json"
        if selection.is_file():
            out["best_epoch"] = json.loads(selection.read_text()).get("epoch")
        out["metrics"] = {k: v for k, v in metrics.items() if not k.startswith("baseline/")}
    return out


def reproduce(
    sweep_path: str | Path,
    minutes: float,
    results: Path,
    out: Path,
    extra: list[str] = (),
    archive: Path | None = None,
    dry_run: bool = False,
    smoke: bool = False,
) -> list[dict]:
    """Run the rows that fit `minutes`, append each ended row to `results`; return them."""
    deadline = time.monotonic() + 60 * minutes
    sweep = sw.load_sweep(sweep_path)
    if sweep.reproduce is None:
        raise GridError(f"{sweep_path} has no reproduce: section (table, epochs, published)")
    rows, notes = plan(sweep, out, results, list(extra), smoke)
    for note in notes:
        print(note)
    ended, planned = [], 0.0  # a dry run counts the projections of the rows it would start
    for row in rows:
        left = deadline - time.monotonic() - planned
        if row.projected_s > left:
            print(
                f"skipped {row.label} seed={row.seed}: projected {row.projected_s / 60:.1f} min, "
                f"{max(left, 0) / 60:.1f} min left"
            )
            continue
        print(f"start   {row.label} seed={row.seed} (projected {row.projected_s / 60:.1f} min)")
        if dry_run:
            planned += row.projected_s
            continue
        start = time.monotonic()
        error = sw.execute(row.run.args, row.run.folder, timeout=left)
        wall = time.monotonic() - start
        if error is not None and error.startswith(sw.TIMED_OUT):
            print(f"stopped {row.label} seed={row.seed}: {error}; not recorded, resumes next time")
            continue
        line = result_row(table_name(sweep, smoke), row, error, wall)
        append_row(results, line)
        ended.append(line)
        print(f"{line['status']:<8} {row.label} seed={row.seed} in {wall / 60:.1f} min")
    if archive is not None and not dry_run:
        write_archive(archive, [row.run.folder for row in rows])
    return ended


def write_archive(path: Path, folders: list[Path]) -> None:
    """A tar.gz of the small files of each run folder (configs, metrics, curves, errors)."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for folder in folders:
            for name in (*ARCHIVED, ARCHIVED_LOGS):
                if (folder / name).is_file():
                    tar.add(folder / name, arcname=f"{folder.name}/{name}")
    os.replace(tmp, path)


def published_value(published: list[dict], values: dict, metric: str) -> float | None:
    """The published `metric` of the entry whose `match` values a row has, if any."""
    for entry in published:
        match = entry.get("match", {})
        if all(sw.format_value(values.get(k)) == sw.format_value(v) for k, v in match.items()):
            return entry.get(metric)
    return None


def table(sweep_path: str | Path, results: Path) -> str:
    """Markdown: each row's mean ± std test Recall@10 / NDCG@10 per device kind, beside the
    published figures."""
    import numpy as np

    sweep = sw.load_sweep(sweep_path)
    spec = sweep.reproduce
    published = spec.get("published") or []
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in read_results(results):
        if r.get("table") == spec["table"] and r.get("status") == "finished":
            groups.setdefault((r["row"], r["device_kind"]), []).append(r)
    lines = [
        "| row | device | seeds | test Recall@10 | test NDCG@10 | published Recall@10 "
        "| epochs | train samples/s | inference users/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def stat(rows, key):
        values = np.array([r["metrics"][key] for r in rows if key in r["metrics"]])
        if not len(values):
            return "–"
        return f"{values.mean():.4f}" + (f" ± {values.std(ddof=1):.4f}" if len(values) > 1 else "")

    for (name, kind), rows in sorted(groups.items()):
        paper = published_value(published, rows[0]["values"], "test/recall@10")
        epochs = "/".join(str(r.get("best_epoch")) for r in rows)
        speeds = [
            f"{np.mean(v):,.0f}"
            if (v := [r["metrics"][key] for r in rows if key in r["metrics"]])
            else "–"
            for key in ("train/samples_per_s", "infer/users_per_s")
        ]
        lines.append(
            f"| {name} | {kind}: {rows[0]['device']} | {len(rows)} | "
            f"{stat(rows, 'test/recall@10')} | {stat(rows, 'test/ndcg@10')} | "
            f"{'–' if paper is None else f'{paper:.4f}'} | {epochs} | {' | '.join(speeds)} |"
        )
    return "\n".join(lines)
