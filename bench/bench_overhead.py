"""GPU overhead measured on a CPU: operators and would-sync operators per training step and per
evaluation batch for every generator at its paper/handbook depth, graph breaks of each training
loss under `torch._dynamo.explain`, and the per-step cost of Lightning's loop with a null model.

Small models on a GPU are bound by kernel launches: a step costs about 2 ms + 37 µs per operator
on an H100 (fitted on SASRec and SimGR steps), so these counts predict GPU step time. Counts are
deterministic and do not depend on the machine; only the Lightning timing does.

Run: python bench/bench_overhead.py  (writes bench/results/overhead.md; about 5 minutes on 2 cores)
"""

from __future__ import annotations

import json
import platform
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from unittest import mock

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from grid.data import SequenceDataModule, leave_one_out, load_sequences
from grid.generators import RPG, SASRec, SETRec, SimGR, layers
from grid.generators.layers import RMSNorm
from grid.generators.tiger import TIGER
from grid.profiling import OperatorCounter, StepOperatorCounter, cpu_name
from grid.sids import assign_sids

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "overhead.md"
LAUNCH_MS, PER_OP_US = 2.0, 37.0  # the H100 fit: step ≈ 2 ms + 37 µs x operators
# What a CPU decomposes and CUDA runs as one kernel each way (F.rms_norm, nn.Dropout, attention
# under a learned bias) is measured per call by `cpu_only_operators` and taken out of the counts.
STEPS = 4  # training steps counted (after one that initialises the optimizer state)
QUIET = dict(
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)
# The GRID handbook's TIGER (experiments/gpu.yaml), RPG's paper size, the other defaults.
HANDBOOK_TIGER = dict(
    d_model=128,
    num_heads=6,
    head_dim=64,
    d_ff=1024,
    encoder_layers=4,
    decoder_layers=4,
    dropout=0.15,
    mlp_layers=2,
    item_separator=True,
)


def models(num_items: int) -> dict:
    """(generator name, constructor `packed -> model`) at the papers' depths, on random SIDs
    of the papers' shapes (operator counts depend on shapes, not on code values)."""
    rng = np.random.default_rng(0)
    short = assign_sids(rng.integers(0, 256, (num_items, 3)), (256,) * 3, "dedup")
    long = assign_sids(rng.integers(0, 256, (num_items, 32)), (256,) * 32, "random", ordered=False)
    text = rng.standard_normal((num_items, 384)).astype(np.float32)
    cf = rng.standard_normal((num_items, 64)).astype(np.float32)
    return {
        "TIGER handbook (4+4, d128)": ("tiger", lambda p: TIGER(short, **HANDBOOK_TIGER, packed=p)),
        "RPG (2 layers, d448, 32 codes)": ("rpg", lambda p: RPG(long, packed=p)),
        "SimGR (2 layers, d64)": ("simgr", lambda p: SimGR(short, packed=p)),
        "SETRec (2 blocks, d64)": ("setrec", lambda p: SETRec(text, cf, beta=0.5, packed=p)),
        "SASRec (2 blocks, d64)": ("sasrec", lambda p: SASRec(num_items, packed=p)),
    }


def cpu_only_operators() -> dict[str, tuple[int, int]]:
    """Per call, the operators (forward, backward) a CPU runs beyond those CUDA launches: RMSNorm
    (F.rms_norm: one `_fused_rms_norm` kernel each way on CUDA), nn.Dropout (`native_dropout`),
    and fused attention under a learned bias (T5's relative positions): CUDA's memory-efficient
    kernel takes the bias and returns its gradient, a CPU falls back to the unfused product."""
    x = torch.randn(8, 16, requires_grad=True)
    extra = {}
    for name, module in (("RMSNorm", RMSNorm(16)), ("nn.Dropout", nn.Dropout(0.1))):
        forward, backward = _counts(partial(module, x), (x, *module.parameters()))
        extra[name] = (forward - 1, backward - 1)
    q = torch.randn(4, 2, 6, 8, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(1, 2, 6, 6, requires_grad=True)
    mask = torch.rand(4, 1, 1, 6) > 0.2
    learned = _counts(lambda: layers.attend(q, q, q, mask, bias=bias, fused=True), (q, bias))
    fixed = _counts(lambda: layers.attend(q, q, q, mask, bias=bias.detach(), fused=True), (q,))
    # CUDA sums the bias gradient over the batch: one operator more than the fixed-bias backward
    extra["attention, learned bias"] = (learned[0] - fixed[0], learned[1] - fixed[1] - 1)
    return extra


def _counts(forward, inputs) -> tuple[int, int]:
    """Operators of `forward()` and of its backward to `inputs`."""
    with OperatorCounter() as counter:
        y = forward()
    grad = torch.ones_like(y)
    with OperatorCounter() as back:
        torch.autograd.grad(y, inputs, grad)
    return counter.total, back.total


@contextmanager
def cpu_only_calls(model):
    """Counts of the calls `cpu_only_operators` corrects, made inside the block."""
    kinds = {RMSNorm: "RMSNorm", nn.Dropout: "nn.Dropout"}
    calls = dict.fromkeys([*kinds.values(), "attention, learned bias"], 0)

    def hook(module, args, output):
        if module.training or not isinstance(module, nn.Dropout):  # eval dropout runs nothing
            calls[kinds[type(module)]] += 1

    def attend(*args, **kwargs):
        bias = args[6] if len(args) > 6 else kwargs.get("bias")
        fused = args[8] if len(args) > 8 else kwargs.get("fused", False)
        if fused and bias is not None and bias.requires_grad:
            calls["attention, learned bias"] += 1
        return original(*args, **kwargs)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if type(m) in kinds and getattr(m, "p", 1) > 0
    ]
    original = layers.attend
    try:
        with mock.patch.object(layers, "attend", attend):
            yield calls
    finally:
        for handle in handles:
            handle.remove()


