"""`grid sweep`: expand a sweep file into `grid run`s, launch them, collect one results table.

A sweep file names a `base` experiment, `cells` (a list of override sets, e.g. the tokenizer x
generator pairs that make sense together), a `grid` (cartesian product, crossed with the cells),
`zip` (lists taken in step, crossed with the grid), `seeds` (crossed), fixed `overrides`, `smoke`
overrides for a CPU-sized check and `slurm` settings. Each run is
`grid run BASE OVERRIDES --out SWEEP_OUT/ID` with ID a hash of its resolved config, so a re-run
skips finished runs and resumes the others. Swept values given on the command line (`data=beauty`)
pick the cells that have them.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import itertools
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from grid.config import MAX_SEED, ROOT, _load_yaml, compose, parse_override
from grid.errors import GridError
from grid.runlock import busy, busy_message

log = logging.getLogger(__name__)

FIELDS = ("base", "cells", "grid", "zip", "seeds", "overrides", "smoke", "slurm", "reproduce")
# slurm: section -> submitit AutoExecutor parameter
SLURM_FIELDS = {
    "partition": "slurm_partition",
    "time": "timeout_min",
    "gpus_per_run": "gpus_per_node",
    "cpus_per_run": "cpus_per_task",
    "mem_gb": "mem_gb",
    "array_parallelism": "slurm_array_parallelism",
    "additional": "slurm_additional_parameters",
}
LAUNCHERS = ("local", "slurm", "submitit-local")


@dataclass
class Sweep:
    """A parsed sweep file."""

    path: Path
    base: Path | None
    cells: list[dict[str, object]]
    grid: dict[str, list]
    zipped: dict[str, list]
    seeds: list[int]
    overrides: list[str]
    smoke: dict = field(default_factory=dict)
    slurm: dict = field(default_factory=dict)
    reproduce: dict | None = None  # `grid reproduce`: table, epochs, published

    @property
    def keys(self) -> list[str]:
        """The swept keys, in table order (seed last)."""
        listed = dict.fromkeys(key for cell in self.cells for key in cell)
        return [*listed, *self.grid, *self.zipped, *(["seed"] if self.seeds else [])]


@dataclass
class Run:
    """One planned `grid run`: its id, swept values (seed included), arguments and folder."""

    run_id: str
    values: dict[str, object]
    args: list[str]
    swept: list[str]
    folder: Path

    def status(self) -> str:
        if (self.folder / "metrics.json").is_file():
            return "finished"
        if self.folder.is_dir() and busy(self.folder):
            return "running"
        return "failed" if (self.folder / "error.txt").is_file() else "pending"


def _where(path: Path, what: str) -> str:
    return f"{path}: {what}"


def _values(path: Path, section: str, tree) -> dict[str, list]:
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise GridError(_where(path, f"{section} must map keys to lists, e.g. tokenizer: [rvq]"))
    for key, values in tree.items():
        if not isinstance(values, list):
            raise GridError(
                _where(path, f"{section}.{key} must be a list of values, e.g. [{values!r}]")
            )
        if not values:
            raise GridError(_where(path, f"{section}.{key} has no values; list at least one"))
        if key == "seed":
            raise GridError(_where(path, f"list seeds under seeds:, not {section}.seed"))
    return dict(tree)


def _cells(path: Path, items) -> list[dict[str, object]]:
    """The `cells:` list: each a non-empty mapping of override keys to single values."""
    if items is None:
        return []
    example = "e.g. cells: [{tokenizer: opq, generator: rpg}, {generator: sasrec}]"
    if not isinstance(items, list) or not items:
        raise GridError(_where(path, f"cells must be a non-empty list of mappings; {example}"))
    for i, cell in enumerate(items):
        if not isinstance(cell, dict) or not cell:
            raise GridError(_where(path, f"cells[{i}] must map keys to values; {example}"))
        if "seed" in cell:
            raise GridError(_where(path, f"list seeds under seeds:, not in cells[{i}]"))
        if items.index(cell) < i:
            raise GridError(_where(path, f"cells[{i}] repeats cells[{items.index(cell)}]"))
    return [dict(cell) for cell in items]


def _overrides(path: Path, section: str, items) -> list[str]:
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(o, str) and "=" in o for o in items):
        raise GridError(_where(path, f"{section} must be a list of KEY=VALUE strings"))
    return list(items)


def _base(path: Path, base) -> Path | None:
    """The base experiment: relative to the sweep file, else to the grid checkout."""
    if base is None:
        return None
    for candidate in (Path(base), path.parent / base, ROOT / base):
        if candidate.is_file():
            return candidate.resolve()
    raise GridError(_where(path, f"base experiment {base} not found next to it nor in {ROOT}"))


def _seeds(path: Path, section: str, seeds) -> list[int]:
    """A list of distinct seeds in numpy's and Lightning's range."""
    if not isinstance(seeds, list) or not all(type(s) is int for s in seeds):
        raise GridError(_where(path, f"{section} must be a list of integers, e.g. [1, 2, 3]"))
    if bad := [s for s in seeds if not 0 <= s <= MAX_SEED]:
        raise GridError(
            _where(path, f"{section} holds {bad[0]}, out of range; give seeds in [0, {MAX_SEED}]")
        )
    if dupes := sorted({s for s in seeds if seeds.count(s) > 1}):
        raise GridError(
            _where(path, f"seed {dupes[0]} is listed twice in {section}; list each once")
        )
    return seeds


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"sweep file {path} not found; give the path of a sweep YAML")
    tree = _load_yaml(path)
    for key in tree:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"fields: {', '.join(FIELDS)}"
            raise GridError(_where(path, f"unknown sweep field {key!r}; {hint}"))
    grid, zipped = _values(path, "grid", tree.get("grid")), _values(path, "zip", tree.get("zip"))
    listed = _cells(path, tree.get("cells"))
    if not grid and not zipped and not listed:
        raise GridError(
            _where(path, "the grid is empty; give grid: {KEY: [VALUE, ...]} or cells: [...]")
        )
    lengths = {key: len(values) for key, values in zipped.items()}
    if len(set(lengths.values())) > 1:
        sizes = ", ".join(f"{k} has {n}" for k, n in lengths.items())
        raise GridError(_where(path, f"zipped lists differ in length ({sizes}); make them equal"))
    if both := sorted(set(grid) & set(zipped)):
        raise GridError(_where(path, f"{both[0]} is both in grid and zip; keep it in one"))
    if both := sorted({k for cell in listed for k in cell} & (set(grid) | set(zipped))):
        raise GridError(_where(path, f"{both[0]} is both in cells and grid/zip; keep it in one"))
    seeds = _seeds(path, "seeds", tree.get("seeds") or [])
    smoke = tree.get("smoke") or {}
    if isinstance(smoke, list):
        smoke = {"overrides": smoke}
    if not isinstance(smoke, dict) or set(smoke) - {"overrides", "seeds"}:
        raise GridError(_where(path, "smoke must be a list of KEY=VALUE (or overrides:, seeds:)"))
    if smoke.get("seeds") is not None:
        _seeds(path, "smoke.seeds", smoke["seeds"])
    slurm = tree.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise GridError(_where(path, f"slurm must map fields to values, e.g. partition: {slurm}"))
    for key in slurm:
        if key not in SLURM_FIELDS:
            close = difflib.get_close_matches(key, SLURM_FIELDS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"fields: {', '.join(SLURM_FIELDS)}"
            raise GridError(_where(path, f"unknown slurm field {key!r}; {hint}"))
    return Sweep(
        path=path,
        base=_base(path, tree.get("base")),
        cells=listed,
        grid=grid,
        zipped=zipped,
        seeds=seeds,
        overrides=_overrides(path, "overrides", tree.get("overrides")),
        smoke={
            "overrides": _overrides(path, "smoke", smoke.get("overrides")),
            "seeds": smoke.get("seeds"),
        },
        slurm=dict(slurm),
        reproduce=_reproduce(path, tree.get("reproduce")),
    )


def _reproduce(path: Path, spec) -> dict | None:
    """The `reproduce:` section: `table` (a name), `epochs` (generator -> expected epochs) and
    `published` (a list of `{match: {KEY: VALUE}, METRIC: VALUE}`)."""
    if spec is None:
        return None
    example = "e.g. reproduce: {table: beauty, epochs: {tiger: 60}, published: []}"
    if not isinstance(spec, dict) or set(spec) - {"table", "epochs", "published"}:
        raise GridError(_where(path, f"reproduce must hold table, epochs, published; {example}"))
    epochs = spec.get("epochs")
    if not isinstance(spec.get("table"), str) or not isinstance(epochs, dict):
        raise GridError(_where(path, f"reproduce needs a table name and epochs; {example}"))
    for name, n in epochs.items():
        if not isinstance(n, int | float) or isinstance(n, bool) or n < 0:
            raise GridError(_where(path, f"reproduce.epochs.{name}={n!r} must be a number >= 0"))
    published = spec.get("published") or []
    if not isinstance(published, list) or not all(
        isinstance(p, dict) and isinstance(p.get("match"), dict) for p in published
    ):
        raise GridError(_where(path, "reproduce.published must list {match: {...}, METRIC: V}"))
    return {"table": spec["table"], "epochs": dict(epochs), "published": published}


def cells(sweep: Sweep, seeds: list[int] | None = None) -> list[dict[str, object]]:
    """Every combination: the listed cells crossed with the product of the grid, the zipped rows
    and the seeds."""
    seeds = sweep.seeds if seeds is None else seeds
    rows = list(zip(*sweep.zipped.values(), strict=True)) or [()]
    out = []
    for listed in sweep.cells or [{}]:
        for combo in itertools.product(*sweep.grid.values()):
            for row in rows:
                for seed in seeds or [None]:
                    cell = listed | dict(zip(sweep.grid, combo, strict=True))
                    cell |= dict(zip(sweep.zipped, row, strict=True))
                    out.append(cell | ({"seed": seed} if seed is not None else {}))
    return out


def select(sweep: Sweep, cells_: list[dict], wanted: dict[str, object]) -> list[dict]:
    """The cells whose swept values equal `wanted` (`data=beauty` on the command line of a sweep
    over data runs its Beauty cells only)."""
    chosen = cells_
    for key, value in wanted.items():
        chosen = [c for c in chosen if key in c and format_value(c[key]) == format_value(value)]
        if not chosen:
            listed = dict.fromkeys(format_value(c[key]) for c in cells_ if key in c)
            raise GridError(
                _where(
                    sweep.path,
                    f"{key}={format_value(value)} matches no cell; its values: {', '.join(listed)}",
                )
            )
    return chosen


def format_value(value) -> str:
    """An override's text that `grid run` reads back as the same value."""
    if isinstance(value, str) and parse_override(f"k={value}")[1] == value:
        return value
    text = json.dumps(value)
    if parse_override(f"k={text}")[1] != value:
        raise GridError(f"cannot pass {value!r} on the command line; use a simpler value")
    return text


