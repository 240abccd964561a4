"""TIGER speed on Beauty: training throughput and beam search, against HuggingFace T5.

Run: python bench/bench_tiger.py  (writes bench/results/tiger.md; about 5-10 minutes on 2 cores)
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from transformers import T5Config, T5ForConditionalGeneration

from grid.data import SequenceDataModule, leave_one_out, load_sequences, pad
from grid.generators.tiger import TIGER
from grid.sids import assign_sids
from grid.tokenizers.rkmeans import ResidualKMeans

ROUNDS, OURS_PER_ROUND = 6, 5
STABILITY_STEPS = 40
HF_USERS = 512
OUT = Path(__file__).parent / "results" / "tiger.md"


def train_flops(model: TIGER, items: int, samples: int, width: int) -> float:
    """Matmul FLOPs of forward + backward (3x forward) for `samples` histories of `items` items.

    Linear layers see the packed tokens; attention runs on the padded `width`.
    """
    p = model.hparams
    d, inner, ff, L = p.d_model, p.num_heads * p.head_dim, p.d_ff, model.levels
    enc_tok, pad_tok = items * L, width * L * samples
    enc = p.encoder_layers * (
        2 * enc_tok * (4 * d * inner + 2 * d * ff) + 4 * pad_tok * width * L * inner
    )
    dec_tok = samples * L
    dec = p.decoder_layers * (
        2 * dec_tok * (6 * d * inner + 2 * d * ff)
        + 2 * enc_tok * 2 * d * inner
        + 4 * dec_tok * (L + width * L) * inner
    )
    head = 2 * dec_tok * d * max(model.vocab_sizes)
    return 3.0 * (enc + dec + head)


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


def bench_train(model: TIGER, dm: SequenceDataModule, t5) -> dict:
    """Training steps of TIGER (bucketed batches) and HF T5 (random batches padded to 20 items).

    The two alternate in rounds so that load from other processes hits both alike. Each step is
    what Lightning runs per step: the loss, backward, optimiser step, zero_grad.
    """
    ours_opt, hf_opt = model.configure_optimizers(), torch.optim.AdamW(t5.parameters(), lr=5e-4)
    model.train()
    t5.train()
    batches = iter(dm.train_dataloader())
    data, g = dm.train_set, torch.Generator().manual_seed(0)
    ours = {"seconds": 0.0, "samples": 0, "items": 0, "widths": []}
    hf = {"seconds": 0.0, "samples": 0}
    for r in range(ROUNDS + 1):
        for _ in range(OURS_PER_ROUND):
            batch = next(batches)
            start = time.perf_counter()
            loss = model.loss(batch)  # training_step without the logging
            loss.backward()
            ours_opt.step()
            ours_opt.zero_grad(set_to_none=True)
            if r:  # round 0 warms up
                ours["seconds"] += time.perf_counter() - start
                ours["samples"] += len(batch["target"])
                ours["items"] += int(batch["length"].sum())
                ours["widths"].append(batch["history"].shape[1])
        idx = torch.randperm(len(data), generator=g)[:256]
        inputs = hf_inputs(model, [data.history[i, : data.lengths[i]].numpy() for i in idx], 20)
        labels = model.item_tokens[data.targets[idx]]
        start = time.perf_counter()
        t5(**inputs, labels=labels).loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        if r:
            hf["seconds"] += time.perf_counter() - start
            hf["samples"] += len(idx)
    width = float(np.mean(ours["widths"]))
    flops = train_flops(model, ours["items"], ours["samples"], round(width))
    return {
        "samples_per_s": ours["samples"] / ours["seconds"],
        "gflops": flops / ours["seconds"] / 1e9,
        "mean_items": ours["items"] / ours["samples"],
        "mean_width": width,
        "steps": len(ours["widths"]),
        "hf_samples_per_s": hf["samples"] / hf["seconds"],
        "hf_steps": ROUNDS,
    }


def bench_decode(model: TIGER, dm: SequenceDataModule) -> dict:
    """Constrained and free beam search over every test user, alternating per batch."""
    model.eval()
    seconds = {"constrained": 0.0, "free": 0.0}
    users = 0
    for batch in dm.test_dataloader():
        for mode in seconds:
            model.decoding = mode
            start = time.perf_counter()
            model.recommend(batch, 10)
            seconds[mode] += time.perf_counter() - start
        users += len(batch["target"])
    model.decoding = "constrained"
    return {"users": users, **{m: users / s for m, s in seconds.items()}, "seconds": seconds}


def bench_hf_generate(model: TIGER, dm: SequenceDataModule, t5) -> dict:
    """HF beam search (width 20, top 10) and ours on the same random test users, alternating."""
    rng = np.random.default_rng(0)
    users = np.sort(rng.choice(len(dm.test_set), HF_USERS, replace=False))
    t5.eval()
    model.eval()
    seconds = {"hf": 0.0, "ours": 0.0}
    for chunk in np.array_split(users, HF_USERS // 128):
        batch = dm.test_set.collate(chunk.tolist())
        inputs = hf_inputs(model, [h[h >= 0].numpy() for h in batch["history"]], 20)
        start = time.perf_counter()
        with torch.no_grad():
            t5.generate(
                **inputs,
                num_beams=20,
                num_return_sequences=10,
                max_new_tokens=model.levels,
                min_new_tokens=model.levels,
                do_sample=False,
            )
        seconds["hf"] += time.perf_counter() - start
        start = time.perf_counter()
        model.recommend(batch, 10)
        seconds["ours"] += time.perf_counter() - start
    return {name: HF_USERS / s for name, s in seconds.items()}


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
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

    ratio_train = train["samples_per_s"] / train["hf_samples_per_s"]
    overhead = decode["seconds"]["constrained"] / decode["seconds"]["free"] - 1
    lines = [
        "# TIGER speed (bench/bench_tiger.py)",
        "",
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; Beauty, RK-Means 3x256 + dedup "
        f"(vocab {sids.vocab_sizes}, {sids.num_unique} SIDs); paper shape (d 128, 6x64 heads, "
        f"d_ff 1024, 4+4 layers); bf16 autocast {model.bf16}. All figures from one run; "
        f"1-min load average {load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
        f"(other processes share the cores).",
        "",
        "## Training (batch 256, sliding-window samples, history <= 20 items)",
        "",
        "| | samples/s | |",
        "|---|---|---|",
        f"| TIGER (length-bucketed, packed, bf16 autocast) | {train['samples_per_s']:.0f} | "
        f"{train['gflops']:.0f} GFLOP/s of model matmuls |",
        f"| HF T5ForConditionalGeneration (random batches padded to 80 tokens, fp32) | "
        f"{train['hf_samples_per_s']:.0f} | |",
        f"| ratio | {ratio_train:.2f}x | |",
        "",
        f"Mean history {train['mean_items']:.1f} items; bucketed batches padded to "
        f"{train['mean_width']:.1f} items on average. {train['steps']} timed steps (TIGER) and "
        f"{train['hf_steps']} (HF), alternating in rounds after one warm-up round.",
        "",
        "## Beam search (width 20, top 10)",
        "",
        "| | users/s |",
        "|---|---|",
        f"| TIGER constrained, all {decode['users']} test users | {decode['constrained']:.0f} |",
        f"| TIGER free, same users | {decode['free']:.0f} |",
        f"| TIGER constrained, {HF_USERS} random test users | {hf_gen['ours']:.0f} |",
        f"| HF generate(num_beams=20), same {HF_USERS} users | {hf_gen['hf']:.1f} |",
        "",
        f"- vs HF generate (same {HF_USERS} users): "
        f"{hf_gen['ours'] / hf_gen['hf']:.1f}x;"
        f" all-users constrained vs HF: {decode['constrained'] / hf_gen['hf']:.1f}x",
        f"- constrained costs {100 * overhead:+.1f}% time vs free decoding (batches alternated)",
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
