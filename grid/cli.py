"""The `grid` command line: run, sweep, report, config show, tokenize."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from grid.errors import GridError

EPILOG = """examples:
  grid run                                   the default experiment (Beauty, RK-Means, TIGER)
  grid run tokenizer=rvq generator.beam_width=30
  grid run experiments/grid_handbook/beauty_rkmeans_tiger_constrained.yaml --out runs/handbook
  grid config show tokenizer=opq
  grid tokenize tokenizer=opq --out runs/opq
  grid sweep experiments/grid_handbook/sweep_t1_tokenizer.yaml --dry-run
  grid report runs/sweep --baseline generator.name=sasrec"""


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """The optional experiment file (first argument without '=') and the overrides."""
    if args and "=" not in args[0]:
        path = args[0]
        if not Path(path).is_file():
            raise GridError(f"experiment file {path} not found; give a YAML path or key=value")
        return path, args[1:]
    return None, args


def _default_out(cfg) -> Path:
    if "GRID_RUN_OUT" in os.environ:  # a process that DDP added: the main process's folder
        return Path(os.environ["GRID_RUN_OUT"])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.data.name}-{cfg.tokenizer.name}-{cfg.generator.name}"


def _writable(folder: Path, what: str, option: str) -> None:
    """Fail now, before any stage runs, if `folder` cannot be created or written to."""
    if folder.exists() and not folder.is_dir():
        raise GridError(f"{what} {folder} is an existing file; point {option} at a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".grid-write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise GridError(
            f"cannot write to {what} {folder} ({e.strerror}); make it writable or point "
            f"{option} at another folder"
        )


def _check_folders(cfgs, out: Path | None) -> None:
    """The output folder and every config's stage cache must be writable."""
    if out is not None:
        _writable(out, "the output folder", "--out")
    option = "GRID_CACHE" if "GRID_CACHE" in os.environ else "cache_dir"
    for root in {Path(os.environ.get("GRID_CACHE", cfg.cache_dir)) for cfg in cfgs}:
        _writable(root, "the stage cache", option)


def cmd_run(ns: argparse.Namespace) -> None:
    from grid.config import compose

    if ns.out and Path(ns.out).exists():  # no earlier result may pass for this run's
        _writable(Path(ns.out), "the output folder", "--out")
        (Path(ns.out) / "metrics.json").unlink(missing_ok=True)
    cfg = compose(*_split_args(ns.args))
    out = Path(ns.out) if ns.out else _default_out(cfg)
    _check_folders([cfg], out)
    from grid.runner import run  # torch and Lightning load only once the config is valid

    if not ns.verbose:  # Lightning sets its loggers to INFO on import
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    print(f"grid run -> {out}")
    os.environ["GRID_RUN_OUT"] = str(out)  # inherited by the processes DDP adds
    try:
        run(cfg, out)
    finally:
        os.environ.pop("GRID_RUN_OUT", None)


def cmd_sweep(ns: argparse.Namespace) -> None:
    from grid import sweep as sw

    sweep = sw.load_sweep(ns.sweep)
    out = Path(ns.out) if ns.out else sw.default_out(sweep, ns.smoke, ns.args)
    runs = sw.plan(sweep, out, ns.smoke, ns.args)
    if ns.export_wandb:
        sw.write_wandb_spec(sweep, Path(ns.export_wandb), ns.args)
        print(f"wandb sweep spec -> {ns.export_wandb} (wandb sweep {ns.export_wandb})")
        return
    print(sw.describe(sweep, runs, out))
    if ns.dry_run:
        return
    flags = {"partition": ns.partition, "time": ns.time, "gpus_per_run": ns.gpus_per_run}
    slurm = sweep.slurm | {k: v for k, v in flags.items() if v is not None}
    cluster = {"slurm": "slurm", "submitit-local": "local"}.get(ns.launcher)
    if cluster:
        sw.check_submitit(cluster)
    else:
        slots = sw.local_slots(ns.gpus, ns.per_gpu, ns.max_parallel)
    _check_folders([], out)
    if cluster:
        executor = sw.submitit_executor(cluster, out / ".submitit", slurm, f"grid-{out.name}")
    todo = [run for run in runs if run.status() != "finished"]
    sw.collect(runs, out)
    failed = []

    def done(run, error) -> None:
        print(f"{run.run_id}  {'failed: ' + error if error else 'finished'}", flush=True)
        if error:
            failed.append(run)
        sw.collect(runs, out)

    if cluster:
        sw.launch_submitit(todo, executor, done)
    else:
        sw.launch_local(todo, slots, done)
    print(f"results -> {out / 'results.csv'}")
    if failed:
        raise GridError(
            f"{len(failed)} of {len(runs)} runs failed (first: {failed[0].run_id}: "
            f"{(failed[0].folder / 'error.txt').read_text().strip()}); fix and run the sweep again"
        )


def cmd_config_show(ns: argparse.Namespace) -> None:
    from grid.config import compose, to_yaml

    print(to_yaml(compose(*_split_args(ns.args))), end="")