def _portable(tree):
    """Paths inside the grid checkout written relative to it, so ids survive moving it."""
    if isinstance(tree, dict):
        return {k: _portable(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_portable(v) for v in tree]
    if isinstance(tree, str) and tree.startswith(str(ROOT)):
        return "${root}" + tree[len(str(ROOT)) :]
    return tree


def run_id(cfg: DictConfig) -> str:
    """A short stable hash of the fully resolved config (seed included)."""
    tree = _portable(OmegaConf.to_container(cfg, resolve=True))
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


def plan(sweep: Sweep, out: Path, smoke: bool = False, extra: Iterable[str] = ()) -> list[Run]:
    """Compose every run as `grid run` would and give it its id and folder under `out`."""
    extra = list(extra)
    if smoke and not sweep.smoke["overrides"]:
        raise GridError(_where(sweep.path, "has no smoke: section; add one or drop --smoke"))
    swept = set(sweep.keys)
    wanted = dict(parse_override(text) for text in extra if parse_override(text)[0] in swept)
    extra = [text for text in extra if parse_override(text)[0] not in swept]
    fixed = sweep.overrides + (sweep.smoke["overrides"] if smoke else []) + extra
    seeds = None  # the sweep's; a smoke pass runs each cell once unless smoke.seeds says
    if smoke:
        seeds = sweep.seeds[:1] if sweep.smoke["seeds"] is None else list(sweep.smoke["seeds"])
    base = [str(sweep.base)] if sweep.base else []
    runs, seen = [], {}
    for cell in select(sweep, cells(sweep, seeds), wanted):
        swept = [f"{k}={format_value(v)}" for k, v in cell.items()]
        try:
            cfg = compose(sweep.base, fixed + swept)
        except GridError as e:
            raise GridError(_where(sweep.path, str(e)))
        rid = run_id(cfg)
        if rid in seen:
            raise GridError(
                _where(
                    sweep.path,
                    f"cells {seen[rid]} and {cell} compose the same config; drop one of them",
                )
            )
        seen[rid] = cell
        values = cell if "seed" in cell else cell | {"seed": cfg.seed}
        runs.append(Run(rid, values, base + fixed + swept, swept, out / rid))
    return runs


def default_out(sweep: Sweep, smoke: bool = False, extra: Iterable[str] = ()) -> Path:
    """`sweeps/<stem>[-<overrides>][-smoke]`: a command-line variant gets its own table."""
    parts = [sweep.path.stem, *(o.replace("/", "_") for o in extra), *(["smoke"] if smoke else [])]
    return Path("sweeps") / "-".join(parts)


def _error_line(log: Path, start: int, returncode: int) -> str:
    """The attempt's `error:` line (else its last line) and exit code, from byte `start` on."""
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    message = errors[-1].removeprefix("error:").strip() if errors else (lines or [""])[-1]
    return f"{message} (exit code {returncode})"


TIMED_OUT = "ran past its time limit"


def execute(
    args: list[str],
    folder: str | Path,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> str | None:
    """Run `grid run ARGS --out FOLDER` in a subprocess; return its one-line error, or None.
    A run still going after `timeout` seconds is killed (its cached last.ckpt resumes it).

    The launch lock keeps two sweeps from running it at once; the second then finds it
    finished. A run that outlived its sweep (killed with SIGKILL) still holds the run's own lock:
    it is left alone, and its files too.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / "launch.lock"):
        if (folder / "metrics.json").is_file():
            return None
        if busy(folder):
            return busy_message(folder)
        (folder / "error.txt").unlink(missing_ok=True)
        (folder / "overrides.txt").write_text("".join(f"{a}\n" for a in args if "=" in a))
        command = [sys.executable, "-m", "grid", "run", *args, "--out", str(folder)]
        paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]  # this grid checkout
        group = os.environ.get("GRID_SWEEP", folder.parent.name)  # the runs' wandb group
        env = {
            **os.environ,
            **(env or {}),
            "PYTHONPATH": os.pathsep.join(paths),
            "GRID_SWEEP": group,
        }
        with open(folder / "run.log", "a") as log:  # one log of every attempt
            start = log.tell()
            try:
                code = subprocess.run(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout
                ).returncode
            except subprocess.TimeoutExpired:
                error = f"{TIMED_OUT} of {timeout / 60:.1f} min"
                (folder / "error.txt").write_text(error + "\n")
                return error
        if code == 0 and (folder / "metrics.json").is_file():
            return None
        error = _error_line(folder / "run.log", start, code)
        (folder / "error.txt").write_text(error + "\n")
        return error


def local_slots(
    gpus: int | None = None, per_gpu: int | None = None, max_parallel: int | None = None
) -> list[str | None]:
    """One CUDA_VISIBLE_DEVICES value per concurrent run (None on a CPU-only machine)."""
    import torch

    for option, value in (
        ("--gpus", gpus),
        ("--per-gpu", per_gpu),
        ("--max-parallel", max_parallel),
    ):
        if value is not None and value < 1:
            raise GridError(f"{option} {value} is out of range; give 1 or more (or leave it out)")
    visible = torch.cuda.device_count()
    if visible == 0:
        if gpus or per_gpu:
            option = f"--gpus {gpus}" if gpus else f"--per-gpu {per_gpu}"
            raise GridError(
                f"{option} asks for GPUs but none is visible (torch.cuda.device_count() = 0); "
                "drop it, or run several CPU runs at once with --max-parallel N"
            )
        return [None] * (max_parallel or 1)
    gpus = gpus or visible
    if gpus > visible:
        raise GridError(
            f"--gpus {gpus} but only {visible} GPU(s) are visible; use --gpus {visible} or fewer"
        )
    ids = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(visible)))).split(",")
    slots = [ids[i] for _ in range(per_gpu or 1) for i in range(gpus)]
    return slots[:max_parallel] if max_parallel else slots


Done = Callable[[Run, str | None], None]


def launch_local(runs: list[Run], slots: list[str | None], done: Done) -> None:
    """Run `runs` as subprocesses, one per slot at a time; call `done` as each ends."""
    free: queue.Queue = queue.Queue()
    for slot in slots:
        free.put(slot)

    def work(run: Run) -> str | None:
        slot = free.get()
        try:
            env = {"CUDA_VISIBLE_DEVICES": slot} if slot is not None else None
            return execute(run.args, run.folder, env)
        finally:
            free.put(slot)

    pool = ThreadPoolExecutor(max_workers=len(slots))
    try:
        futures = {pool.submit(work, run): run for run in runs}
        for future in as_completed(futures):
            done(futures[future], future.result())
    finally:  # on Ctrl-C the running children stop with it; start no others
        pool.shutdown(wait=True, cancel_futures=True)


def _minutes(time) -> int:
    """`time` as minutes: an int, or Slurm's `HH:MM:SS` / `D-HH:MM:SS`."""
    if isinstance(time, int) or str(time).isdigit():
        return int(time)
    days, _, clock = str(time).rpartition("-")
    try:
        h, m, s = (int(x) for x in clock.split(":"))
    except ValueError:
        raise GridError(f"slurm time {time!r} is not minutes nor HH:MM:SS; e.g. time: 12:00:00")
    return int(days or 0) * 1440 + h * 60 + m + (s > 0)


def submitit_parameters(slurm: dict, name: str) -> dict:
    """The submitit AutoExecutor parameters of a `slurm:` section (one task on one node)."""
    params = {"name": name, "nodes": 1, "tasks_per_node": 1}
    for key, value in slurm.items():
        if value is not None:
            params[SLURM_FIELDS[key]] = _minutes(value) if key == "time" else value
    return params


def check_submitit(cluster: str) -> None:
    """submitit must be installed, and for 'slurm' this must be a Slurm login node."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise GridError(
            "the slurm launcher needs submitit: pip install submitit "
            "(or pip install 'grid-rec[slurm]')"
        )
    if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise GridError(
            "--launcher slurm needs a Slurm cluster but sbatch/srun are not on PATH; run it on "
            "a login node, or use --launcher local"
        )


def submitit_executor(cluster: str, folder: Path, slurm: dict, name: str):
    """A submitit AutoExecutor for `cluster` ('slurm', or 'local' for its LocalExecutor)."""
    check_submitit(cluster)
    import submitit

    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    executor.update_parameters(**submitit_parameters(slurm, name))
    return executor


def launch_submitit(runs: list[Run], executor, done: Done) -> None:
    """Submit every run as one job (a Slurm job array); call `done` as each ends."""
    import submitit

    with executor.batch():
        jobs = [executor.submit(execute, run.args, str(run.folder)) for run in runs]
    by_id = {job.job_id: run for job, run in zip(jobs, runs, strict=True)}
    poll = 1 if executor.cluster == "local" else 15
    for job in submitit.helpers.as_completed(jobs, poll_frequency=poll):
        run = by_id[job.job_id]
        try:
            error = job.result()
        except Exception as e:  # the job died (time limit, node failure): record, go on
            error = f"job {job.job_id} failed: {(str(e).strip().splitlines() or [''])[-1]}"
            (run.folder / "error.txt").write_text(error + "\n")
        done(run, error)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def collect(runs: list[Run], out: Path) -> list[dict]:
    """Write results.csv and results.jsonl: one row per finished run (id, swept values, metrics).

    Rows of other sweeps sharing the folder stay while their runs stay finished.
    """
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(out / "results.lock"):
        rows = {}
        if (out / "results.jsonl").is_file():
            for number, line in enumerate((out / "results.jsonl").read_text().splitlines(), 1):
                try:
                    row = json.loads(line)
                    run_id = row["run_id"]
                except (ValueError, TypeError, KeyError):  # rows of this sweep are rebuilt below
                    log.warning("%s:%d: damaged row dropped", out / "results.jsonl", number)
                    continue
                if (out / str(run_id) / "metrics.json").is_file():
                    rows[run_id] = row
        for run in runs:
            if (run.folder / "metrics.json").is_file():
                metrics = json.loads((run.folder / "metrics.json").read_text())
                rows[run.run_id] = {"run_id": run.run_id, **run.values, **metrics}
        rows = list(rows.values())
        _write(out / "results.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        _write(out / "results.csv", _csv(rows))
    return rows


def _csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in row.items()}
        )
    return text.getvalue()


def describe(sweep: Sweep, runs: list[Run], out: Path) -> str:
    """The plan as a table: id, status and the swept overrides of each run."""
    statuses = [run.status() for run in runs]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    lines = [f"sweep {sweep.path}: {len(runs)} runs ({counts}) -> {out}"]
    fixed = runs[0].args[: len(runs[0].args) - len(runs[0].swept)]
    lines.append(f"  every run: grid run {' '.join(fixed)}".rstrip())
    for run, status in zip(runs, statuses, strict=True):
        lines.append(f"  {run.run_id}  {status:<8}  {' '.join(run.swept)}")
    return "\n".join(lines)


def wandb_spec(sweep: Sweep, extra: Iterable[str] = ()) -> dict:
    """A wandb sweep (grid method) over the same parameters, each agent run calling `grid run`
    from the grid checkout.

    Zipped keys become one parameter named `KEY1,KEY2` whose values are the zipped rows written
    as `[v1, v2]`; `grid run` reads `KEY1,KEY2=[v1, v2]` as `KEY1=v1 KEY2=v2`.
    """
    if sweep.cells:
        raise GridError(
            _where(
                sweep.path,
                "has cells:, which a wandb grid (a product of parameters) cannot "
                "express; export a sweep with grid: and zip: only, or run it with grid sweep",
            )
        )
    parameters = {key: {"values": list(values)} for key, values in sweep.grid.items()}
    if sweep.zipped:
        rows = zip(*sweep.zipped.values(), strict=True)
        parameters[",".join(sweep.zipped)] = {
            "values": ["[" + ", ".join(format_value(v) for v in row) + "]" for row in rows]
        }
    if sweep.seeds:
        parameters["seed"] = {"values": list(sweep.seeds)}
    base = [_relative(sweep.base)] if sweep.base else []
    command = ["${env}", "${interpreter}", "-m", "grid", "run", *base, *sweep.overrides, *extra]
    return {
        "name": sweep.path.stem,
        "method": "grid",
        "parameters": parameters,
        "command": [*command, "${args_no_hyphens}"],
    }


def _relative(path: Path) -> str:
    """A path inside the grid checkout relative to it (agents run from their own checkout)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def write_wandb_spec(sweep: Sweep, path: Path, extra: Iterable[str] = ()) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, yaml.safe_dump(wandb_spec(sweep, extra), sort_keys=False))
    except OSError as e:
        raise GridError(
            f"cannot write the wandb sweep spec {path} ({e.strerror}); give --export-wandb a "
            f"writable file path"
        )