def training_counts(model, split, packed: bool, extra: dict) -> dict:
    """Median operators, would-sync operators and host-made tensors per training step, and the
    operators CUDA would launch (the CPU-only decompositions taken out)."""
    counter = StepOperatorCounter(skip=1)
    dm = SequenceDataModule(split, batch_size=256, fixed_shapes=not packed)
    trainer = L.Trainer(**QUIET, max_steps=STEPS + 1, limit_val_batches=0, callbacks=[counter])
    with cpu_only_calls(model) as calls:
        trainer.fit(model, train_dataloaders=dm.train_dataloader())
    steps = counter.steps
    ops = int(np.median([s.total for s in steps]))
    cpu_only = sum(sum(extra[kind]) * n // (STEPS + 1) for kind, n in calls.items())
    return {
        "cuda_ops": ops - cpu_only,
        "ops": ops,
        "syncs": int(np.median([s.total_syncs for s in steps])),
        "sync_ops": dict(max((s.syncs for s in steps), key=lambda c: sum(c.values()))),
        "host_copies": int(np.median([sum(s.host_copies.values()) for s in steps])),
        "optimizer_ops": optimizer_ops(model),
    }


def optimizer_ops(model) -> int:
    """Operators of one optimizer step alone (its state already initialised)."""
    opt = model.optimizers().optimizer
    with OperatorCounter() as counter:
        opt.step()
    return counter.total


def eval_counts(model, split, packed: bool, extra: dict) -> dict:
    """Operators (all, and those CUDA would launch) and would-sync operators of `recommend` on
    one evaluation batch of 256 users."""
    dm = SequenceDataModule(split, eval_batch_size=256, fixed_shapes=not packed)
    batch = next(iter(dm.test_dataloader()))
    model.eval()
    with torch.no_grad():
        model.recommend(batch, 20)  # evaluation caches (RPG's, SimGR's tables) are built once
        with cpu_only_calls(model) as calls, OperatorCounter() as counter:
            model.recommend(batch, 20)
    cpu_only = sum(extra[kind][0] * n for kind, n in calls.items())
    return {
        "ops": counter.total,
        "cuda_ops": counter.total - cpu_only,
        "syncs": counter.total_syncs,
        "sync_ops": dict(counter.syncs),
    }


def graph_breaks(model, split) -> dict:
    """Graphs and graph breaks of the fixed-shape training loss under `torch._dynamo.explain`."""
    dm = SequenceDataModule(split, batch_size=256, fixed_shapes=True)
    batch = next(iter(dm.train_dataloader()))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.loss)(batch)
    reasons = sorted({str(b.reason).splitlines()[0][:90] for b in explained.break_reasons})
    return {
        "graphs": explained.graph_count,
        "breaks": explained.graph_break_count,
        "reasons": reasons,
    }


class NullModel(L.LightningModule):
    """One parameter and a loss of one operator: Lightning's own per-step cost."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w * batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def lightning_loop(steps: int = 2000) -> dict:
    """ms per step of Lightning's loop around a null model, against a bare PyTorch loop."""
    data = DataLoader(torch.ones(steps, 1), batch_size=1)
    counter = StepOperatorCounter(skip=1)
    trainer = L.Trainer(**QUIET, max_steps=steps, callbacks=[counter])
    model = NullModel()
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=data)
    lightning_ms = 1000 * (time.perf_counter() - start) / steps
    model = NullModel()
    opt = model.configure_optimizers()
    start = time.perf_counter()
    for batch in data:
        opt.zero_grad()
        model.training_step(batch, 0).backward()
        opt.step()
    bare_ms = 1000 * (time.perf_counter() - start) / steps
    return {
        "lightning_ms": lightning_ms,
        "bare_ms": bare_ms,
        "lightning_ops": int(np.median([s.total for s in counter.steps])),
        "lightning_syncs": int(np.median([s.total_syncs for s in counter.steps])),
    }


def predicted_ms(ops: int) -> float:
    return LAUNCH_MS + PER_OP_US * ops / 1000