def cmd_tokenize(ns: argparse.Namespace) -> None:
    from grid.config import compose
    from grid.tokenize import compare, tokenize_command

    if ns.compare:
        cfgs = {Path(e).stem: compose(e, ns.args) for e in ns.compare}
    else:
        cfgs = {"": compose(*_split_args(ns.args))}
    _check_folders(cfgs.values(), Path(ns.out) if ns.out else None)
    if ns.compare:
        compare(cfgs, ns.out)
    else:
        tokenize_command(cfgs[""], ns.out)


def cmd_report(ns: argparse.Namespace) -> None:
    from grid.report import report

    if ns.remeasure and not ns.verbose:
        import grid.runner  # noqa: F401  (Lightning sets its loggers to INFO on import)

        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    report(ns.folders, ns.out, ns.metric, ns.baseline, ns.remeasure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grid",
        description="Benchmark semantic-ID generative recommenders.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every stage")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    overrides = "optional experiment YAML, then overrides: GROUP=NAME or dotted.key=VALUE"

    p = sub.add_parser(
        "run",
        help="run the pipeline and report Recall/NDCG@K",
        description="Compose the config, run data -> encoder -> tokenizer -> "
        "generator -> evaluation, print a results table and write config.yaml, "
        "metrics.json and stage outputs to --out.",
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE]", help=overrides)
    p.add_argument("--out", help="output folder (default runs/<time>-<data>-<tokenizer>-<gen>)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "sweep",
        help="run every cell of a sweep file and collect one results table",
        description="Expand a sweep file (base experiment, grid, zip, seeds) into runs of "
        "`grid run`, each in SWEEP_OUT/<run id>/; skip finished runs, resume the others, and "
        "write SWEEP_OUT/results.csv and results.jsonl as runs finish.",
    )
    p.add_argument("sweep", metavar="SWEEP", help="sweep YAML (base:, grid:, zip:, seeds: ...)")
    p.add_argument("args", nargs="*", metavar="KEY=VALUE", help="overrides for every run")
    p.add_argument("--out", help="sweep folder (default sweeps/<sweep file name>)")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    p.add_argument("--smoke", action="store_true", help="apply the file's smoke: overrides")
    p.add_argument(
        "--launcher",
        choices=("local", "slurm", "submitit-local"),
        default="local",
        help="local subprocesses, Slurm through submitit, or submitit's local "
        "executor (the slurm code path on this machine)",
    )
    p.add_argument("--gpus", type=int, help="local: GPUs to use (default all visible)")
    p.add_argument("--per-gpu", type=int, help="local: concurrent runs per GPU (default 1)")
    p.add_argument("--max-parallel", type=int, help="local: most concurrent runs (CPU default 1)")
    p.add_argument("--partition", help="slurm partition (default the file's slurm.partition)")
    p.add_argument("--time", help="slurm time limit per run: minutes or HH:MM:SS")
    p.add_argument("--gpus-per-run", type=int, help="slurm GPUs per run")
    p.add_argument("--export-wandb", metavar="FILE", help="write a wandb sweep spec and exit")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "config", help="inspect configs", description="Inspect the composed configuration."
    )
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser(
        "show",
        help="print the composed config",
        description="Print the fully composed config as YAML.",
    )
    show.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE]", help=overrides)
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser(
        "tokenize",
        help="fit a tokenizer and report SID quality",
        description="Fit and encode the configured tokenizer on the run's "
        "embeddings; print and write the tokenizer quality report.",
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE]", help=overrides)
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="CONFIG",
        help="compare several experiment YAMLs side by side",
    )
    p.add_argument("--out", help="folder for tokenizer_report.json and the SIDs")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser(
        "report",
        help="compare finished runs: mean ± std over seeds, paired tests, plots",
        description="Group finished runs (folders with metrics.json and config.yaml; a sweep "
        "folder stands for its run subfolders) into configurations that differ only in seed; "
        "print and write report.md, report.csv and PNG plots with mean ± std over seeds and "
        "paired t-test p-values over test users against a baseline row.",
    )
    p.add_argument("folders", nargs="+", metavar="SWEEP_DIR|RUN_DIR", help="runs to compare")
    p.add_argument("--out", help="folder for the report (default: the first folder given)")
    p.add_argument(
        "--metric", default="test/ndcg@10", help="metric of the plots (default test/ndcg@10)"
    )
    p.add_argument(
        "--baseline",
        help="row index or KEY=VALUE[,KEY=VALUE] of the configuration the others are tested "
        "against (default: row 0)",
    )
    p.add_argument(
        "--remeasure",
        nargs="?",
        type=int,
        const=3,
        default=0,
        metavar="ROUNDS",
        help="time every run's test inference again in this one process (models reloaded from "
        "model.ckpt, stages from the cache), runs interleaved, median of ROUNDS rounds "
        "(default 3), instead of the users/s each run recorded under its own load",
    )
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no bar for loading 90 MB
    logging.basicConfig(
        level=logging.INFO if ns.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not ns.verbose:
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        ns.func(ns)
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
