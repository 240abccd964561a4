"""TIGER speed on Beauty: training throughput and beam search, against HuggingFace T5.

FLOPs are counted exactly (torch's FlopCounterMode on the timed batches) and set against this
machine's bf16 matmul rate at the model's own shapes, measured in the same run.

Run: python bench/bench_tiger.py  (writes bench/results/tiger.md; about 10 minutes on 2 cores)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from transformers import T5Config, T5ForConditionalGeneration

from grid.data import SequenceDataModule, leave_one_out, load_sequences, pad
from grid.generators.tiger import TIGER
from grid.profiling import cpu_name
from grid.runner import keep_freed_memory
from grid.sids import assign_sids
from grid.tokenizers.rkmeans import ResidualKMeans

ROUNDS, OURS_PER_ROUND = 6, 5
STABILITY_STEPS = 40
HF_USERS = 512
BF16_FP32 = (("bf16", torch.bfloat16), ("fp32", torch.float32))
OUT = Path(__file__).parent / "results" / "tiger.md"


def counted_flops(step, inputs) -> float:
    """FLOPs torch counts for `step(x)` over every `x` in `inputs` (matmuls and attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        for x in inputs:
            step(x)
    return float(counter.get_total_flops())


def matmul_rate(model: TIGER, tokens: int, dtype: torch.dtype) -> dict:
    """GFLOP/s of `torch.mm` at the model's linear shapes ([tokens, in] x [in, out]).

    The FLOP-weighted rate over the shapes is what a step made only of these matmuls would reach.
    """
    p = model.hparams
    inner = p.num_heads * p.head_dim
    shapes = [(p.d_model, 3 * inner), (inner, p.d_model), (p.d_model, p.d_ff), (p.d_ff, p.d_ff)]
    shapes += [(p.d_ff, p.d_model)]
    rates, total_flops, total_s = {}, 0.0, 0.0
    for k, n in shapes:
        a, b = torch.randn(tokens, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        reps = 20
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        seconds = time.perf_counter() - start
        flops = 2.0 * tokens * k * n * reps
        rates[f"{k}x{n}"] = flops / seconds / 1e9
        total_flops, total_s = total_flops + flops, total_s + seconds
    return {"shapes": rates, "weighted": total_flops / total_s / 1e9}


def bench_bf16(sids, dm: SequenceDataModule) -> dict:
    """Loss curves of the same model and batches trained in fp32 and under bf16 autocast."""
    batches = [b for b, _ in zip(dm.train_dataloader(), range(STABILITY_STEPS), strict=False)]
    out = {}
    for bf16 in (False, True):
        model = TIGER(sids, bf16=bf16).train()
        opt = model.configure_optimizers()
        torch.manual_seed(0)
        losses, start = [], time.perf_counter()
        for batch in batches:
            loss = model.loss(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        out["bf16" if bf16 else "fp32"] = {
            "first": losses[0],
            "last10": float(np.mean(losses[-10:])),
            "samples_per_s": sum(len(b["target"]) for b in batches) / (time.perf_counter() - start),
        }
    return out


def hf_model(model: TIGER) -> T5ForConditionalGeneration:
    p = model.hparams
    config = T5Config(
        vocab_size=model.bos + 1,
        d_model=p.d_model,
        d_kv=p.head_dim,
        num_heads=p.num_heads,
        d_ff=p.d_ff,
        num_layers=p.encoder_layers,
        num_decoder_layers=p.decoder_layers,
        dropout_rate=p.dropout,
        pad_token_id=model.pad,
        eos_token_id=model.pad,
        decoder_start_token_id=model.bos,
    )
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config)


def hf_inputs(model: TIGER, histories: list[np.ndarray], width: int) -> dict:
    rows = torch.as_tensor(pad([h[-width:] for h in histories], width))
    ids = model.item_tokens[torch.where(rows < 0, model.num_items, rows)].flatten(1)
    return {"input_ids": ids, "attention_mask": (ids != model.pad).long()}


def lightning_seconds(model: TIGER, batches: list[dict]) -> float:
    """Seconds Lightning's fit loop (as `grid run` trains) takes over `batches`, bar the first."""
    marks = []

    class Clock(L.Callback):
        def on_train_batch_start(self, *args):
            marks.append(time.perf_counter())

        def on_train_batch_end(self, *args):
            marks.append(time.perf_counter())

    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Clock()],
    )
    loader = DataLoader([batches[-1], *batches], batch_size=None)  # the first step warms up
    trainer.fit(model, train_dataloaders=loader)
    return marks[-1] - marks[2]  # from the second batch's start to the last batch's end


