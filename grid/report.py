"""`grid report`: compare finished runs as configurations x seeds, with paired tests and plots.

A configuration is a resolved config up to `seed` and the fields that only choose where and how
a run logs (IGNORED). Its seeds give a mean and a sample standard deviation (ddof=1) of every
test metric; each configuration is tested against a baseline configuration with a paired t-test
over test users on the per-user values of per_user.npz, each user's value averaged over the
configuration's seeds first. A leaderboard ranks the configurations by the metric, as
`generator x tokenizer`, and marks the Pareto front of the metric against inference speed and
against training time.
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

from grid.errors import GridError, check_writable

log = logging.getLogger(__name__)

# Not part of a configuration: the seed (averaged over) and fields that change no result.
IGNORED = ("seed", "cache_dir", "trainer.logger", "trainer.wandb_project", "trainer.progress_bar")
PAIRED = ("ndcg@10", "recall@10")  # per-user metrics of the significance test
# run/seconds counts only the stages a run computed; train/seconds is its model's training time
# even when the model came from the cache.
TIMINGS = ("infer/users_per_s", "train/seconds", "run/seconds")
MAIN = ("test/recall@10", "test/ndcg@10", "test/recall@20", "test/ndcg@20", "test/coverage@10")
# Peak memory of a run: GPU tensors where the runs used a GPU, else the process's resident set.
PEAK_MEMORY = ("run/peak_gpu_mb", "run/peak_rss_mb")
LEADERBOARD = ("test/recall@10", "test/ndcg@10", "infer/users_per_s", "train/seconds")
SHORT = {
    "infer/users_per_s": "users/s",
    "train/seconds": "train s",
    "run/seconds": "run s",
    "run/peak_gpu_mb": "peak GPU MB",
    "run/peak_rss_mb": "peak RSS MB",
}
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
        metrics = _read_metrics(path / "metrics.json")
        runs.append(Run(path, config, {k: v for k, v in metrics.items() if _number(v)}))
    return runs


def _read_metrics(path: Path) -> dict:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GridError(f"cannot read {path} ({e}); run that run again or leave its folder out")
    if not isinstance(metrics, dict):
        raise GridError(
            f"{path} holds a {type(metrics).__name__}, not a mapping of metric names to values; "
            f"run that run again or leave its folder out"
        )
    return metrics


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
    """Mean and sample standard deviation (ddof=1; NaN for one seed) over seeds; NaN, with a
    warning, where only some of a row's seeds have the metric (the row counts them all)."""
    for c in configs:
        partial = []
        for name in metrics:
            values = [r.metrics[name] for r in c.runs if name in r.metrics]
            if 0 < len(values) < len(c.runs):
                partial, values = [*partial, name], []
            values = np.array(values, dtype=float)
            c.mean[name] = float(values.mean()) if len(values) else math.nan
            c.std[name] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        if partial:
            log.warning(
                "%s: %s missing from some of its %d runs; left empty rather than averaged over "
                "fewer seeds",
                c.label,
                ", ".join(partial),
                len(c.runs),
            )


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


def _mean_std(c: Configuration, name: str) -> str:
    """`mean ± std`: metrics with 4 decimals, timings with 1 (0 from 100 up); one seed: no std."""
    digits = 4 if name.startswith("test/") else 1 if abs(c.mean[name]) < 100 else 0
    mean, std = _fmt(c.mean[name], digits), _fmt(c.std[name], digits)
    return f"{mean} ± {std}" if std else mean


def _cells(c: Configuration, columns: list[str], baseline: int, row: int) -> list[str]:
    cells = [str(row), *(_text(v) for v in c.settings.values()), str(len(c.runs))]
    cells += [_mean_std(c, name) for name in columns]
    for metric in PAIRED:
        p = c.p.get(metric, math.nan)
        cells.append("baseline" if row == baseline else "n/a" if math.isnan(p) else f"{p:.3g}")
    return cells


def markdown_table(configs: list[Configuration], columns: list[str], baseline: int) -> str:
    """A Markdown table: row, varying keys, seeds, mean ± std per column, p-values."""
    head = ["#", *configs[0].settings, "seeds"]
    head += [SHORT.get(n, n.removeprefix("test/")) for n in columns]
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


def model_label(c: Configuration) -> str:
    """`generator x tokenizer` (the tokenizer only where the generator read SIDs), then the
    other varying settings except the dataset."""
    run = c.runs[0]
    name = _text(run.config.get("defaults.generator", run.config.get("generator.name")))
    if (run.path / "sids.npz").is_file():  # the runner keeps the SIDs a generator read
        name += f" x {_text(run.config.get('defaults.tokenizer'))}"
    rest = {
        k: v
        for k, v in c.settings.items()
        if k not in ("generator", "tokenizer") and not _is_dataset(k) and v is not MISSING
    }
    return ", ".join([name, *(f"{k}={_text(v)}" for k, v in rest.items())])


def _is_dataset(key: str) -> bool:
    return key == "data" or key.startswith("data.")


