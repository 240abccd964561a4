"""RPG: exact scoring, the item graph and graph decoding against brute force; a short run."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from grid.cli import main
from grid.data import SequenceDataModule, leave_one_out, pad
from grid.errors import GridError
from grid.generators import GENERATORS, PipelineInputs
from grid.generators import rpg as rpg_module
from grid.generators.base import top_k, top_k_items
from grid.generators.popularity import Popularity
from grid.generators.rpg import RPG, item_graph
from grid.sids import assign_sids
from grid.tokenizers.opq import OptimizedPQ
from tests.conftest import QUIET

from .test_cli import cache  # noqa: F401 (a fixture, requested by name)
from .test_tiger import subset

TINY = dict(hidden=32, heads=2, d_ff=64, layers=2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sids():
    """200 items x 4 codes of 16, with collisions, so `dedup` adds a 5th, smaller position."""
    codes = np.random.default_rng(0).integers(0, 16, (200, 4))
    codes[100:110] = codes[0]  # ten copies of item 0's codes: dedup digit 0..10
    sids = assign_sids(codes, (16,) * 4, "dedup", ordered=False)
    assert sids.vocab_sizes == (16, 16, 16, 16, 11)
    return sids


@pytest.fixture(scope="module")
def batch(beauty):
    """Histories of 1..>20 items (padding and truncation) mapped into a 200-item catalogue."""
    histories = [s[:-2] % 200 for s in beauty.sequences[:48]]
    histories[0] = histories[0][:1]
    histories[1] = max(beauty.sequences, key=len)[:30] % 200
    lengths = [len(h) for h in histories]
    assert min(lengths) == 1 and max(lengths) > 20
    return {
        "user": torch.arange(48) * 7,
        "history": torch.as_tensor(pad(histories)),
        "length": torch.tensor(lengths),
        "target": torch.zeros(48, dtype=torch.long),
    }


def model(sids, **params) -> RPG:
    torch.manual_seed(0)
    rpg = RPG(sids, **TINY, **params).eval()
    with torch.no_grad():  # trained-like code embeddings: far from the near-uniform init
        rpg.codebooks.normal_()
    return rpg


def test_registered_and_bad_settings_fail_with_one_line(sids):
    inputs = PipelineInputs(num_items=200, num_users=3, train_sequences=[], sids=None)
    with pytest.raises(GridError, match="semantic IDs"):
        GENERATORS["rpg"].build(inputs)
    inputs.sids = sids
    assert isinstance(GENERATORS["rpg"].build(inputs, **TINY), RPG)
    assert RPG(sids, **TINY, n_edges=500).n_edges == 500  # unused by exact decoding
    bad = [
        ({"decoding": "graph", "n_edges": 201}, "n_edges=201 is larger than the catalogue"),
        ({"decoding": "graph", "beam_width": 201}, "beam_width=201 is larger than the catalogue"),
        ({"decoding": "graph", "beam_width": 0}, "generator.beam_width=0 is out of range"),
        ({"tau": 0.0}, "generator.tau=0.0 is out of range; set it to a value > 0"),
        ({"tau": -0.1}, "generator.tau=-0.1 is out of range"),
        ({"decoding": "beam"}, "generator.decoding='beam' is not one of exact, graph"),
    ]
    for params, match in bad:
        with pytest.raises(GridError, match=match) as error:
            RPG(sids, **TINY, **params)
        assert "\n" not in str(error.value)
    inputs.num_items = 150
    with pytest.raises(GridError, match="cover 200 items"):
        GENERATORS["rpg"].build(inputs)


def test_training_step_reaches_every_parameter(sids, batch):
    rpg = model(sids).train()
    batch = {**batch, "target": torch.arange(48) * 4}
    loss = rpg.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rpg.parameters())
    # the loss is the mean over positions of each position's cross-entropy
    rpg.eval()
    logits = rpg.code_logits(batch)
    codes = torch.as_tensor(sids.codes)[batch["target"]]
    per_position = [F.cross_entropy(logits[:, p], codes[:, p]) for p in range(sids.length)]
    torch.testing.assert_close(rpg.loss(batch), sum(per_position) / sids.length)


def code_table(rpg: RPG, batch: dict) -> torch.Tensor:
    """The batch's `code_table` `[m * V, B]`."""
    with torch.no_grad():
        return rpg.code_table(rpg.unit_states(rpg.user_state(batch["history"], batch["length"])))