def bench_train(model: TIGER, dm: SequenceDataModule, t5) -> dict:
    """Training steps of TIGER (bucketed batches) and HF T5 (random batches padded to 20 items).

    The runs alternate in rounds so that load from other processes hits all alike. Each step is
    what Lightning runs per step: the loss, backward, optimiser step, zero_grad. HF T5 runs in
    fp32 and under bf16 autocast (TIGER's default precision).
    """
    ours_opt, hf_opt = model.configure_optimizers(), torch.optim.AdamW(t5.parameters(), lr=5e-4)
    model.train()
    t5.train()
    batches = iter(dm.train_dataloader())
    data, g = dm.train_set, torch.Generator().manual_seed(0)
    ours = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0, "samples": 0, "items": 0}
    ours["collate"] = 0.0
    timed, hf = [], {"fp32": [0.0, 0], "bf16": [0.0, 0]}
    for r in range(ROUNDS + 1):
        for _ in range(OURS_PER_ROUND):
            tc = time.perf_counter()
            batch = next(batches)
            t0 = time.perf_counter()
            loss = model.loss(batch)  # training_step without the logging
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            ours_opt.step()
            ours_opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if r:  # round 0 warms up
                ours["collate"] += t0 - tc
                ours["forward"] += t1 - t0
                ours["backward"] += t2 - t1
                ours["optimizer"] += t3 - t2
                ours["samples"] += len(batch["target"])
                ours["items"] += int(batch["length"].sum())
                timed.append(batch)
        for precision, totals in hf.items():
            idx = torch.randperm(len(data), generator=g)[:256]
            inputs = hf_inputs(model, [data.history[i, : data.lengths[i]].numpy() for i in idx], 20)
            labels = model.item_tokens[data.targets[idx]]
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = t5(**inputs, labels=labels).loss
            loss.backward()
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)
            if r:
                totals[0] += time.perf_counter() - start
                totals[1] += len(idx)
    seconds = ours["forward"] + ours["backward"] + ours["optimizer"]
    flops = counted_flops(lambda b: model.loss(b).backward(), timed)
    model.zero_grad(set_to_none=True)
    lightning = lightning_seconds(model, timed)
    return {
        "samples_per_s": ours["samples"] / seconds,
        "gflop_per_sample": flops / ours["samples"] / 1e9,
        "gflops": flops / seconds / 1e9,
        "split": {k: ours[k] / seconds for k in ("forward", "backward", "optimizer", "collate")},
        "lightning_overhead": lightning / seconds - 1,
        "mean_items": ours["items"] / ours["samples"],
        "mean_width": float(np.mean([b["history"].shape[1] for b in timed])),
        "tokens_per_batch": ours["items"] * model.levels // len(timed),
        "steps": len(timed),
        **{f"hf_{k}_samples_per_s": n / t for k, (t, n) in hf.items()},
        "hf_steps": ROUNDS,
    }


def bench_decode(model: TIGER, dm: SequenceDataModule) -> dict:
    """Constrained and free beam search over every test user, alternating per batch."""
    model.eval()
    seconds = {"constrained": 0.0, "free": 0.0}
    users, counted = 0, []
    for i, batch in enumerate(dm.test_dataloader()):
        for mode in seconds:
            model.decoding = mode
            start = time.perf_counter()
            model.recommend(batch, 10)
            seconds[mode] += time.perf_counter() - start
        users += len(batch["target"])
        if i % 10 == 0:
            counted.append(batch)
    model.decoding = "constrained"
    with torch.no_grad():
        flops = counted_flops(lambda b: model.recommend(b, 10), counted)
    per_user = flops / sum(len(b["target"]) for b in counted)
    return {
        "users": users,
        **{m: users / s for m, s in seconds.items()},
        "seconds": seconds,
        "gflop_per_user": per_user / 1e9,
        "gflops": per_user * users / seconds["constrained"] / 1e9,
    }