def _dataset(c: Configuration) -> str:
    """The configuration's dataset settings where they vary between configurations, else ''."""
    return ", ".join(_text(v) for k, v in c.settings.items() if _is_dataset(k))


def pareto_front(cost: list[float], quality: list[float]) -> list[bool]:
    """Whether each point is on the Pareto front: no other point has lower or equal cost and
    higher or equal quality, one of them strictly. Points with a NaN are never on it."""
    points = list(zip(cost, quality, strict=True))
    valid = [not (math.isnan(c) or math.isnan(q)) for c, q in points]
    front = []
    for i, (c, q) in enumerate(points):
        beaten = any(
            valid[j] and j != i and c2 <= c and q2 >= q and (c2 < c or q2 > q)
            for j, (c2, q2) in enumerate(points)
        )
        front.append(valid[i] and not beaten)
    return front


# x axes of the trade-off plots: metric key, axis label, whether more is better
SPEED = ("infer/users_per_s", "inference users/s (log)", True)
TRAINING = ("train/seconds", "training seconds (log)", False)


def fronts(configs: list[Configuration], metric: str, axis: tuple) -> list[bool]:
    """The Pareto front of `metric` against an x axis, within each dataset."""
    key, _, more_is_better = axis
    on = [False] * len(configs)
    for dataset in dict.fromkeys(map(_dataset, configs)):
        rows = [i for i, c in enumerate(configs) if _dataset(c) == dataset]
        cost = [configs[i].mean.get(key, math.nan) * (-1 if more_is_better else 1) for i in rows]
        quality = [configs[i].mean[metric] for i in rows]
        for i, front in zip(rows, pareto_front(cost, quality), strict=True):
            on[i] = front
    return on


def budget(runs: list[Run]) -> str:
    """The runs' training budget for titles, e.g. `2-epoch CPU budget, not converged` when some
    model's best validation came in its last epoch (it was still improving)."""
    epochs = "/".join(sorted({_text(r.config.get("trainer.max_epochs")) for r in runs}))
    steps = {r.config.get("trainer.max_steps", -1) for r in runs}
    size = f"{epochs}-epoch" if -1 in steps else f"{'/'.join(map(str, sorted(steps)))}-step"
    trainer = "/".join(sorted({_text(r.config.get("defaults.trainer")).upper() for r in runs}))
    text = f"{size} {trainer} budget"
    selected = [r for r in runs if (r.path / "selection.json").is_file()]
    last = [
        r
        for r in selected
        if json.loads((r.path / "selection.json").read_text()).get("epoch", -1)
        >= r.config.get("trainer.max_epochs", math.inf) - 1
    ]
    if last:
        text += f", not converged ({len(last)} of {len(selected)} models best in the last epoch)"
    return text


def _title(runs: list[Run]) -> str:
    datasets = ", ".join(sorted({_text(r.config.get("defaults.data")) for r in runs}))
    return f"{datasets}: {budget(runs)}"


