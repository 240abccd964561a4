"""The `grid` command line: run, sweep, reproduce, report, recommend, config show, tokenize,
data fetch."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

from grid.errors import GridError, check_writable

EPILOG = """examples:
  grid run                                   the default experiment (Beauty, RK-Means, TIGER)
  grid run tokenizer=rvq generator.beam_width=30
  grid run experiments/grid_handbook/beauty_rkmeans_tiger_constrained.yaml --out runs/handbook
  grid config show tokenizer=opq
  grid tokenize tokenizer=opq --out runs/opq
  grid tokenize --compare rkmeans rvq opq
  grid data fetch beauty                     real item text (then: grid run data.text=metadata)
  grid sweep experiments/grid_handbook/sweep_t1_tokenizer.yaml --dry-run
  grid report runs/sweep --baseline generator.name=sasrec
  grid recommend runs/beauty --user A1YJEY40YUW4SE
  grid recommend runs/beauty --split test"""


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


def _check_folders(cfgs, out: Path | None) -> None:
    """The output folder and every config's stage cache must be writable."""
    if out is not None:
        check_writable(out, "the output folder", "--out")
    option = "GRID_CACHE" if "GRID_CACHE" in os.environ else "cache_dir"
    for root in {Path(os.environ.get("GRID_CACHE", cfg.cache_dir)) for cfg in cfgs}:
        check_writable(root, "the stage cache", option)


def cmd_run(ns: argparse.Namespace) -> None:
    from grid.config import compose
    from grid.runlock import run_lock

    cfg = compose(*_split_args(ns.args))  # bad input leaves an earlier run in --out untouched
    out = Path(ns.out) if ns.out else _default_out(cfg)
    _check_folders([cfg], out)
    from grid.runner import main_process, run  # torch and Lightning load once the config is valid

    if not ns.verbose:  # Lightning sets its loggers to INFO on import
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    print(f"grid run -> {out}")
    os.environ["GRID_RUN_OUT"] = str(out)  # inherited by the processes DDP adds
    try:  # the processes DDP adds write nothing: the main one holds the lock for them
        with run_lock(out) if main_process() else nullcontext():
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
            failed.append((run, error))
        sw.collect(runs, out)

    if cluster:
        sw.launch_submitit(todo, executor, done)
    else:
        sw.launch_local(todo, slots, done)
    print(f"results -> {out / 'results.csv'}")
    if failed:
        raise GridError(
            f"{len(failed)} of {len(runs)} runs failed (first: {failed[0][0].run_id}: "
            f"{failed[0][1]}); fix and run the sweep again"
        )


def cmd_reproduce(ns: argparse.Namespace) -> None:
    from grid import reproduce as rp

    results = Path(ns.results)
    if ns.table:
        print(rp.table(ns.sweep, results))
        return
    if ns.minutes <= 0:
        raise GridError(f"--minutes {ns.minutes} must be > 0: the time the rows may take")
    out = Path(ns.out) if ns.out else Path("sweeps") / Path(ns.sweep).stem
    archive = Path(ns.archive) if ns.archive else None
    rp.reproduce(ns.sweep, ns.minutes, results, out, ns.args, archive, ns.dry_run, ns.smoke)
    print(f"results -> {results}")


def cmd_config_show(ns: argparse.Namespace) -> None:
    from grid.config import compose, to_yaml

    print(to_yaml(compose(*_split_args(ns.args))), end="")


def _compare_configs(entries: list[str], args: list[str]) -> dict:
    """`--compare` entries by label: experiment files (with the overrides) or tokenizer names
    (the optional experiment file with the overrides and `tokenizer=NAME`)."""
    from grid.config import available, compose

    experiment, overrides = _split_args(args)
    names, cfgs = available("tokenizer"), {}
    for entry in entries:
        if Path(entry).is_file():
            if experiment:
                raise GridError(
                    f"--compare {entry} is an experiment file, and so is {experiment}; give "
                    f"experiment files only after --compare"
                )
            label, cfg = Path(entry).stem, compose(entry, overrides)
        elif entry in names:
            label, cfg = entry, compose(experiment, [*overrides, f"tokenizer={entry}"])
        else:
            raise GridError(
                f"--compare {entry!r} is neither an experiment file nor a tokenizer; give a YAML "
                f"path or one of {', '.join(names)}"
            )
        if label in cfgs:
            raise GridError(f"--compare names {label!r} twice; give each tokenizer once")
        cfgs[label] = cfg
    return cfgs