def ranking_scores(rpg: RPG, batch: dict) -> torch.Tensor:
    """Every item's mean code logit `[B, N]`: what decoding ranks by."""
    return rpg.item_scores(code_table(rpg, batch))


def test_exact_scores_equal_a_per_item_loop(sids, batch, monkeypatch):
    rpg = model(sids)
    with torch.no_grad():
        log_probs = rpg.code_log_probs(batch)  # [m * V, B]
        scores = rpg.item_scores(log_probs)
    V = max(sids.vocab_sizes)
    lp = log_probs.T.reshape(48, sids.length, V)
    torch.testing.assert_close(lp, rpg.code_logits(batch).log_softmax(-1))
    # log-probabilities over each position's own vocabulary (the dedup position has 11 codes)
    torch.testing.assert_close(lp[:, -1, :11].exp().sum(-1), torch.ones(48))
    assert (lp[:, -1, 11:] == float("-inf")).all()
    for user in (0, 17, 47):
        for item in range(sids.num_items):
            codes = sids.codes[item]
            expect = sum(float(lp[user, p, codes[p]]) for p in range(sids.length)) / sids.length
            assert scores[user, item].item() == pytest.approx(expect, abs=1e-5)
    # decoding ranks by mean logits: the mean log-probabilities shifted by one constant per user
    ranking = ranking_scores(rpg, batch)
    shift = ranking - scores
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift))
    top = rpg.recommend(batch, 20)
    assert torch.equal(top, ranking.topk(20, dim=1).indices)
    torch.testing.assert_close(scores.gather(1, top), scores.topk(20, dim=1).values)
    # scored 7 items at a time, the running top-k merged
    blocks_of_7, _ = rpg.exact_top_k(code_table(rpg, batch), 20, chunk_bytes=4 * 48 * 7)
    assert torch.equal(blocks_of_7, top)
    # the score shown for each item: its summed code logits
    ids, summed = rpg.recommend_scored(batch, 20)
    assert torch.equal(ids, top)
    torch.testing.assert_close(summed, ranking.gather(1, top) * sids.length)
    monkeypatch.setattr(rpg_module, "SCORE_USERS", 10)  # users scored 10 at a time
    assert torch.equal(rpg.recommend(batch, 20), top)
    assert rpg.recommend(batch, 250)[:, 200:].eq(-1).all()  # k beyond the catalogue pads


@pytest.mark.parametrize("n", [3000, 3008, 40])  # a partial last block, whole blocks, one block
def test_block_top_k_equals_a_full_top_k(n):
    scores = torch.randn(n, 24, generator=torch.Generator().manual_seed(n))
    scores[:, 0] = scores[:, 0].round()  # column 0: many ties
    scores[-1, 1] = 100  # the partial last block holds column 1's best
    expect = scores.T.topk(20, dim=1)
    # item-major as RPG scores (a transposed view), user-major as SASRec, SETRec and SimGR do
    for layout in (scores.T, scores.T.contiguous()):
        values, items = top_k(layout, 20)
        assert torch.equal(values, expect.values)
        assert torch.equal(scores.T.gather(1, items), values)
        assert torch.equal(items[1:], expect.indices[1:])  # users without ties: the same items
        assert all(len(set(r.tolist())) == 20 for r in items)
    assert torch.equal(top_k_items(scores.T[:, :5], 20)[:, 5:], torch.full((24, 15), -1))


def test_evaluation_caches_give_the_same_scores(sids, batch):
    rpg = model(sids)
    with torch.no_grad():
        plain = rpg.code_log_probs(batch)
        rpg._eval_start()  # caches the unit code embeddings and every item's input embedding
        assert rpg._unit_codes is not None and rpg._item_inputs is not None
        assert torch.equal(rpg.code_log_probs(batch), plain)
        before = rpg._item_inputs.clone()
        rpg.codebooks.mul_(2)  # new weights: the next evaluation recomputes its caches
        rpg._eval_start()
        assert torch.equal(rpg._item_inputs, 2 * before)


