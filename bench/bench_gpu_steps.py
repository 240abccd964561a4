"""Step times on the device at hand (a lent GPU; a CPU rehearses it): every generator's
fixed-shape training step eager, TIGER's also compiled and compiled with CUDA graphs, and a
beam-20 evaluation batch, each beside its operator count; then the overhead model (step ms =
a + b x operators) re-fitted on the eager steps, to set beside the H100 fit of
`bench/bench_overhead.py`.

Run: python bench/bench_gpu_steps.py [--out DIR] [--quick]  (on a GPU: bash bench/gpu_reproduce.sh
steps; writes gpu_steps.md and gpu_steps.jsonl, by default into bench/results/)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from bench_overhead import LAUNCH_MS, PER_OP_US, ROOT, models

from grid.data import SequenceDataModule, leave_one_out, load_sequences
from grid.profiling import OperatorCounter, cpu_name

BATCH, EVAL_BATCH = 256, 1024


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(
    model, batches: list[dict], steps: int, device: torch.device, count: bool = True
) -> dict:
    """Seconds of the first timed step (compiling, if any), ms per later step and, with
    `count`, operators per step (counted on one eager step before timing)."""
    opt = model.optimizer(lr=1e-4)  # fused on the fixed-shape path

    def step(batch):
        loss = model.loss(batch)
        if isinstance(loss, tuple):  # SETRec: the ranking and reconstruction losses
            loss = loss[0] + loss[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    if count:
        step(batches[0])  # the optimizer's state, outside the count (a compiled loss: later)
    ops = None
    if count:
        with OperatorCounter() as counter:
            step(batches[1 % len(batches)])
        ops = counter.total
    sync(device)
    start = time.perf_counter()
    step(batches[0])  # the first call compiles a compiled loss
    sync(device)
    first_s = time.perf_counter() - start
    for batch in batches[:3]:  # warm-up (and the other padded widths' compiles)
        step(batch)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    sync(device)
    ms = 1000 * (time.perf_counter() - start) / steps
    return {"ops": ops, "ms": ms, "samples_per_s": BATCH * 1000 / ms, "first_s": first_s}


@torch.no_grad()
def beam_users_per_s(model, batches: list[dict], device: torch.device) -> dict:
    model.eval()
    model.recommend(batches[0], 20)
    with OperatorCounter() as counter:
        model.recommend(batches[0], 20)
    sync(device)
    start = time.perf_counter()
    users = 0
    for batch in batches:
        model.recommend(batch, 20)
        users += len(batch["target"])
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "ops": counter.total,
        "users_per_s": users / seconds,
        "ms": 1000 * seconds / len(batches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="a few steps: a rehearsal")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps, eval_batches = (3, 2) if args.quick else (50, 10)
    dataset = load_sequences(ROOT / "data" / "amazon14_beauty")
    split = leave_one_out(dataset.sequences, max_history=20)
    dm = SequenceDataModule(split, batch_size=BATCH, eval_batch_size=EVAL_BATCH, fixed_shapes=True)
    for samples in (dm.train_set, dm.test_set):
        samples.to(device)
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(8)]
    test = iter(dm.test_dataloader())
    test_batches = [next(test) for _ in range(eval_batches)]
    rows = []
    for name, (generator, make) in models(dataset.num_items).items():
        variants = [("eager", None)]
        if generator == "tiger" and not args.no_compile:
            variants += [("compiled", "default"), ("compiled + CUDA graphs", "reduce-overhead")]
        for variant, mode in variants:
            L.seed_everything(0, verbose=False)
            model = make(False).to(device)
            if mode is not None:
                model.compile_loss(None if mode == "default" else mode)
            row = {"model": name, "generator": generator, "variant": variant}
            row["train"] = train_steps(model, batches, steps, device, count=mode is None)
            if generator == "tiger" and mode is None:
                row["beam20"] = beam_users_per_s(model, test_batches, device)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write(rows, device, args.out)


def write(rows: list[dict], device: torch.device, out: Path) -> None:
    eager = [r["train"] for r in rows if r["variant"] == "eager"]
    slope, intercept = np.polyfit([t["ops"] for t in eager], [t["ms"] for t in eager], 1)
    lines = [
        "# Step times on the device (`bench/bench_gpu_steps.py`)",
        "",
        f"{device_name(device)} ({platform.machine()}), torch {torch.__version__}"
        + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else "")
        + f". Fixed-shape path, Beauty, training batch {BATCH}, fused AdamW; operators "
        "counted on one eager step of the same run (views excluded).",
        "",
        "| model | variant | operators | ms/step | samples/s | first step s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["train"]
        ops = "" if t["ops"] is None else f"{t['ops']:,}"
        lines.append(
            f"| {r['model']} | {r['variant']} | {ops} | {t['ms']:.2f} | "
            f"{t['samples_per_s']:,.0f} | {t['first_s']:.1f} |"
        )
    for r in rows:
        if "beam20" in r:
            b = r["beam20"]
            lines += [
                "",
                f"TIGER beam-20, constrained, batches of {EVAL_BATCH} test users: "
                f"{b['users_per_s']:,.0f} users/s ({b['ms']:.1f} ms a batch, {b['ops']:,} "
                "operators).",
            ]
    lines += [
        "",
        f"Overhead model re-fitted on the eager steps: step ≈ {intercept:.2f} ms + "
        f"{1000 * slope:.1f} µs x operators (the H100 fit it replaces: {LAUNCH_MS:g} ms + "
        f"{PER_OP_US:g} µs).",
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_steps.md").write_text("\n".join(lines))
    fit = {"fit": {"intercept_ms": intercept, "per_op_us": 1000 * slope}}
    (out / "gpu_steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, fit]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
