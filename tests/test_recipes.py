"""The paper recipes pinned to their official values, the options they need (GPT-2 blocks,
attention dropout, gradient clipping, warm-up and cosine schedules, ties left tied) and SETRec's
warm/cold item groups against ranking each group's items alone (TIGER: decoding among them)."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch

from grid.config import ROOT, compose
from grid.data import SequenceDataModule, leave_one_out
from grid.generators.layers import ACTIVATIONS, Block, Layout
from grid.generators.rpg import RPG
from grid.generators.tiger import TIGER
from grid.metrics import RankingTotals, rank_metrics
from grid.runner import _trainer, model_key
from grid.sids import assign_sids
from tests.conftest import QUIET

from .test_setrec import random_setrec
from .test_tiger import SMALL, subset

pytestmark = pytest.mark.usefixtures("one_thread")

# hyp1231/RPG_KDD2025: genrec/default.yaml, genrec/models/RPG/config.yaml, the README's Beauty run
RPG_PAPER = {
    "data": {"max_history": 50},
    "tokenizer": {
        "name": "opq",
        "subspaces": 32,
        "codebook_size": 256,
        "pca_dim": 128,  # the official sentence-T5 alternative: MiniLM has 384 dimensions
        "whiten": True,
        "fit_items": "train",
        "collisions": "none",
    },
    "generator": {
        "name": "rpg",
        "hidden": 448,
        "layers": 2,
        "heads": 4,
        "d_ff": 1024,
        "activation": "gelu_new",
        "bias": True,
        "norm_eps": 1e-12,
        "dropout": 0.0,
        "embed_dropout": 0.5,
        "attn_dropout": 0.5,
        "tau": 0.03,
        "lr": 0.01,
        "weight_decay": 0.0,
        "warmup_steps": 10000,
        "schedule_epochs": 150,
        "decoding": "graph",
        "beam_width": 10,
        "n_edges": 100,
        "steps": 3,
    },
    "trainer": {
        "max_epochs": 150,
        "patience": 20,
        "batch_size": 256,
        "gradient_clip_val": 1.0,
        "monitor": "valid/ndcg@10",
    },
}
SIMGR_PAPER = {
    "tokenizer": {"name": "rqvae"},
    "generator": {
        "name": "simgr",
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup_ratio": 0.01,
    },
}

SETREC_PAPER = {  # Linxyhaha/SETRec code/scripts/train_t5.sh, example `toys 1e-3 4 0.7`
    "generator": {
        "name": "setrec",
        "architecture": "encoder_decoder",
        "semantic_tokens": 4,
        "alpha": 0.7,
        "ae_hidden": [512, 256, 128],
        "whiten": False,
        "lr": 1e-3,
        "schedule": "cosine",
        "warmup_steps": 100,
    },
    "trainer": {"batch_size": 512, "max_epochs": 30, "monitor": "valid/ndcg@10"},
}


@pytest.mark.parametrize(
    ("experiment", "recipe"),
    [
        ("rpg_paper.yaml", RPG_PAPER),
        ("simgr_paper.yaml", SIMGR_PAPER),
        ("setrec_paper.yaml", SETREC_PAPER),
    ],
)
def test_paper_recipes_hold_the_official_values(experiment, recipe):
    cfg = compose(ROOT / "experiments" / experiment)
    for group, fields in recipe.items():
        for field, value in fields.items():
            assert cfg[group][field] == value, f"{experiment}: {group}.{field}"


def test_new_options_default_off_and_setrec_whitens_only_outside_the_paper_recipe():
    cfg = compose(None, ["generator=rpg"])
    off = {"embed_dropout": None, "attn_dropout": 0.0, "activation": "relu", "bias": False}
    assert {k: cfg.generator[k] for k in off} == off
    assert cfg.generator.norm_eps == 1e-5 and cfg.generator.schedule_epochs is None
    assert cfg.trainer.gradient_clip_val is None
    assert compose(None, ["generator=simgr"]).generator.schedule == "constant"
    setrec = compose(None, ["generator=setrec"]).generator
    assert setrec.whiten is True and setrec.schedule == "constant"  # chosen on validation
    assert setrec.architecture == "decoder_only"


def test_gelu_new_is_gpt2s_tanh_formula():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    gpt2 = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(ACTIVATIONS["gelu_new"]()(x), gpt2)


def test_gpt2_block_has_biases_eps_and_attention_dropout_only_in_training():
    torch.manual_seed(0)
    block = Block(16, 2, 8, 32, 0.0, cross=False, attn_dropout=0.5, bias=True, norm_eps=1e-12)
    assert block.norm1.eps == 1e-12 and block.norm1.bias is not None
    assert all(m.bias is not None for m in block.modules() if isinstance(m, torch.nn.Linear))
    plain = Block(16, 2, 8, 32, 0.0, cross=False, bias=True, norm_eps=1e-12)
    plain.load_state_dict(block.state_dict())  # the dropout adds no parameters
    length = torch.tensor([3, 5, 1])
    keep = torch.arange(5) < length[:, None]
    x = torch.randn(3, 5, 16)
    for packed in (True, False):
        layout = Layout.of(keep, causal=True, packed=packed)
        tokens = layout.pack(x)
        block.eval(), plain.eval()
        torch.testing.assert_close(block(tokens, layout)[0], plain(tokens, layout)[0])
        block.train()
        block.attn.drop.numpy_masks = packed
        dropped = block(tokens, layout)[0]
        assert not torch.allclose(dropped, plain(tokens, layout)[0])
        rows = layout.last_rows(length)  # the final-state path drops attention as well
        assert not torch.allclose(
            block.last(tokens, layout, rows), plain.last(tokens, layout, rows)
        )


def test_gradient_clipping_reaches_the_trainer_and_the_model_key(tmp_path):
    cfg = compose(ROOT / "experiments" / "rpg_paper.yaml")
    assert _trainer(cfg, tmp_path).gradient_clip_val == 1.0
    unclipped = compose(ROOT / "experiments" / "rpg_paper.yaml", ["trainer.gradient_clip_val=null"])
    assert _trainer(unclipped, tmp_path).gradient_clip_val is None

    class Stages:  # the upstream keys model_key reads
        dataset = type("D", (), {"fingerprint": "x"})()

        @staticmethod
        def key(name):
            return name

    assert model_key(cfg, Stages) != model_key(unclipped, Stages)


def test_none_leaves_unordered_ties_tied_and_rpg_scores_them_equally():
    codes = np.random.default_rng(0).integers(0, 16, (60, 4))
    codes[10] = codes[0]
    sids = assign_sids(codes, (16,) * 4, "none", ordered=False)
    assert sids.vocab_sizes == (16,) * 4 and np.array_equal(sids.codes, codes)  # no extra digit
    torch.manual_seed(0)
    model = RPG(sids, hidden=16, heads=2, d_ff=32, max_history=5).eval()
    batch = {"history": torch.tensor([[1, 2, 3], [4, -1, -1]]), "length": torch.tensor([3, 1])}
    with torch.no_grad():
        scores = model.catalogue_scores(batch)
        ranked = model.recommend({**batch, "user": torch.arange(2)}, 60)
    assert torch.equal(scores[:, 0], scores[:, 10])
    # recommend ranks by the same scores (exact decoding)
    torch.testing.assert_close(scores.gather(1, ranked[:, :5]), scores.topk(5).values)


def test_warm_up_then_cosine_over_the_schedule_epochs(beauty):
    data = leave_one_out(subset(beauty, 200), max_history=20)
    codes = np.random.default_rng(0).integers(0, 16, (200, 4))
    sids = assign_sids(codes, (16,) * 4, "none", ordered=False)
    model = RPG(sids, hidden=16, heads=2, d_ff=32, warmup_steps=4, schedule_epochs=3)
    dm = SequenceDataModule(data, batch_size=64)
    trainer = L.Trainer(**QUIET, max_steps=2, limit_val_batches=0, gradient_clip_val=1.0)
    trainer.fit(model, train_dataloaders=dm.train_dataloader())
    factor = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    total = 3 * trainer.num_training_batches  # the schedule's length, not the 2-step budget
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4 + (total - 4) / 2) == pytest.approx(0.5)
    assert factor(total) == pytest.approx(0.0, abs=1e-12)


def cold_target_split(beauty):
    """300 users of Beauty's 50 most popular items; every fifth user's test target is one of 10
    items (50 .. 59) never trained on."""
    sequences = subset(beauty, 50)[:300]
    for i in range(0, 300, 5):
        sequences[i] = np.append(sequences[i][:-1], 50 + i % 10)
    return leave_one_out(sequences, max_history=20)


def test_item_groups_equal_ranking_each_groups_items_alone(beauty):
    """SETRec's warm/cold metrics: the other group's scores masked out equals ranking the
    group's items alone (for the users whose target is in the group)."""
    data = cold_target_split(beauty)
    model = random_setrec(items=60, beta=0.4, dropout=0.0).eval()
    dm = SequenceDataModule(data, eval_batch_size=16)
    warm_items = torch.zeros(60, dtype=torch.bool)
    warm_items[dm.seen_items] = True
    assert not warm_items[50:].any() and int(warm_items.sum()) > 10
    model.warm_items = warm_items
    (m,) = L.Trainer(**QUIET).test(model, dm.test_dataloader(), verbose=False)
    for name, group in (("warm_items", warm_items), ("cold_items", ~warm_items)):
        members = group.nonzero()[:, 0]
        sums, users = {}, 0
        for batch in dm.test_dataloader():
            inside = group[batch["target"]]
            with torch.no_grad():
                scores = model.scores(batch, 0.4)[inside][:, members]  # the group's items only
            ranked = members[scores.argsort(1, descending=True)]
            for metric, values in rank_metrics(ranked, batch["target"][inside]).items():
                sums[metric] = sums.get(metric, 0.0) + float(values.sum())
            users += int(inside.sum())
        assert m[f"test/{name}/users"] == users and m[f"test/{name}/items"] == len(members)
        assert users > 0
        for metric, total in sums.items():
            assert m[f"test/{name}/{metric}"] == pytest.approx(total / users, abs=1e-6), metric
        assert m[f"test/{name}/random_recall@10"] == pytest.approx(
            min(10, len(members)) / len(members)
        )