def main() -> None:
    torch.set_num_threads(2)
    dataset = load_sequences(ROOT / "data" / "amazon14_beauty")
    split = leave_one_out(dataset.sequences, max_history=20)
    rows, extra = [], cpu_only_operators()
    for name, (generator, make) in models(dataset.num_items).items():
        row = {"model": name, "generator": generator}
        for packed in (True, False):
            path = "packed" if packed else "fixed"
            L.seed_everything(0, verbose=False)
            model = make(packed)
            row[f"train_{path}"] = training_counts(model, split, packed, extra)
            row[f"eval_{path}"] = eval_counts(model, split, packed, extra)
        row["graph"] = graph_breaks(make(False), split)
        rows.append(row)
        print(json.dumps(row), flush=True)
    loop = lightning_loop()
    write(rows, loop, extra)


def write(rows: list[dict], loop: dict, extra: dict) -> None:
    lines = [
        "# GPU overhead, counted on a CPU",
        "",
        f"`python bench/bench_overhead.py` on {cpu_name()} ({platform.machine()}), "
        f"torch {torch.__version__}. Beauty (12,101 items), training batch 256, evaluation "
        "batch 256 (top 20), bf16 autocast as configured. Operators exclude views; a would-sync "
        "operator makes the host wait for a GPU (`.item()`, `nonzero`, boolean-mask indexing, "
        "`unique`, ...); host-made tensors are `torch.tensor(data)` copies. Counts are medians "
        f"over {STEPS} training steps inside Lightning's loop (forward, backward, optimizer "
        "step, logging) after one that initialises the optimizer. The H100 column is the "
        f"fitted {LAUNCH_MS:g} ms + {PER_OP_US:g} µs x operators on CUDA. The fixed path attends "
        "through `F.scaled_dot_product_attention` on every device, as CUDA does. 'On CUDA' takes "
        "out what only a CPU decomposes, per call (forward + backward): "
        + ", ".join(f"{kind} {f} + {b}" for kind, (f, b) in extra.items())
        + " more operators than CUDA launches (F.rms_norm is one `_fused_rms_norm` kernel each "
        "way on CUDA, dropout one `native_dropout`; CUDA's memory-efficient attention takes a "
        "learned bias and returns its gradient, where a CPU falls back to the unfused product). "
        "Evaluation takes out the forward part only.",
        "",
        "## Training step",
        "",
        "| model | path | operators | on CUDA | of which optimizer | would-sync "
        "| host-made tensors | predicted H100 ms/step | samples/s at 256 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for path in ("packed", "fixed"):
            t = row[f"train_{path}"]
            ms = predicted_ms(t["cuda_ops"])
            syncs = f"{t['syncs']} ({', '.join(f'{k} {v}' for k, v in t['sync_ops'].items())})"
            lines.append(
                f"| {row['model']} | {path} | {t['ops']:,} | {t['cuda_ops']:,} | "
                f"{t['optimizer_ops']:,} | "
                f"{syncs if t['syncs'] else 0} | {t['host_copies']} | {ms:.1f} | "
                f"{256 / ms * 1000:,.0f} |"
            )
    lines += [
        "",
        "## Evaluation batch (256 users, top 20)",
        "",
        "| model | path | operators | on CUDA | would-sync | predicted H100 ms/batch |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        for path in ("packed", "fixed"):
            e = row[f"eval_{path}"]
            syncs = ", ".join(f"{k} {v}" for k, v in e["sync_ops"].items()) or "0"
            lines.append(
                f"| {row['model']} | {path} | {e['ops']:,} | {e['cuda_ops']:,} | {syncs} | "
                f"{predicted_ms(e['cuda_ops']):.1f} |"
            )
    lines += [
        "",
        "## Graph breaks of the fixed-shape training loss (`torch._dynamo.explain`)",
        "",
        "| model | graphs | breaks | reasons |",
        "|---|---|---|---|",
    ]
    for row in rows:
        g = row["graph"]
        reasons = "; ".join(g["reasons"]) or "-"
        lines.append(f"| {row['model']} | {g['graphs']} | {g['breaks']} | {reasons} |")
    lines += [
        "",
        "## Lightning's loop",
        "",
        f"A null model (one parameter, SGD) trained {2000:,} steps: Lightning "
        f"{loop['lightning_ms']:.3f} ms/step against {loop['bare_ms']:.3f} ms/step for a bare "
        f"PyTorch loop on this CPU, so the loop adds {loop['lightning_ms'] - loop['bare_ms']:.3f} "
        f"ms/step of host time; inside a step it runs {loop['lightning_ops']} operators "
        f"(model, backward and SGD included) and {loop['lightning_syncs']} would-sync ones.",
        "",
    ]
    OUT.write_text("\n".join(lines))
    OUT.with_suffix(".jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [*rows, {"lightning_loop": loop}])
    )
    print(OUT.read_text())


if __name__ == "__main__":
    main()