def bench_hf_generate(model: TIGER, dm: SequenceDataModule, t5) -> dict:
    """HF beam search (width 20, top 10; fp32 and bf16 autocast) and ours on the same users."""
    rng = np.random.default_rng(0)
    users = np.sort(rng.choice(len(dm.test_set), HF_USERS, replace=False))
    t5.eval()
    model.eval()
    seconds = {"hf_fp32": 0.0, "hf_bf16": 0.0, "ours": 0.0}
    for chunk in np.array_split(users, HF_USERS // 128):
        batch = dm.test_set.collate(chunk.tolist())
        inputs = hf_inputs(model, [h[h >= 0].numpy() for h in batch["history"]], 20)
        for precision in ("fp32", "bf16"):
            start = time.perf_counter()
            with (
                torch.no_grad(),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"),
            ):
                t5.generate(
                    **inputs,
                    num_beams=20,
                    num_return_sequences=10,
                    max_new_tokens=model.levels,
                    min_new_tokens=model.levels,
                    do_sample=False,
                )
            seconds[f"hf_{precision}"] += time.perf_counter() - start
        start = time.perf_counter()
        model.recommend(batch, 10)
        seconds["ours"] += time.perf_counter() - start
    return {name: HF_USERS / s for name, s in seconds.items()}


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    keep_freed_memory()  # as `grid run` does
    data = load_sequences("data/amazon14_beauty")
    emb = np.random.default_rng(0).standard_normal((data.num_items, 384)).astype(np.float32)
    tok = ResidualKMeans(3, 256)
    sids = assign_sids(tok.fit_encode(emb), tok.vocab_sizes, "dedup")
    dm = SequenceDataModule(leave_one_out(data.sequences, 20), max_history=20, batch_size=256)
    model = TIGER(sids)

    load = os.getloadavg()[0]
    t5 = hf_model(model)
    train = bench_train(model, dm, t5)
    print("train", train, flush=True)
    decode = bench_decode(model, dm)
    print("decode", decode, flush=True)
    hf_gen = bench_hf_generate(model, dm, t5)
    print("hf generate", hf_gen, flush=True)
    stab = bench_bf16(sids, dm)
    print("bf16", stab, flush=True)
    peak = {n: matmul_rate(model, train["tokens_per_batch"], d) for n, d in BF16_FP32}
    print("matmul", peak, flush=True)

    bf16_peak = peak["bf16"]["weighted"]
    overhead = decode["seconds"]["constrained"] / decode["seconds"]["free"] - 1
    split = train["split"]

    def needs(target: float, gflop: float) -> str:
        return (
            f"{target * gflop / 1e3:.2f} TFLOP/s ({target * gflop / bf16_peak:.1f}x the bf16 rate)"
        )

    lines = [
        "# TIGER speed (bench/bench_tiger.py)",
        "",
        f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; Beauty, "
        f"RK-Means 3x256 + dedup (vocab {sids.vocab_sizes}, {sids.num_unique} SIDs); GRID shape "
        f"(d 128, 6x64 heads, d_ff 1024, 4+4 layers, mlp_layers 2, dropout 0.15); bf16 autocast "
        f"{model.bf16}. All figures from one run; 1-min load average {load:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end.",
        "",
        "## This machine's matmul rate at the model's shapes",
        "",
        f"`torch.mm` of [{train['tokens_per_batch']} tokens, in] x [in, out] (a training batch's "
        "packed tokens), GFLOP/s:",
        "",
        "| | " + " | ".join(peak["bf16"]["shapes"]) + " | FLOP-weighted |",
        "|---|" + "---|" * (len(peak["bf16"]["shapes"]) + 1),
        *(
            f"| {n} | "
            + " | ".join(f"{v:.0f}" for v in r["shapes"].values())
            + f" | {r['weighted']:.0f} |"
            for n, r in peak.items()
        ),
        "",
        "## Training (batch 256, sliding-window samples, history <= 20 items)",
        "",
        "| | samples/s | |",
        "|---|---|---|",
        f"| TIGER (length-bucketed, packed, bf16 autocast) | {train['samples_per_s']:.0f} | "
        f"{train['gflops']:.0f} GFLOP/s = {100 * train['gflops'] / bf16_peak:.0f}% of the bf16 "
        "matmul rate |",
        f"| HF T5ForConditionalGeneration, bf16 autocast (random batches padded to 80 tokens) | "
        f"{train['hf_bf16_samples_per_s']:.0f} | TIGER "
        f"{train['samples_per_s'] / train['hf_bf16_samples_per_s']:.2f}x |",
        f"| HF T5ForConditionalGeneration, fp32 (same) | {train['hf_fp32_samples_per_s']:.0f} | "
        f"TIGER {train['samples_per_s'] / train['hf_fp32_samples_per_s']:.2f}x |",
        "",
        f"- {train['gflop_per_sample']:.3f} GFLOP per sample (FlopCounterMode over the timed "
        f"batches: forward + backward); mean history {train['mean_items']:.1f} items, bucketed "
        f"batches padded to {train['mean_width']:.1f} items on average; {train['steps']} timed "
        f"steps (TIGER) and {train['hf_steps']} per precision (HF), alternating in rounds after "
        "one warm-up round.",
        f"- Step time: forward {100 * split['forward']:.0f}%, backward "
        f"{100 * split['backward']:.0f}%, optimiser {100 * split['optimizer']:.0f}%; collating the "
        f"batch adds {100 * split['collate']:.1f}% and Lightning's fit loop (logging, hooks) "
        f"{100 * train['lightning_overhead']:+.1f}% on the same batches. At the bf16 "
        f"matmul rate the matmuls alone would take {100 * train['gflops'] / bf16_peak:.0f}% of "
        "the step; the rest is memory-bound work (norms, softmax, dropout, gathers, casts).",
        f"- 1,000 samples/s would need {needs(1000, train['gflop_per_sample'])}.",
        "",
        "## Beam search (width 20, top 10)",
        "",
        "| | users/s |",
        "|---|---|",
        f"| TIGER constrained, all {decode['users']} test users | {decode['constrained']:.0f} |",
        f"| TIGER free, same users | {decode['free']:.0f} |",
        f"| TIGER constrained, {HF_USERS} random test users | {hf_gen['ours']:.0f} |",
        f"| HF generate(num_beams=20), bf16 autocast, same {HF_USERS} users | "
        f"{hf_gen['hf_bf16']:.1f} |",
        f"| HF generate(num_beams=20), fp32, same {HF_USERS} users | {hf_gen['hf_fp32']:.1f} |",
        "",
        f"- vs HF generate on the same {HF_USERS} users: {hf_gen['ours'] / hf_gen['hf_bf16']:.1f}x"
        f" (bf16), {hf_gen['ours'] / hf_gen['hf_fp32']:.1f}x (fp32)",
        f"- constrained costs {100 * overhead:+.1f}% time vs free decoding (batches alternated)",
        f"- {decode['gflop_per_user']:.3f} GFLOP per user (FlopCounterMode on every tenth batch): "
        f"{decode['gflops']:.0f} GFLOP/s = {100 * decode['gflops'] / bf16_peak:.0f}% of the bf16 "
        f"matmul rate; 1,500 users/s would need {needs(1500, decode['gflop_per_user'])}.",
        "",
        f"## bf16 autocast vs fp32 (same init and batches, {STABILITY_STEPS} steps)",
        "",
        "| | first loss | mean loss, last 10 steps | samples/s |",
        "|---|---|---|---|",
        *(
            f"| {name} | {r['first']:.3f} | {r['last10']:.3f} | {r['samples_per_s']:.0f} |"
            for name, r in stab.items()
        ),
        "",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