@pytest.mark.parametrize(
    ("decoding", "collisions"),
    [("constrained", "dedup"), ("constrained", "random"), ("exhaustive", "random")],
)
def test_tiger_item_groups_decode_exactly_among_the_groups_sids(
    beauty, monkeypatch, decoding, collisions
):
    """TIGER's warm/cold item groups: with a beam at least as wide as the group's SIDs, the
    lists are the exact top of the group's SIDs by log-likelihood, and hold only its items
    (also where a warm and a cold item share a SID); free decoding reports no item groups."""
    data = cold_target_split(beauty)
    codes = np.random.default_rng(0).integers(0, 4, (60, 3))
    codes[55] = codes[0]  # a cold item with a warm item's codes
    sids = assign_sids(codes, (4, 4, 4), collisions)
    assert (sids.item_group[0] == sids.item_group[55]) == (collisions == "random")
    dm = SequenceDataModule(data, eval_batch_size=64)
    warm_items = torch.zeros(60, dtype=torch.bool)
    warm_items[dm.seen_items] = True
    assert warm_items[0] and not warm_items[50:].any()
    model = TIGER(sids, beam_width=64, decoding=decoding, bf16=False, dropout=0.0, **SMALL).eval()
    model.warm_items = warm_items
    calls = {"warm_items/": [], "cold_items/": []}  # each batch's ranked lists, in order
    update_items = RankingTotals.update_items

    def record(totals, prefix, ranked, target, users, items):
        calls[prefix].append(ranked)
        update_items(totals, prefix, ranked, target, users, items)

    monkeypatch.setattr(RankingTotals, "update_items", record)
    (m,) = L.Trainer(**QUIET).test(model, dm.test_dataloader(), verbose=False)

    # the reference: every user's log-likelihood of every SID, the other group's SIDs masked out
    sid_of = torch.as_tensor(sids.item_group)
    targets = torch.as_tensor(data.test[1])
    for name, group in (("warm_items", warm_items), ("cold_items", ~warm_items)):
        group_sids = torch.zeros(sids.num_unique, dtype=torch.bool)
        group_sids[sid_of[group]] = True
        assert int(group_sids.sum()) <= 64  # the beam keeps every prefix: exact
        users = 0
        batches = list(dm.test_dataloader())
        assert len(calls[f"{name}/"]) == len(batches)
        for batch, ranked in zip(batches, calls[f"{name}/"], strict=True):
            inside = group[batch["target"]]
            rows = {key: value[inside] for key, value in batch.items()}
            assert ranked.shape == (len(rows["target"]), 20)
            if not len(rows["target"]):
                continue
            with torch.no_grad():
                state = model._start(rows)
                scores = model._score_codes(state, model.unique_codes)
            best = scores.masked_fill(~group_sids, float("-inf")).topk(20).values
            found = ranked >= 0
            n = min(20, int(group_sids.sum()))
            assert found[:, :n].all() and not found[:, n:].any()
            assert group[ranked[found]].all()
            decoded = sid_of[ranked[:, :n]]
            assert (decoded.sort(1).values.diff(1) > 0).all()  # distinct SIDs
            torch.testing.assert_close(scores.gather(1, decoded), best[:, :n], atol=1e-4, rtol=0)
            users += len(rows["target"])
        assert users == int(group[targets].sum()) > 0
        assert m[f"test/{name}/users"] == users and m[f"test/{name}/items"] == int(group.sum())
        assert f"test/{name}/recall@10" in m and f"test/{name}/ndcg@10" in m

    model.decoding = "free"
    (free,) = L.Trainer(**QUIET).test(model, dm.test_dataloader(), verbose=False)
    assert "test/warm_users/recall@10" in free
    assert not any("_items/" in key for key in free)