def test_item_graph_equals_brute_force_top_k(sids):
    rpg = model(sids)
    unit = F.normalize(rpg.codebooks.detach(), dim=-1)
    codes = torch.as_tensor(sids.codes)
    # brute force: the dense N x N mean cosine between items' code embeddings
    emb = torch.stack([unit[p, codes[:, p]] for p in range(sids.length)], dim=1)  # [N, m, d]
    sims = torch.einsum("imd,jmd->ij", emb, emb) / sids.length
    brute = sims.topk(12, dim=1)
    for chunk_bytes in (4 * 200 * 7, 2**28):  # blocks of 7 items, and the whole catalogue
        graph = item_graph(rpg.codebooks.detach(), rpg.item_index, 12, chunk_bytes)
        assert graph.shape == (200, 12)
        torch.testing.assert_close(sims.gather(1, graph.long()), brute.values)
        # items sharing codes with item 0 (100..109) differ only in the dedup digit: exact
        # ties are allowed to come in any order, everything else must match
        rows = torch.ones(200, dtype=torch.bool)
        rows[[0, *range(100, 110)]] = False
        assert torch.equal(graph[rows].long(), brute.indices[rows])
        assert (graph[:, 0].long() == torch.arange(200))[rows].all()  # itself first


@pytest.fixture(params=["item_scores", "lookups"])
def graph_scoring(request, monkeypatch):
    """Graph decoding's two ways of scoring candidates: reading the scores of one vectorised
    pass over the catalogue (small catalogues), or looking up each candidate's codes."""
    cost = rpg_module.GRAPH_LOOKUP_COST if request.param == "item_scores" else 0
    monkeypatch.setattr(rpg_module, "GRAPH_LOOKUP_COST", cost)
    return request.param


@pytest.mark.parametrize("beam_width", [200, 3])
def test_graph_covering_the_catalogue_is_exact(sids, batch, beam_width, graph_scoring):
    """Every item's neighbourhood is the catalogue: one round reaches the exact top-k, from a
    beam as wide as the catalogue or from a 3-item beam."""
    exact = model(sids)
    graph = model(sids, decoding="graph", n_edges=200, beam_width=beam_width, steps=1)
    assert graph._graph_reads_item_scores == (graph_scoring == "item_scores")
    expect = exact.recommend(batch, 20)
    assert torch.equal(graph.recommend(batch, 20), expect)
    assert graph._graph is not None  # decoded on the graph, not by exact scoring


def test_small_graph_returns_valid_ranked_items_independent_of_batching(sids, batch, graph_scoring):
    rpg = model(sids, decoding="graph", n_edges=8, beam_width=4, steps=3)
    top = rpg.recommend(batch, 20)
    found = top >= 0  # the last round may reach fewer than 20 distinct items: -1 fills the tail
    assert (top < 200).all() and (found.sum(1) >= 4).all() and (found.sum(1) < 20).any()
    assert (found[:, :-1] >= found[:, 1:]).all()
    assert all(len(set(row[row >= 0].tolist())) == int((row >= 0).sum()) for row in top)
    scores = ranking_scores(rpg, batch)
    ranked = scores.gather(1, top.clamp(min=0)).masked_fill(~found, float("-inf"))
    assert (ranked[:, :-1] >= ranked[:, 1:]).all()  # best first, by the exact item score
    exact = scores.topk(20, dim=1).indices
    assert not torch.equal(top, exact)  # a small graph really prunes
    half = {k: v[24:] for k, v in batch.items()}
    assert torch.equal(rpg.recommend(half, 20), top[24:])  # same users, other batch: same result


def test_graph_scoring_by_item_scores_equals_lookups(sids, batch, monkeypatch):
    """Both ways of scoring graph candidates walk the same beams to the same lists."""
    rpg = model(sids, decoding="graph", n_edges=8, beam_width=4, steps=3)
    assert rpg._graph_reads_item_scores
    by_item_scores = rpg.recommend(batch, 20)
    monkeypatch.setattr(rpg_module, "GRAPH_LOOKUP_COST", 0)
    assert not rpg._graph_reads_item_scores
    assert torch.equal(rpg.recommend(batch, 20), by_item_scores)


