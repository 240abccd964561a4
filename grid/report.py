"""`grid report`: compare finished runs as configurations x seeds, with paired tests and plots.

A configuration is a resolved config up to `seed` and the fields that only choose where and how
a run logs (IGNORED). Its seeds give a mean and a sample standard deviation (ddof=1) of every
test metric; each configuration is tested against a baseline configuration with a paired t-test
over test users on the per-user values of per_user.npz, each user's value averaged over the
configuration's seeds first.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from scipy import stats

from grid.errors import GridError

log = logging.getLogger(__name__)

# Not part of a configuration: the seed (averaged over) and fields that change no result.
IGNORED = ("seed", "cache_dir", "trainer.logger", "trainer.wandb_project", "trainer.progress_bar")
PAIRED = ("ndcg@10", "recall@10")  # per-user metrics of the significance test
# run/seconds counts only the stages a run computed; train/seconds is its model's training time
# even when the model came from the cache.
TIMINGS = ("infer/users_per_s", "train/seconds", "run/seconds")
MAIN = ("test/recall@10", "test/ndcg@10", "test/recall@20", "test/ndcg@20", "test/coverage@10")
MISSING = "—"


@dataclass
class Run:
    """One finished run folder: its flattened resolved config and its metrics."""

    path: Path
    config: dict
    metrics: dict[str, float]

    @property
    def seed(self):
        return self.config.get("seed")


@dataclass
class Configuration:
    """The runs (one per seed) of one configuration and its summary row."""

    settings: dict  # the varying keys' values
    runs: list[Run]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    p: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        shown = {k: v for k, v in self.settings.items() if v is not MISSING}
        return ", ".join(f"{k}={_text(v)}" for k, v in shown.items()) or "all runs"


def _text(value) -> str:
    """A config value as YAML writes it (true, null, 0.001)."""
    if value is True or value is False or value is None:
        return json.dumps(value)
    return str(value)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + str(key)] = tuple(value) if isinstance(value, list) else value
    return out


def _is_run(folder: Path) -> bool:
    return (folder / "metrics.json").is_file() and (folder / "config.yaml").is_file()


def _run_folders(folder: Path) -> list[Path]:
    """`folder` itself when it is a finished run, else its finished run subfolders (a sweep)."""
    if not folder.is_dir():
        raise GridError(f"{folder} is not a folder; give sweep or run folders")
    if _is_run(folder):
        return [folder]
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
    runs = [p for p in subfolders if _is_run(p)]
    if not runs:
        started = [p for p in (folder, *subfolders) if (p / "config.yaml").is_file()]
        why = (
            f"{len(started)} run folder(s) have config.yaml but no metrics.json (unfinished; "
            "re-run them)"
            if started
            else "neither it nor a subfolder holds config.yaml and metrics.json"
        )
        raise GridError(f"no finished runs in {folder}: {why}")
    unfinished = [p.name for p in subfolders if (p / "config.yaml").is_file() and not _is_run(p)]
    if unfinished:
        log.warning("%s: left out %d unfinished runs: %s", folder, len(unfinished), unfinished)
    return runs


def load_runs(folders: list[str | Path]) -> list[Run]:
    """The finished runs in sweep or run folders (each run once)."""
    paths = {p.resolve(): p for f in folders for p in _run_folders(Path(f))}
    runs = []
    for path in paths.values():
        config = _flatten(
            OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True)
        )
        metrics = json.loads((path / "metrics.json").read_text())
        runs.append(Run(path, config, {k: v for k, v in metrics.items() if _number(v)}))
    return runs


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _order(value):
    """Sort key of config values: missing first, then numbers by size, then text."""
    if value is MISSING:
        return (0, 0, "")
    return (1, value, "") if _number(value) else (2, 0, _text(value))


def group(runs: list[Run]) -> list[Configuration]:
    """Configurations of runs (all but IGNORED equal), ordered by their varying values."""
    by_key: dict[tuple, list[Run]] = {}
    for run in runs:
        key = tuple(sorted((k, _text(v)) for k, v in run.config.items() if k not in IGNORED))
        by_key.setdefault(key, []).append(run)
    configs = [c for _, c in sorted(by_key.items())]
    keys = sorted({k for run in runs for k in run.config} - set(IGNORED))
    values = {k: [c[0].config.get(k, MISSING) for c in configs] for k in keys}
    varying = [k for k in keys if len({_text(v) for v in values[k]}) > 1]
    # A group choice (defaults.X) sets its group's fields: show X.* only where they vary within
    # one choice (sasrec hidden=16 vs 32), not where the choice alone explains them.
    choices = {k.split(".", 1)[1]: values[k] for k in varying if k.startswith("defaults.")}
    shown = []
    for k in varying:
        choice = choices.get(k.split(".")[0])
        if choice is None:
            shown.append(k)
            continue
        pairs = {(_text(a), _text(b)) for a, b in zip(choice, values[k], strict=True)}
        if len(pairs) > len({_text(a) for a in choice}):
            shown.append(k)
    out = []
    for i, runs_ in enumerate(configs):
        seeds = [r.seed for r in runs_]
        if len(set(map(_text, seeds))) < len(seeds):
            paths = ", ".join(str(r.path) for r in runs_)
            raise GridError(
                f"runs {paths} repeat one configuration with the same seed; report one of them"
            )
        settings = {k.removeprefix("defaults."): values[k][i] for k in shown}
        out.append(Configuration(settings, sorted(runs_, key=lambda r: _order(r.seed))))
    return sorted(out, key=lambda c: [_order(v) for v in c.settings.values()])


def _sort_metric(name: str):
    """recall@K then ndcg@K (overall, then the warm/cold user and item groups), then
    coverage@K and the entropies @K, K ascending."""
    head, _, k = name.rpartition("@")
    group, _, kind = head.removeprefix("test/").rpartition("/")
    kinds = ("recall", "ndcg", "coverage", "item_entropy", "category_entropy")
    groups = ("", "warm_users", "cold_users", "warm_items", "cold_items")
    return (
        kind not in kinds[:2],
        groups.index(group) if group in groups else 3,
        kinds.index(kind) if kind in kinds else 4,
        kind,
        int(k) if k.isdigit() else 0,
    )


def metric_columns(runs: list[Run]) -> list[str]:
    """Every test metric of the runs (group sizes and random baselines left out), in order."""
    names = {
        k
        for r in runs
        for k in r.metrics
        if k.startswith("test/") and not k.endswith(("/users", "/items")) and "random_" not in k
    }
    return sorted(names, key=_sort_metric)


def summarize(configs: list[Configuration], metrics: list[str]) -> None:
    """Mean and sample standard deviation (ddof=1; NaN for one seed) over seeds."""
    for c in configs:
        for name in metrics:
            values = np.array([r.metrics[name] for r in c.runs if name in r.metrics], dtype=float)
            c.mean[name] = float(values.mean()) if len(values) else math.nan
            c.std[name] = float(values.std(ddof=1)) if len(values) > 1 else math.nan


def _per_user(c: Configuration) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """(test users, each user's PAIRED metrics averaged over the seeds), or None (with a
    warning) when a run has no per_user.npz or the seeds disagree on the test users."""
    users, values = None, {m: [] for m in PAIRED}
    for run in c.runs:
        if not (run.path / "per_user.npz").is_file():
            log.warning("%s has no per_user.npz (an older run?): no p-values for it", run.path)
            return None
        with np.load(run.path / "per_user.npz") as rows:
            if users is not None and not np.array_equal(rows["user"], users):
                log.warning("the seeds of %s have different test users: no p-values", c.label)
                return None
            users = rows["user"]
            for m in PAIRED:
                values[m].append(rows[m].astype(np.float64))
    return users, {m: np.mean(v, axis=0) for m, v in values.items()}


def paired_tests(configs: list[Configuration], baseline: int) -> None:
    """Two-sided paired t-test p-values (scipy.stats.ttest_rel over test users) against the
    baseline configuration; NaN where per-user rows are missing or the test users differ."""
    base = _per_user(configs[baseline])
    for i, c in enumerate(configs):
        ours = None if i == baseline or base is None else _per_user(c)
        if ours is not None and not np.array_equal(base[0], ours[0]):
            log.warning("%s and the baseline have different test users: no p-values", c.label)
            ours = None
        for metric in PAIRED:
            c.p[metric] = math.nan
            if ours is not None:
                with warnings.catch_warnings():  # identical per-user values: p is NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    c.p[metric] = float(stats.ttest_rel(ours[1][metric], base[1][metric]).pvalue)


def choose_baseline(configs: list[Configuration], baseline: str | None) -> int:
    """Row index of the baseline: an index, comma-separated key=value filters, or None (row 0)."""
    if baseline is None:
        return 0
    if baseline.lstrip("-").isdigit():
        row = int(baseline)
        if not 0 <= row < len(configs):
            raise GridError(f"--baseline {row} is not a row; rows are 0 to {len(configs) - 1}")
        return row
    keys = {k for c in configs for r in c.runs for k in r.config}
    wanted = {}
    for pair in baseline.split(","):
        key, eq, value = pair.strip().partition("=")
        key = key.strip()
        if not eq or key not in keys:
            close = difflib.get_close_matches(key, sorted(keys), n=3)
            raise GridError(
                f"--baseline {pair.strip()!r} is not a row index or KEY=VALUE of the runs' config"
                + (f"; did you mean {', '.join(close)}?" if close else "")
            )
        wanted[key] = value.strip()
    rows = [
        i
        for i, c in enumerate(configs)
        if all(_text(c.runs[0].config.get(k, MISSING)) == v for k, v in wanted.items())
    ]
    if len(rows) != 1:
        listing = "; ".join(f"{i}: {c.label}" for i, c in enumerate(configs))
        what = "no configuration" if not rows else f"rows {', '.join(map(str, rows))}"
        raise GridError(
            f"--baseline {baseline} matches {what}; pick one row ({listing}) by index or "
            "more key=value filters"
        )
    return rows[0]


def check_metric(runs: list[Run], metric: str) -> str:
    """The metrics.json key meant by `metric` (`ndcg@10` means `test/ndcg@10`)."""
    names = sorted({k for r in runs for k in r.metrics})
    for name in (metric, f"test/{metric}"):
        if name in names:
            return name
    close = difflib.get_close_matches(metric, names, n=4) or difflib.get_close_matches(
        f"test/{metric}", names, n=4
    )
    raise GridError(
        f"unknown metric {metric!r}; "
        + (f"close: {', '.join(close)}" if close else "e.g. test/ndcg@10 or test/recall@20")
    )


def _fmt(x: float, digits: int) -> str:
    return "" if math.isnan(x) else f"{x:.{digits}f}"


def _cells(c: Configuration, columns: list[str], baseline: int, row: int) -> list[str]:
    cells = [str(row), *(_text(v) for v in c.settings.values()), str(len(c.runs))]
    for name in columns:  # metrics with 4 decimals, timings with 1 (0 from 100 up)
        digits = 4 if name.startswith("test/") else 1 if abs(c.mean[name]) < 100 else 0
        mean, std = _fmt(c.mean[name], digits), _fmt(c.std[name], digits)
        cells.append(f"{mean} ± {std}" if std else mean)
    for metric in PAIRED:
        p = c.p.get(metric, math.nan)
        cells.append("baseline" if row == baseline else "n/a" if math.isnan(p) else f"{p:.3g}")
    return cells


def markdown_table(configs: list[Configuration], columns: list[str], baseline: int) -> str:
    """A Markdown table: row, varying keys, seeds, mean ± std per column, p-values."""
    short = {"infer/users_per_s": "users/s", "train/seconds": "train s", "run/seconds": "run s"}
    head = ["#", *configs[0].settings, "seeds"]
    head += [short.get(n, n.removeprefix("test/")) for n in columns]
    head += [f"p {m}" for m in PAIRED]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, c in enumerate(configs):
        lines.append("| " + " | ".join(_cells(c, columns, baseline, i)) + " |")
    return "\n".join(lines)


def write_csv(path: Path, configs: list[Configuration], columns: list[str]) -> None:
    """One row per configuration: varying keys, seeds, run folders, mean and std per column."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        head = ["row", *configs[0].settings, "seeds", "runs"]
        head += [f"{n}{s}" for n in columns for s in ("", " std")]
        writer.writerow(head + [f"p {m}" for m in PAIRED])
        for i, c in enumerate(configs):
            row = [i, *map(_text, c.settings.values()), len(c.runs)]
            row.append(";".join(r.path.name for r in c.runs))
            row += [v for n in columns for v in (c.mean[n], c.std[n])]
            writer.writerow(row + [c.p.get(m, math.nan) for m in PAIRED])


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric(path: Path, configs: list[Configuration], metric: str) -> None:
    """`metric` per configuration: mean with a ±std error bar and one dot per seed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(configs) + 2), 3.6), dpi=100)
    for i, c in enumerate(configs):
        seeds = [r.metrics[metric] for r in c.runs if metric in r.metrics]
        bar = ax.errorbar(i, c.mean[metric], yerr=np.nan_to_num(c.std[metric]), fmt="o", capsize=4)
        ax.scatter([i + 0.08] * len(seeds), seeds, s=10, color=bar[0].get_color(), alpha=0.5)
    ax.set_xlim(-0.5, len(configs) - 0.5)
    ax.set_xticks(range(len(configs)), [c.label.replace(", ", "\n") for c in configs], fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title("mean ± std over seeds (dots: runs)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_speed(path: Path, configs: list[Configuration], metric: str) -> None:
    """`metric` against inference users/s (log axis), ±std both ways, one point per config."""
    plt = pyplot()
    speed = TIMINGS[0]
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=100)
    for c in configs:
        x, y = c.mean[speed], c.mean[metric]
        xerr, yerr = np.nan_to_num(c.std[speed]), np.nan_to_num(c.std[metric])
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=c.label)
    ax.set_xscale("log")
    ax.set_xlabel("inference users/s (log)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(
    folders: list[str | Path],
    out: str | Path | None = None,
    metric: str = "test/ndcg@10",
    baseline: str | None = None,
) -> list[Configuration]:
    """Summarize the runs in `folders`; write report.md, report.csv and two PNG plots to `out`
    (default: the first folder) and print the main table."""
    runs = load_runs(folders)
    metric = check_metric(runs, metric)
    configs = group(runs)
    every = metric_columns(runs)
    columns = [*every, *TIMINGS]
    summarize(configs, sorted({*columns, metric}))
    row = choose_baseline(configs, baseline)
    paired_tests(configs, row)
    main = [*(n for n in MAIN if n in every), *([metric] if metric not in MAIN else []), *TIMINGS]
    out = Path(out) if out is not None else Path(folders[0])
    out.mkdir(parents=True, exist_ok=True)
    head = (
        f"{len(runs)} runs, {len(configs)} configurations; mean ± std (ddof=1) over seeds; "
        f"p: paired t-test over test users against row {row} (seed-averaged per-user values)"
    )
    table = markdown_table(configs, main, row)
    full = markdown_table(configs, columns, row)
    runs_list = "\n".join(
        f"- {i}: {c.label}: {', '.join(str(r.path) for r in c.runs)}" for i, c in enumerate(configs)
    )
    (out / "report.md").write_text(
        f"# grid report\n\n{head}\n\n{table}\n\n## Every test metric\n\n{full}\n\n"
        f"## Runs\n\n{runs_list}\n"
    )
    write_csv(out / "report.csv", configs, columns)
    plot_metric(out / "report_metric.png", configs, metric)
    plot_speed(out / "report_speed.png", configs, metric)
    print(
        f"{head}\n\n{table}\n\nwrote report.md, report.csv, report_metric.png, "
        f"report_speed.png to {out}"
    )
    return configs
