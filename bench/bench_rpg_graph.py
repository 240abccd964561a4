"""RPG item graph: build time and peak memory for Beauty and for 100k / 1M synthetic items.

    python bench/bench_rpg_graph.py                  # Beauty (12,101 items), 100k and 1M
    python bench/bench_rpg_graph.py --sizes beauty   # only some sizes (beauty, or a number)
    python bench/bench_rpg_graph.py --device cuda    # build on the GPU (peak GPU memory too)
Each size runs in a fresh process (peak RSS = ru_maxrss). Writes bench/results/rpg_graph.md.
The build is exact, O(items^2 x positions): on 2 CPU cores 1M items takes hours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grid.generators.rpg import GRAPH_BLOCK_ITEMS, GRAPH_CHUNK_BYTES, graph_block, item_graph  # noqa: E402

SIZES = ("beauty", "100000", "1000000")
HIDDEN, N_EDGES = 448, 100  # configs/generator/rpg.yaml
SYNTHETIC_CODES = (32, 256)  # OPQ 32 x 256, as the paper uses on Amazon


def beauty_sids():
    """Beauty's OPQ SIDs under configs/tokenizer/opq.yaml (MiniLM embeddings, dedup digit)."""
    from grid.cache import StageCache
    from grid.data import leave_one_out, load_sequences
    from grid.pipeline import embed, tokenize

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dataset = load_sequences(ROOT / "data" / "amazon14_beauty")
    split = leave_one_out(dataset.sequences, max_history=20)
    cache = StageCache(os.environ.get("GRID_CACHE", ROOT / ".cache" / "grid"))
    X, key = embed(dataset, split, OmegaConf.load(ROOT / "configs/encoder/minilm.yaml"), cache)
    cfg = OmegaConf.load(ROOT / "configs" / "tokenizer" / "opq.yaml")
    return tokenize(X, key, cfg, cache)[0]


def child(size: str, device: str) -> None:
    """Build one graph in this process and print its measurements as JSON."""
    if size == "beauty":
        codes = beauty_sids().codes
    else:
        positions, vocab = SYNTHETIC_CODES
        codes = np.random.default_rng(0).integers(0, vocab, (int(size), positions))
    N, m = codes.shape
    V = int(codes.max()) + 1
    # the trained model's tensors: code embeddings [m, V, d] and flat rows p * V + code
    codebooks = torch.randn(m, V, HIDDEN, generator=torch.Generator().manual_seed(0))
    item_index = torch.as_tensor(codes) + torch.arange(m) * V
    del codes
    codebooks, item_index = codebooks.to(device), item_index.to(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cuda = device.startswith("cuda")
    start = time.perf_counter()
    graph = item_graph(codebooks, item_index, N_EDGES)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        json.dumps(
            {
                "items": N,
                "positions": m,
                "block": graph_block(N),
                "seconds": seconds,
                "graph_mib": graph.numel() * graph.element_size() / 2**20,
                "rss_before_gib": rss_before,
                "peak_rss_gib": peak,
                "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), help="beauty and/or item counts")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "rpg_graph.md"))
    args = parser.parse_args()
    if args.child:
        child(args.child, args.device)
        return
    load = os.getloadavg()[0]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    lines = [
        "# RPG item graph build (bench/bench_rpg_graph.py)",
        "",
        f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"built on {device}; "
        f"1-min load average {load:.1f} at the start (other processes share the cores). "
        f"n_edges {N_EDGES}, code embeddings {HIDDEN}-d; the graph is built for blocks of at most "
        f"{GRAPH_BLOCK_ITEMS} items, their similarities [items x block] within "
        f"{GRAPH_CHUNK_BYTES / 2**20:.0f} MiB. "
        "Beauty: its OPQ codes (configs/tokenizer/opq.yaml, 32 x 256 + dedup digit); "
        f"synthetic: uniform random {SYNTHETIC_CODES[0]} x {SYNTHETIC_CODES[1]} codes. "
        "Each size in a fresh process; peak RSS = ru_maxrss.",
        "",
        "| items | positions | block | build s | graph MiB | RSS before GiB | peak RSS GiB "
        "| peak GPU GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in args.sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--child", size, "--device", args.device],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(r, flush=True)
        lines.append(
            f"| {r['items']:,} | {r['positions']} | {r['block']:,} | {r['seconds']:.1f} | "
            f"{r['graph_mib']:.0f} | {r['rss_before_gib']:.2f} | {r['peak_rss_gib']:.2f} | "
            f"{'-' if r['peak_gpu_gib'] is None else format(r['peak_gpu_gib'], '.2f')} |"
        )
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