def cmd_tokenize(ns: argparse.Namespace) -> None:
    from grid.config import compose
    from grid.tokenize import compare, tokenize_command

    if ns.compare:
        cfgs = _compare_configs(ns.compare, ns.args)
    else:
        cfgs = {"": compose(*_split_args(ns.args))}
    first = next(iter(cfgs.values()))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    what = "compare" if ns.compare else first.tokenizer.name
    out = Path(ns.out or Path("runs") / f"{stamp}-{first.data.name}-tokenize-{what}")
    _check_folders(cfgs.values(), out)
    if ns.compare:
        compare(cfgs, out)
    else:
        tokenize_command(cfgs[""], out)


def cmd_data_fetch(ns: argparse.Namespace) -> None:
    from grid.config import compose
    from grid.metadata import describe, fetch

    cfg = compose(overrides=[f"data={ns.name}", *ns.args])
    print(describe(fetch(cfg.data, ns.name, url=ns.url, source=ns.source), ns.name))


def cmd_report(ns: argparse.Namespace) -> None:
    from grid.report import report

    if ns.remeasure and not ns.verbose:
        import grid.runner  # noqa: F401  (Lightning sets its loggers to INFO on import)

        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    report(ns.folders, ns.out, ns.metric, ns.baseline, ns.remeasure)


