"""Wall time of the default `grid run` from an empty cache (first run included).

Writes bench/results/default_run.md. Usage: python bench/bench_default_run.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GRID_CACHE": f"{tmp}/cache"}
        cmd = [
            sys.executable,
            "-m",
            "grid",
            "run",
            "--out",
            f"{tmp}/run",
            "trainer.progress_bar=false",
        ]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        seconds = time.perf_counter() - start
        metrics = json.loads(Path(f"{tmp}/run/metrics.json").read_text())
    keys = ["test/recall@5", "test/recall@10", "test/ndcg@5", "test/ndcg@10"]
    lines = [
        "# Default `grid run` (first run, empty cache)",
        "",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "",
        f"wall time: {seconds:.0f} s ({seconds / 60:.1f} min)",
        f"inference: {metrics['infer/users_per_s']:.0f} users/s over the test set",
        "",
        "| metric | TIGER | popularity |",
        "|---|---|---|",
        *[f"| {k} | {metrics[k]:.4f} | {metrics['baseline/popularity/' + k]:.4f} |" for k in keys],
    ]
    out = ROOT / "bench" / "results" / "default_run.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
