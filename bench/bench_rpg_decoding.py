"""RPG decoding speed as the catalogue grows: exact scoring of every item against graph decoding.

    python bench/bench_rpg_decoding.py                      # Beauty (12,101 items), 100k and 1M
    python bench/bench_rpg_decoding.py --sizes beauty 100000 --users 2048
Exact scoring costs items x positions additions per user; graph decoding costs about
beam x n_edges x steps x positions lookups, whatever the catalogue, unless the catalogue is small
enough (`GRAPH_LOOKUP_COST`) that it reads every item's exact-pass score instead: both ways of
scoring graph candidates are timed, and the one `recommend` picks is marked. The model is
configs/generator/rpg.yaml with random weights (speed does not depend on training) reading Beauty
test histories (item ids taken modulo the catalogue). Beauty uses its OPQ codes and item graph;
the synthetic catalogues have uniform random 32 x 256 codes and random neighbour lists of the
configured width (building the exact graph of 1M items takes hours on 2 cores:
bench/bench_rpg_graph.py). Writes bench/results/rpg_decoding.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from grid.data import leave_one_out, load_sequences, pad
from grid.generators import rpg
from grid.generators.rpg import RPG
from grid.profiling import cpu_name
from grid.sids import SemanticIDs

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("beauty", "100000", "1000000")
SYNTHETIC_CODES = (32, 256)


def catalogue(size: str) -> SemanticIDs:
    if size == "beauty":
        from bench_rpg_graph import beauty_sids

        return beauty_sids()
    positions, vocab = SYNTHETIC_CODES
    codes = np.random.default_rng(0).integers(0, vocab, (int(size), positions))
    return SemanticIDs(codes, (vocab,) * positions, ordered=False)


def measure(model: RPG, batches: list[dict]) -> float:
    """Users per second of `recommend` over the batches (after a warm-up on two of them)."""
    for batch in batches[:2]:
        model.recommend(batch, 20)
    start = time.perf_counter()
    for batch in batches:
        model.recommend(batch, 20)
    return sum(len(b["user"]) for b in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=list(SIZES))
    parser.add_argument("--users", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rpg_decoding.md")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    params = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "generator" / "rpg.yaml"))
    params = {k: v for k, v in params.items() if k not in ("name", "max_history", "seed")}
    beauty = load_sequences(ROOT / "data" / "amazon14_beauty")
    histories, _ = leave_one_out(beauty.sequences, 20).test
    rows = []
    for size in args.sizes:
        sids = catalogue(size)
        torch.manual_seed(0)
        model = RPG(sids, **{**params, "decoding": "exact"}).eval()
        with torch.no_grad():
            model.codebooks.normal_()  # trained-like: far from the near-uniform init
        batches = []
        for start in range(0, args.users, args.batch):
            h = [x % sids.num_items for x in histories[start : start + args.batch]]
            batches.append(
                {
                    "user": torch.arange(start, start + len(h)),
                    "history": torch.as_tensor(pad(h)),
                    "length": torch.tensor([len(x) for x in h]),
                }
            )
        with torch.no_grad():
            model._eval_start()  # the code tables an evaluation caches
            exact = measure(model, batches)
            model.decoding = "graph"
            if size == "beauty":
                model.build_graph()
            else:  # random neighbour lists of the configured width, each item first in its own
                N, E = sids.num_items, model.n_edges
                graph = torch.randint(0, N, (N, E), generator=torch.Generator().manual_seed(0))
                graph[:, 0] = torch.arange(N)
                model._graph = graph.int()
            picked = "item scores" if model._graph_reads_item_scores else "lookups"
            rule, speeds = rpg.GRAPH_LOOKUP_COST, {}
            for way, cost in (("item scores", float("inf")), ("lookups", 0)):
                rpg.GRAPH_LOOKUP_COST = cost
                speeds[way] = measure(model, batches)
            rpg.GRAPH_LOOKUP_COST = rule
        rows.append((sids.num_items, sids.length, exact, speeds, picked))
        print(rows[-1], flush=True)
    lines = [
        "# RPG decoding speed against catalogue size (`bench/bench_rpg_decoding.py`)",
        "",
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; 1-min load average {load:.1f} at the start. "
        f"configs/generator/rpg.yaml (hidden {params['hidden']}, beam {params['beam_width']}, "
        f"{params['n_edges']} edges, {params['steps']} steps) with random weights, "
        f"{args.users:,} Beauty test histories, batches of {args.batch}; graph decoding of the "
        "synthetic catalogues walks random neighbour lists.",
        "",
        "Graph decoding scores its candidates by reading every item's exact-pass score (item "
        "scores) or by looking up each candidate's codes (lookups); * marks the way `recommend` "
        f"picks (item scores up to GRAPH_LOOKUP_COST = {rpg.GRAPH_LOOKUP_COST} items per "
        "candidate a walk scores).",
        "",
        "| items | positions | exact users/s | graph, item scores | graph, lookups | "
        "graph / exact |",
        "|---|---|---|---|---|---|",
        *(
            f"| {n:,} | {m} | {e:,.0f} | "
            + " | ".join(f"{g[w]:,.0f}{' *' if w == p else ''}" for w in g)
            + f" | {g[p] / e:.2f} |"
            for n, m, e, g, p in rows
        ),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