def leaderboard_table(configs: list[Configuration], metric: str) -> str:
    """Configurations ranked by mean `metric` within each dataset: Recall/NDCG@10, users/s,
    training seconds, peak memory, coverage@10 and the Pareto fronts they are on."""
    peak = [n for n in PEAK_MEMORY if any(n in c.mean for c in configs)][:1]
    columns = [*LEADERBOARD, *peak, "test/coverage@10"]
    columns += [metric] if metric not in columns else []
    speed, training = fronts(configs, metric, SPEED), fronts(configs, metric, TRAINING)
    datasets = any(_dataset(c) for c in configs)
    head = ["rank", *(["data"] if datasets else []), "generator x tokenizer", "seeds"]
    head += [SHORT.get(n, n.removeprefix("test/")) for n in columns] + ["Pareto front"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(
        range(len(configs)),
        key=lambda i: (_dataset(configs[i]), -np.nan_to_num(configs[i].mean[metric], nan=-1)),
    )
    rank, previous = 0, None
    for i in order:
        c = configs[i]
        rank = 1 if _dataset(c) != previous else rank + 1
        previous = _dataset(c)
        pareto = [n for n, on in (("speed", speed[i]), ("training", training[i])) if on]
        cells = [str(rank), *([_dataset(c)] if datasets else []), model_label(c), str(len(c.runs))]
        cells += [_mean_std(c, n) if n in c.mean else "" for n in columns]
        lines.append("| " + " | ".join([*cells, ", ".join(pareto)]) + " |")
    return "\n".join(lines)


def plot_tradeoff(
    path: Path, configs: list[Configuration], metric: str, axis: tuple, title: str
) -> None:
    """`metric` against an x axis (log), ±std both ways, each point labelled `generator x
    tokenizer`, the Pareto front of each dataset drawn as a dashed line through ringed points.
    Configurations without the x value (popularity has no training time) are left out."""
    plt = pyplot()
    key, xlabel, more_is_better = axis
    shown = [i for i, c in enumerate(configs) if not math.isnan(c.mean.get(key, math.nan))]
    front = fronts(configs, metric, axis)
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=110)
    for i in shown:
        c = configs[i]
        x, y = c.mean[key], c.mean[metric]
        xerr, yerr = np.nan_to_num(c.std[key]), np.nan_to_num(c.std[metric])
        bar = ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=3, ms=5)
        if front[i]:
            ax.plot(x, y, "o", ms=12, mfc="none", mec=bar[0].get_color(), mew=1.5)
        label = model_label(c) + (f" ({_dataset(c)})" if _dataset(c) else "")
        ax.annotate(label, (x, y), xytext=(8, 0), textcoords="offset points", va="center",
                    fontsize=7)  # fmt: skip
    for dataset in dict.fromkeys(_dataset(configs[i]) for i in shown):
        points = sorted(
            (configs[i].mean[key], configs[i].mean[metric])
            for i in shown
            if front[i] and _dataset(configs[i]) == dataset
        )
        if len(points) > 1:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, "--", color="0.5", lw=1, zorder=0)
    left = [model_label(c) for i, c in enumerate(configs) if i not in shown]
    ax.set_xscale("log")
    ax.set_xlabel(xlabel + (f"; not shown: {', '.join(left)}" if left else ""))
    ax.set_ylabel(metric)
    better = "right" if more_is_better else "left"
    ax.set_title(f"{title}\nringed, dashed: Pareto front (up and to the {better} is better)",
                 fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0.15, y=0.1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def remeasure_speed(runs: list[Run], rounds: int) -> None:
    """Replace each run's recorded inference speed by one timed in this process (runs back to
    back, median of `rounds` interleaved rounds), so that no two were timed under other loads."""
    if rounds < 1:
        raise GridError(f"--remeasure {rounds}: give 1 or more rounds")
    from grid.runner import measure_inference  # torch and Lightning only when asked for

    for run, tested in zip(runs, measure_inference([r.path for r in runs], rounds), strict=True):
        for name in ("infer/users_per_s", "infer/seconds"):
            run.metrics[name] = tested[name]


def report(
    folders: list[str | Path],
    out: str | Path | None = None,
    metric: str = "test/ndcg@10",
    baseline: str | None = None,
    remeasure: int = 0,
) -> list[Configuration]:
    """Summarize the runs in `folders`; write report.md, leaderboard.md, report.csv and three PNG
    plots to `out` (default: the first folder) and print the main table and the leaderboard.
    `remeasure` > 0 times every run's test inference again in this process, in that many rounds."""
    runs = load_runs(folders)
    metric = check_metric(runs, metric)
    if remeasure:
        remeasure_speed(runs, remeasure)
    configs = group(runs)
    every = metric_columns(runs)
    columns = [*every, *TIMINGS]
    summarize(
        configs,
        sorted({*columns, metric, *(n for r in runs for n in PEAK_MEMORY if n in r.metrics)}),
    )
    row = choose_baseline(configs, baseline)
    paired_tests(configs, row)
    main = [*(n for n in MAIN if n in every), *([metric] if metric not in MAIN else []), *TIMINGS]
    out = Path(out) if out is not None else Path(folders[0])
    check_writable(out, "the report folder", "--out")
    head = (
        f"{len(runs)} runs, {len(configs)} configurations; mean ± std (ddof=1) over seeds; "
        f"p: paired t-test over test users against row {row} (seed-averaged per-user values)"
    )
    speed = (
        f"inference users/s timed back to back in this process (median of {remeasure} rounds)"
        if remeasure
        else "inference users/s as each run timed it (under its own load; --remeasure times "
        "them all in one process)"
    )
    title = _title(runs)
    table = markdown_table(configs, main, row)
    full = markdown_table(configs, columns, row)
    board = (
        f"{title}. Ranked by mean {metric}; {speed}; train s: training time of the run that "
        "trained the model; peak memory of the run's process; Pareto front: of "
        f"{metric} against users/s (speed) and against training time (training).\n\n"
        f"{leaderboard_table(configs, metric)}"
    )
    runs_list = "\n".join(
        f"- {i}: {c.label}: {', '.join(str(r.path) for r in c.runs)}" for i, c in enumerate(configs)
    )
    (out / "report.md").write_text(
        f"# grid report\n\n{head}\n\n{table}\n\n## Leaderboard\n\n{board}\n\n"
        f"## Every test metric\n\n{full}\n\n## Runs\n\n{runs_list}\n"
    )
    (out / "leaderboard.md").write_text(f"# Leaderboard\n\n{board}\n")
    write_csv(out / "report.csv", configs, columns)
    plot_metric(out / "report_metric.png", configs, metric)
    plot_tradeoff(out / "report_speed.png", configs, metric, SPEED, title)
    plot_tradeoff(out / "report_training.png", configs, metric, TRAINING, title)
    print(
        f"{head}\n\n{table}\n\n{board}\n\nwrote report.md, leaderboard.md, report.csv, "
        f"report_metric.png, report_speed.png, report_training.png to {out}"
    )
    return configs