def _read_histories(path: str) -> tuple[list[str], list[str | None]]:
    """A histories file: one history of item ids per line; text before a tab is its label
    (so a sequences.tsv works as is); blank lines are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GridError(f"cannot read the histories file {path} ({e}); give a UTF-8 text file")
    histories, labels = [], []
    for line in lines:
        if line.strip():
            label, _, items = line.rpartition("\t")
            histories.append(items)
            labels.append(label or None)
    if not histories:
        raise GridError(f"the histories file {path} holds no history; write one per line")
    return histories, labels


INVALID = "(invalid SID)"  # shown for a decoded SID that is no item's


def _print_records(records: list[dict], run, k: int) -> None:
    """Each history, then its ranked items: rank, item id, score and text."""
    print(
        f"{run.cfg.generator.name} on {run.dataset.name} ({run.dataset.num_items} items); "
        f"score: {run.score_name}"
    )
    for record in records:
        shown = " ".join(record["history"][-8:])
        more = len(record["history"]) - 8
        print(
            f"\n{'user ' + record['user'] + ', ' if record['user'] else ''}history of "
            f"{len(record['history'])} item{'s' * (len(record['history']) > 1)}: "
            f"{'... ' if more > 0 else ''}{shown}"
        )
        width = max([len(i["item"] or INVALID) for i in record["items"]] + [4])
        print(f"{'rank':>5}  {'item':{width}}  {'score':>10}  text")
        for entry in record["items"]:
            item = entry["item"] or INVALID
            target = "  <- held-out target" if item == record["target"] else ""
            text = entry["title"] or ""
            text = text if len(text) <= 60 else text[:57] + "..."
            print(f"{entry['rank']:>5}  {item:{width}}  {entry['score']:>10.4f}  {text}{target}")
        if len(record["items"]) < k:
            print(f"  (the generator found {len(record['items'])} of the {k} items asked for)")
        if record["target"] and record["target"] not in [i["item"] for i in record["items"]]:
            print(f"  held-out target {record['target']} is not in the top {k}")


def cmd_recommend(ns: argparse.Namespace) -> None:
    import json

    asked = ns.history or ns.histories or ns.user
    if ns.split and (asked or ns.k is not None):
        raise GridError(
            "--split writes every user's top-20 list as the run evaluated it: give it without "
            "histories, users or -k"
        )
    if ns.out and not ns.split:
        raise GridError("--out names the file of --split; print recommendations with --json")
    if ns.next and not ns.user:
        raise GridError("--next ranks past a dataset user's sequence: give --user ID with it")
    ns.k = 10 if ns.k is None else ns.k
    if not (ns.split or asked):
        raise GridError(
            "say what to rank for: --history IDS, --histories FILE, --user ID or --split"
        )
    from grid.recommend import list_metrics, load_run

    if not ns.verbose:  # Lightning sets its loggers to INFO on import
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    histories, labels = list(ns.history or []), [None] * len(ns.history or [])
    if ns.histories:
        more, more_labels = _read_histories(ns.histories)
        histories, labels = histories + more, labels + more_labels
    run = load_run(ns.run, ns.device)
    if ns.split:
        path = run.write_lists(ns.split, ns.out)
        recomputed = list_metrics(path)
        stored = {k: run.metrics.get(f"{ns.split}/{k}", float("nan")) for k in recomputed}
        keys = [f"{m}@{k}" for m in ("recall", "ndcg") for k in (10, 20)]
        print(f"{ns.split} users' top-20 lists -> {path}")
        for what, values in (("recomputed from the lists", recomputed), ("metrics.json", stored)):
            print(f"{what:>26}: " + ", ".join(f"{k} {values[k]:.4f}" for k in keys))
        return
    records = []
    if histories:
        records += run.recommend(histories, ns.k, ns.skip_unknown, labels)
    if ns.user:
        records += run.recommend_users(ns.user, ns.k, ns.next)
    if ns.json:
        for record in records:
            print(json.dumps(record))
    else:
        _print_records(records, run, ns.k)


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
        "reproduce",
        help="train a table's rows to early stopping within a time budget",
        description="Run the rows of a sweep file with a reproduce: section one after another, "
        "skipping those the results file holds for this device kind (gpu or cpu) and those "
        "whose projected time (operator counts x epochs) does not fit --minutes; append each "
        "ended row (metrics, device, versions, epochs, speed) to the results file.",
    )
    p.add_argument("sweep", metavar="SWEEP", help="sweep YAML with a reproduce: section")
    p.add_argument("args", nargs="*", metavar="KEY=VALUE", help="overrides for every row")
    p.add_argument("--minutes", type=float, default=9.0, help="time the rows may take")
    p.add_argument(
        "--results",
        default="bench/results/reproduction.jsonl",
        help="results file, one JSON line per ended row (default %(default)s)",
    )
    p.add_argument("--out", help="folder of the run folders (default sweeps/<file name>)")
    p.add_argument("--archive", metavar="FILE", help="also write a tar.gz of the runs' small files")
    p.add_argument("--dry-run", action="store_true", help="print what would start and exit")
    p.add_argument("--table", action="store_true", help="print the results table and exit")
    p.add_argument(
        "--smoke", action="store_true", help="the file's smoke: overrides, as table NAME-smoke"
    )
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "recommend",
        help="rank items with a finished run: for histories, users, or every test user",
        description="Load a finished run (RUN_DIR holds config.yaml, metrics.json, model.ckpt, "
        "sids.npz) and print the top-K items, with the generator's score and the item's text, "
        "for histories of item ids or for dataset users; or write every test (or validation) "
        "user's ranked list beside the held-out target, exactly as the run evaluated it.",
    )
    p.add_argument("run", metavar="RUN_DIR", help="the --out folder of a finished grid run")
    p.add_argument(
        "--history",
        action="append",
        metavar="IDS",
        help='a history of item ids, oldest first: "B004 B007" (repeatable)',
    )
    p.add_argument(
        "--histories", metavar="FILE", help="a file of histories, one a line (optional LABEL<TAB>)"
    )
    p.add_argument(
        "--user",
        action="append",
        metavar="ID",
        help="a dataset user: its test history, held-out item shown (repeatable)",
    )
    p.add_argument("--next", action="store_true", help="--user: rank after the whole sequence")
    p.add_argument("-k", type=int, help="items per list (default 10)")
    p.add_argument("--json", action="store_true", help="one JSON object per history")
    p.add_argument(
        "--skip-unknown",
        action="store_true",
        help="leave unknown item ids out of histories (default: refuse them)",
    )
    p.add_argument(
        "--split",
        choices=("test", "valid"),
        help="write every user's top-20 list and held-out target, as the run evaluated them",
    )
    p.add_argument("--out", help="--split: the file (default RUN_DIR/ranked_<split>.jsonl)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the GPU if there is one)")
    p.set_defaults(func=cmd_recommend)

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
        "embeddings; print and write the tokenizer quality report, a picture of its code usage "
        "per level and collision-group sizes (tokenizer_report.png) and the SIDs.",
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE]", help=overrides)
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="TOKENIZER|CONFIG",
        help="compare tokenizers (names like rkmeans opq, or experiment YAMLs) side by side",
    )
    p.add_argument(
        "--out", help="folder for the report, its PNG and the SIDs (default runs/<time>-...)"
    )
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("data", help="fetch dataset files", description="Fetch files for a dataset.")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    fetch = dsub.add_parser(
        "fetch",
        help="real item text for an Amazon 2014 dataset (then run with data.text=metadata)",
        description="Download the dataset's public metadata (data.metadata_url), join it to the "
        "catalogue by ASIN and write the items with title, brand, categories, price and "
        "description to the user's data folder (GRID_DATA, default ~/.local/share/grid); "
        "runs read it with data.text=metadata.",
    )
    fetch.add_argument("name", metavar="NAME", help="data config: beauty, sports or toys")
    fetch.add_argument(
        "args", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. data.path=FOLDER"
    )
    fetch.add_argument("--url", help="download from this URL instead of data.metadata_url")
    fetch.add_argument(
        "--from",
        dest="source",
        metavar="FILE",
        help="read a metadata file downloaded by hand (meta_<Category>.json[.gz]) instead",
    )
    fetch.set_defaults(func=cmd_data_fetch)

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