def test_selection_scores_exactly_and_test_decodes_on_the_graph(sids, batch, monkeypatch):
    rpg = model(sids, decoding="graph", n_edges=8, beam_width=4, steps=2)
    loader = DataLoader([batch], batch_size=None)
    graph = L.Trainer(**QUIET).validate(rpg, loader, verbose=False)[0]
    expect = L.Trainer(**QUIET).validate(model(sids), loader, verbose=False)[0]
    assert graph != expect  # a plain validation decodes as configured
    monkeypatch.setattr(RPG, "selecting", property(lambda self: True))  # as inside `fit`
    assert rpg.selection_decoding() == {"decoding": "exact"}
    assert L.Trainer(**QUIET).validate(rpg, loader, verbose=False)[0] == expect
    monkeypatch.undo()
    test = L.Trainer(**QUIET).test(rpg, loader, verbose=False)[0]
    assert test["infer/graph_build_seconds"] > 0


def cooccurrence_embeddings(train: list[np.ndarray], items: int, dim: int = 64) -> np.ndarray:
    """Item embeddings from the SVD of log co-occurrence counts in training sequences."""
    C = np.zeros((items, items), dtype=np.float32)
    for s in train:
        u = np.unique(s)
        C[np.ix_(u, u)] += 1
    np.fill_diagonal(C, 0)
    U, S, _ = np.linalg.svd(np.log1p(C))
    return np.ascontiguousarray(U[:, :dim] * np.sqrt(S[:dim]), dtype=np.float32)


@pytest.mark.slow
def test_short_training_beats_popularity(beauty):
    items = 1000
    split = leave_one_out(subset(beauty, items), 20)  # 9,646 users
    # OPQ codes of co-occurrence embeddings: codes that carry collaborative signal train in a few
    # epochs (MiniLM codes need about twice the steps to pass popularity)
    X = cooccurrence_embeddings(split.train, items)
    opq = OptimizedPQ(subspaces=8, codebook_size=64, opq_iters=5)
    sids = assign_sids(opq.fit(X).encode(X), opq.vocab_sizes, "dedup", ordered=False)
    dm = SequenceDataModule(split, batch_size=256, eval_batch_size=256, val_users=3000)
    torch.manual_seed(0)
    rpg = RPG(sids, hidden=64, heads=2, d_ff=128, tau=0.05, lr=3e-3, weight_decay=0.0)
    L.Trainer(max_steps=150, limit_val_batches=0, **QUIET).fit(rpg, dm.train_dataloader())
    ours = L.Trainer(**QUIET).validate(rpg, dm.val_dataloader(), verbose=False)[0]
    pop = Popularity(items, split.train)
    base = L.Trainer(**QUIET).validate(pop, dm.val_dataloader(), verbose=False)[0]
    assert ours["valid/recall@10"] > 1.5 * base["valid/recall@10"], (ours, base)
    assert ours["valid/ndcg@10"] > base["valid/ndcg@10"]


def run_args(data, cache_dir, *extra) -> list[str]:
    return [
        "run",
        "data=custom",
        f"data.path={data}",
        f"cache_dir={cache_dir}",
        "tokenizer=opq",
        "tokenizer.subspaces=8",
        "tokenizer.codebook_size=16",
        "generator=rpg",
        "generator.hidden=32",
        "generator.heads=2",
        "generator.d_ff=64",
        "trainer.max_steps=10",
        "trainer.val_check_interval=5",
        "trainer.logger=none",
        "trainer.progress_bar=false",
        *extra,
    ]


@pytest.mark.slow
def test_cli_run_with_graph_decoding_and_bad_settings(request, tmp_path, capsys):
    data, cache_dir = (request.getfixturevalue(n) for n in ("small_beauty", "cache"))
    out = tmp_path / "run"
    args = ["generator.decoding=graph", "generator.n_edges=20", "generator.beam_width=5"]
    assert main([*run_args(data, cache_dir, *args), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["infer/graph_build_seconds"] > 0 and metrics["infer/users_per_s"] > 0
    assert 0 <= metrics["test/recall@10"] <= 1 and 0 <= metrics["valid/recall@10"] <= 1
    for bad, message in (
        (args[:1] + ["generator.beam_width=100000"], "beam_width=100000"),
        (["generator.tau=0.0"], "tau"),
    ):
        out = tmp_path / bad[-1]
        capsys.readouterr()
        assert main([*run_args(data, cache_dir, *bad), "--out", str(out)]) == 2
        assert not (out / "metrics.json").exists()
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: generator.") and message in last
