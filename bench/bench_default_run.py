"""Wall time and test metrics of the default `grid run` from an empty cache (first run included).

With `--before REV`, the same command also runs on a git worktree of REV, one after the other in
this invocation, so the two rows compare code under the same epoch budget on the same machine.

Writes bench/results/default_run.md. Usage: python bench/bench_default_run.py [--before REV]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grid.profiling import cpu_name

ROOT = Path(__file__).resolve().parents[1]
SPEED = "train/samples_per_s"  # absent from older metrics.json
KEYS = ["test/recall@5", "test/recall@10", "test/ndcg@5", "test/ndcg@10"]


def default_run(checkout: Path, tmp: str) -> dict:
    """Run `grid run` (the checkout's own package: `python -m` puts the cwd first on sys.path)."""
    env = {**os.environ, "GRID_CACHE": f"{tmp}/cache"}
    cmd = [sys.executable, "-m", "grid", "run", "--out", f"{tmp}/run", "trainer.progress_bar=false"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=checkout)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **json.loads(Path(f"{tmp}/run/metrics.json").read_text())}


def revision(checkout: Path) -> str:
    return subprocess.run(
        ["git", "log", "-1", "--format=%h %s"], cwd=checkout, capture_output=True, text=True
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="git revision to run first, for a before/after table")
    args = parser.parse_args()
    rows, load = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        checkouts = [("now", ROOT)]
        if args.before:
            tree = Path(tmp) / "before"
            subprocess.run(
                ["git", "worktree", "add", "-q", "--detach", str(tree), args.before],
                cwd=ROOT,
                check=True,
            )
            checkouts.insert(0, ("before", tree))
        try:
            for name, checkout in checkouts:
                run = default_run(checkout, f"{tmp}/{name}")
                rows.append((name, revision(checkout), run))
                print(name, {k: run[k] for k in ["seconds", *KEYS]}, flush=True)
        finally:
            if args.before:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    lines = [
        "# Default `grid run` (first run, empty cache)",
        "",
        f"machine: {cpu_name()}, {os.cpu_count()} cores; 1-min "
        f"load average {load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end. Each row "
        "is `python -m grid run` in that revision's checkout, one after the other in one "
        "invocation of bench/bench_default_run.py; same config and epoch budget.",
        "",
        "| code | wall time | train samples/s | infer users/s | "
        + " | ".join(k.removeprefix("test/") for k in KEYS)
        + " |",
        "|---|---|---|---|" + "---|" * len(KEYS),
        *(
            f"| {name}: {rev} | {r['seconds']:.0f} s | {r.get(SPEED, float('nan')):.0f}"
            f" | {r['infer/users_per_s']:.0f} | " + " | ".join(f"{r[k]:.4f}" for k in KEYS) + " |"
            for name, rev, r in rows
        ),
        "| popularity | | | | "
        + " | ".join(f"{rows[-1][2]['baseline/popularity/' + k]:.4f}" for k in KEYS)
        + " |",
    ]
    out = ROOT / "bench" / "results" / "default_run.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
